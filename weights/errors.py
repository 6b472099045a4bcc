"""Exceptions of the format layer."""


class CheckpointError(ValueError):
    """A checkpoint file or directory cannot be read as one consistent model.

    The message names the file and, where there is one, the key or tensor at fault.
    """
