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
