"""Files a user names to bmi (a report, a key, a policy, a config, an image to hash), read so a wrong one fails.

Why: open() of a FIFO for reading waits for a writer, and a device such as
/dev/zero never ends, so `bmi verify FIFO` hung for good, `bmi verify
/dev/zero` grew until the OOM killer came, and binary bytes where text was
expected were an internal error.  Here nothing waits in open() (a FIFO no
one writes to reads as empty), what is held in memory has a size limit,
what is hashed must end (a regular file or a pipe, not a device), and each
refusal is an InvalidArgument naming the file, what it was for and why.
A pipe stays usable: `bmi verify <(ssh host bmi attest ...)`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
from typing import BinaryIO, Callable, Iterator, NoReturn

from .errors import InvalidArgument

MAX_DOCUMENT = 16 << 20         # bytes of a JSON, PEM or TOML file given to bmi: far more than any real one
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _open(path: str | os.PathLike[str], what: str, streams: tuple[Callable[[int], bool], ...]) -> int:
    """A blocking read-only fd of a regular file or of a kind `streams` allows (stat.S_IS* tests)."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:      # a socket (or a device without its driver): say which
            with contextlib.suppress(OSError):
                _refuse(name, what, os.stat(name).st_mode)
        raise InvalidArgument(f"{what}: cannot read {name}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode) and not any(test(mode) for test in streams):
        os.close(fd)
        _refuse(name, what, mode)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)    # a pipe's writer may be slow
    return fd


def _refuse(name: str, what: str, mode: int) -> NoReturn:
    kind = next((k for test, k in _KINDS if test(mode)), "not a file")
    raise InvalidArgument(f"{what}: {name} is {kind}, not a regular file")


@contextlib.contextmanager
def _reading(path: str | os.PathLike[str], what: str,
             streams: tuple[Callable[[int], bool], ...]) -> Iterator[BinaryIO]:
    """_open()'s fd as a file, closed after; a read that fails is an InvalidArgument naming the file."""
    with os.fdopen(_open(path, what, streams), "rb") as f:
        try:
            yield f
        except OSError as e:
            raise InvalidArgument(f"{what}: cannot read {os.fspath(path)}: {e.strerror}") from None


def read_bytes(path: str | os.PathLike[str], what: str, limit: int) -> bytes:
    """All of a file, a pipe or a character device (/dev/stdin), which must end within `limit` bytes."""
    with _reading(path, what, (stat.S_ISFIFO, stat.S_ISCHR)) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidArgument(f"{what}: {os.fspath(path)} has more than {limit} bytes, more than one can have: "
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
    """The SHA-256 of a regular file or a pipe (no device: /dev/zero never ends), read in pieces."""
    with _reading(path, what, (stat.S_ISFIFO,)) as f:
        return hashlib.file_digest(f, "sha256").digest()
