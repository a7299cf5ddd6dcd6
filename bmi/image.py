"""PDImage providers (spec 7.3).

A PDImage is any object with `get_image_size()` and `get_data(offset,
length)`; these two cover the common cases.  FileImage keeps its `path` so
the measurement code can read the file itself without a Python call per
chunk.
"""
from __future__ import annotations

import os
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
