"""The single exception type of the memory service."""


class MemoryServiceError(ValueError):
    """A memory call was refused or could not complete; the message names the problem and the fix.

    A refused call changes nothing: validation happens before anything is written.
    """
