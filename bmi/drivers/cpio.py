"""newc cpio archives, shared by the drivers: the Linux driver's PD roots, the Xen driver's bundles.

Parsing goes through the C parser bmi-init unpacks with (csrc/cpio/cpio.c,
bmi._cpio), so what a check accepts is what is unpacked; CpioWriter writes
archives for `bmi bundle`, the rigs and the tests.
"""
from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from typing import Any, Iterator

from .. import _cpio
from ..errors import ImageError

CPIO_MAGICS = (b"070701", b"070702")
CPIO_TRAILER = "TRAILER!!!"
CPIO_HEADER: int = _cpio.lib.BMI_CPIO_HEADER


@dataclass(frozen=True)
class CpioEntry:
    name: str           # leading './' removed ('init', 'bin/sh'; '' for '.')
    mode: int
    nlink: int
    data_offset: int
    size: int


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _c_error(err: Any) -> str:
    return _cpio.ffi.string(err).decode(errors="backslashreplace")


def iter_cpio(data: bytes | mmap.mmap, *, what: str) -> Iterator[CpioEntry]:
    """The entries of a newc archive, through the C parser bmi-init uses (csrc/cpio/cpio.c).

    The whole archive is walked before the first entry is given, so an
    ImageError for a malformed one comes before any of its entries."""
    entries = []
    err = _cpio.ffi.new("char[]", 1024)
    reader = _cpio.ffi.new("struct bmi_cpio_reader *")
    entry = _cpio.ffi.new("struct bmi_cpio_entry *")
    with _cpio.ffi.from_buffer(data) as buf:
        _cpio.lib.bmi_cpio_start(reader, buf, len(buf))
        while (rc := _cpio.lib.bmi_cpio_next(reader, entry, err, len(err))) == 1:
            name = os.fsdecode(_cpio.ffi.unpack(entry.name, entry.name_len))
            entries.append(CpioEntry(name, entry.mode, entry.nlink, entry.data_offset, entry.size))
    if rc < 0:
        raise ImageError(f"{what}: {_c_error(err)}")
    return iter(entries)


def check_archive(data: bytes | mmap.mmap, *, what: str) -> None:
    """A PD root archive is what bmi-init unpacks: the same C check (bmi_cpio_check) decides both."""
    err = _cpio.ffi.new("char[]", 1024)
    with _cpio.ffi.from_buffer(data) as buf:
        rc = _cpio.lib.bmi_cpio_check(buf, len(buf), err, len(err))
    if rc:
        raise ImageError(f"{what}: {_c_error(err)}")


class CpioWriter:
    """Writes a newc archive; used by `bmi bundle` and the tests."""

    def __init__(self, out):
        self._out = out
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        blob = header + encoded
        blob += b"\0" * (_align4(len(blob)) - len(blob))
        blob += data
        blob += b"\0" * (_align4(len(blob)) - len(blob))
        self._out.write(blob)

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def raw(self, name: str, mode: int, data: bytes = b"") -> None:
        """Any mode, for tests of hostile archives."""
        self._entry(name, mode, data)

    def close(self) -> None:
        self._entry(CPIO_TRAILER, 0)
