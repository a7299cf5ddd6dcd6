"""PDImage providers (spec 7.3).

A PDImage is any object with `get_image_size()` and `get_data(offset,
length)`; FileImage and BytesImage cover the common cases.  FileImage
keeps its `path` and FdImage its `fd` so the measurement code can read the
file itself without a Python call per chunk, and so a client hands a
FileImage to the layer as its own fd, for the layer's one copy and hash.
"""
from __future__ import annotations

import os
import stat
from typing import Protocol, runtime_checkable

from .errors import ImageError, InvalidArgument


@runtime_checkable
class PDImage(Protocol):
    """What setup_pd pulls an image through."""

    def get_image_size(self) -> int: ...

    def get_data(self, offset: int, length: int) -> bytes: ...


class FileImage:
    """An image read from a file on the host."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise InvalidArgument(f"FileImage({self.path!r}): no such regular file")

    def get_image_size(self) -> int:
        return os.stat(self.path).st_size

    def get_data(self, offset: int, length: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read(length)
        except OSError as e:
            raise ImageError(f"FileImage({self.path!r}): cannot read at {offset}: {e.strerror}") from e

    def __repr__(self) -> str:
        return f"FileImage({self.path!r})"


class BytesImage:
    """An image held in memory."""

    def __init__(self, data: bytes | bytearray | memoryview):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"BytesImage needs bytes, got {type(data).__name__}")
        self.data = bytes(data)

    def get_image_size(self) -> int:
        return len(self.data)

    def get_data(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]

    def __repr__(self) -> str:
        return f"BytesImage(<{len(self.data)} bytes>)"


class FdImage:
    """A PDImage read from an open file: an image a client or a PD passed with SCM_RIGHTS (setup_pd)."""

    def __init__(self, fd: int):
        self.fd = fd
        try:
            self._size = os.fstat(fd).st_size
        except OSError as e:
            raise ImageError(f"setup_pd: the image fd cannot be stat'ed: {e.strerror}") from None

    def get_image_size(self) -> int:
        return self._size

    def get_data(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise ImageError(f"setup_pd: reading the image fd failed: {e.strerror}") from None


def is_plain_file_image(image: object) -> bool:
    """A FileImage whose reading is not overridden: its bytes are the file's bytes."""
    cls = type(image)
    return (isinstance(image, FileImage) and cls.get_data is FileImage.get_data
            and cls.get_image_size is FileImage.get_image_size)


def open_file_image(image: FileImage, what: str, pd_id: int | None = None) -> int:
    """The FileImage's file opened read-only (close-on-exec); ImageError when it cannot be, or is no longer a file."""
    try:
        fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)   # a FIFO must not block
    except OSError as e:
        raise ImageError(f"{what}: cannot open {image.path!r}: {e.strerror}", pd_id=pd_id) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{what}: {image.path!r} is no longer a regular file", pd_id=pd_id)
    return fd
