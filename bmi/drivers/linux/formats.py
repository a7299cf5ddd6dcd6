"""What the Linux driver runs: a static ELF, or a newc cpio archive as the PD's root.

The checks here run on the sealed, measured copy of the image in the
parent, so a bad image fails at setup_pd with a message that says what to
do instead, before anything of it runs.  The extraction itself happens in
bmi-init inside the PD's own mount namespace; a cpio archive is parsed and
checked by the same C code in both places (csrc/cpio/cpio.c, bmi._cpio).
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from ... import _cpio
from ...errors import ImageError

ELF_MAGIC = b"\x7fELF"
CPIO_MAGICS = (b"070701", b"070702")
CPIO_TRAILER = "TRAILER!!!"
CPIO_HEADER: int = _cpio.lib.BMI_CPIO_HEADER
PT_INTERP = 3
_HOST_MACHINES = {"x86_64": 62, "aarch64": 183}


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


def check_elf(data: bytes | mmap.mmap, *, what: str) -> None:
    """Only a static ELF for this machine can be run straight from the memfd."""
    if len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise ImageError(f"{what}: only 64-bit little-endian ELF executables are supported")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    machine = _HOST_MACHINES.get(os.uname().machine)
    if machine is not None and e_machine != machine:
        raise ImageError(f"{what}: the ELF is for machine type {e_machine}, this host is {os.uname().machine}")
    if e_type not in (2, 3):            # ET_EXEC, ET_DYN (static-pie)
        raise ImageError(f"{what}: the ELF is not an executable (e_type {e_type})")
    e_phoff, = struct.unpack_from("<Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phnum == 0 or e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(data):
        raise ImageError(f"{what}: the ELF program headers are missing or truncated")
    for i in range(e_phnum):
        p_type, = struct.unpack_from("<I", data, e_phoff + i * e_phentsize)
        if p_type == PT_INTERP:
            raise ImageError(f"{what}: the ELF is dynamically linked and the PD has no libraries; link it "
                             f"statically, or make a root archive with `bmi bundle EXE -o root.cpio`")


def classify(fd: int, size: int, *, what: str) -> bool:
    """Check the measured image in memfd `fd`; True when it is a root archive."""
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as data:
        if data[:4] == ELF_MAGIC:
            check_elf(data, what=what)
            return False
        if data[:6] in CPIO_MAGICS:
            check_archive(data, what=what)
            return True
        if data[:2] == b"\x1f\x8b" or data[:6] == b"\xfd7zXZ\x00" or data[:4] == b"\x28\xb5\x2f\xfd":
            raise ImageError(f"{what}: the image is compressed; decompress it to a plain newc cpio archive")
        if data[:2] == b"#!":
            raise ImageError(f"{what}: a script cannot run on its own in a PD; put it with its interpreter "
                             f"in a root archive (`bmi bundle /bin/sh --add SCRIPT -o root.cpio`)")
        raise ImageError(f"{what}: unknown image format (expected a static ELF executable or a newc cpio "
                         f"archive with /init)")


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
