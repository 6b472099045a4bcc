"""Opening the files of a checkpoint or tokenizer: regular files only, and never in a way that hangs.

A checkpoint directory is untrusted input. Besides bad contents it can hold the wrong kind of file
where a file belongs: opening a FIFO for reading blocks until a writer appears (forever, for one
planted in a download), a directory cannot be read, a device can be endless. `open_regular` opens
without blocking, then asks the open file (fstat, so nothing can be swapped in between) whether it
is a regular file; a symlink to one is fine. Errors are OSErrors naming the path; the loaders turn
them into their own error types.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX; Windows has no FIFOs to guard against


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading in binary mode, if it is a regular file; OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike) -> None:
    """OSError unless `path` is a readable regular file (for readers that need a path, e.g. torch.load)."""
    open_regular(path).close()


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_regular(path) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    """The file's text, decoded as UTF-8 (UnicodeDecodeError if it is not)."""
    return read_bytes(path).decode("utf-8")


def describe(error: OSError) -> str:
    """An OSError's reason without the path it repeats: 'Permission denied', 'not a regular file (a FIFO)'."""
    return error.strerror or str(error)
