from orchestration.errors import MemtrainError


class RLError(MemtrainError, ValueError):
    """An RL run, env or policy was asked for something it cannot do (unknown env, missing checkpoint, ...)."""
