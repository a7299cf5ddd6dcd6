"""Files a user names to bmi (a report, a key, a policy, a config, an image to hash), read so a wrong one fails.

Why: open() of a FIFO for reading waits for a writer, and a device such as
/dev/zero never ends, so `bmi verify /dev/zero` grew until the OOM killer
came and `bmi verify FIFO` hung; binary bytes where text was expected were
an internal error.  Here only a regular file is read (opened without
waiting, then checked), what is held in memory has a size limit, and
each of these is an InvalidArgument naming the file, what it was for and
what it is instead.
"""
from __future__ import annotations

import hashlib
import os
import stat

from .errors import InvalidArgument

MAX_DOCUMENT = 16 << 20         # bytes of a JSON, PEM or TOML file given to bmi: far more than any real one
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | os.PathLike[str], what: str) -> int:
    """A read-only fd of `path` (close-on-exec), which must be a regular file; the caller closes it."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidArgument(f"{what}: cannot read {name}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((k for test, k in _KINDS if test(mode)), "not a file")
        raise InvalidArgument(f"{what}: {name} is {kind}, not a regular file")
    return fd


def read_bytes(path: str | os.PathLike[str], what: str, limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    fd = open_regular(path, what)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InvalidArgument(f"{what}: cannot read {os.fspath(path)}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidArgument(f"{what}: {os.fspath(path)} is larger than {limit} bytes, more than one can be: "
                              "is it the right file?")
    return data


def read_text(path: str | os.PathLike[str], what: str, limit: int) -> str:
    """read_bytes() as UTF-8 text."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{what}: {os.fspath(path)} is not UTF-8 text (byte {e.start} is "
                              f"{data[e.start]:#04x}): is it the right file?") from None


def sha256_of(path: str | os.PathLike[str], what: str) -> bytes:
    """The SHA-256 of a regular file's bytes (read in pieces: an image may be large)."""
    fd = open_regular(path, what)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return hashlib.file_digest(f, "sha256").digest()
    except OSError as e:
        raise InvalidArgument(f"{what}: cannot read {os.fspath(path)}: {e.strerror}") from None
    finally:
        os.close(fd)
