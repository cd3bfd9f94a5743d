class MemtrainError(Exception):
    """Base of the errors the CLI reports as a one-line message (no traceback)."""


class ConfigError(MemtrainError, ValueError):
    """A config file or override is wrong (unknown key, bad type, bad value)."""


class DataError(MemtrainError, ValueError):
    """A corpus cannot be found, read or used (missing file, empty corpus, unknown dataset, unreachable hub)."""


class CheckpointError(MemtrainError, ValueError):
    """A checkpoint is missing, corrupt or incompatible with the requested run."""


class StorageError(MemtrainError):
    """A run path cannot be read or written (unreachable bucket, missing credentials, a node-local path on a
    multi-node cluster, a damaged file)."""


DRILLS_ENV = "MEMTRAIN_DRILLS"


def check_drill(name: str, value: int) -> None:
    """Reliability drills (a worker that exits, an interrupted run) are test tools: a config that sets one is
    refused unless MEMTRAIN_DRILLS=1, so nobody sets one by accident."""
    import os

    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    if value and os.environ.get(DRILLS_ENV) != "1":
        raise ConfigError(f"{name}={value} is a reliability drill (it crashes or interrupts the run on purpose); set "
                          f"{DRILLS_ENV}=1 to run one, or leave {name} at 0")
