"""What the Linux driver runs: a static ELF, or a newc cpio archive as the PD's root.

The checks here run on the sealed, measured copy of the image in the
parent, so a bad image fails at setup_pd with a message that says what to
do instead, before anything of it runs.  The extraction itself happens in
the C spawn path inside the PD's own mount namespace.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterator

from ...errors import ImageError

ELF_MAGIC = b"\x7fELF"
CPIO_MAGICS = (b"070701", b"070702")
CPIO_TRAILER = "TRAILER!!!"
CPIO_HEADER = 110
PT_INTERP = 3
_HOST_MACHINES = {"x86_64": 62, "aarch64": 183}
_ALLOWED_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink"}
MAX_PATH = 4096


@dataclass(frozen=True)
class CpioEntry:
    name: str           # relative, normalised ('init', 'bin/sh')
    mode: int
    nlink: int
    data_offset: int
    size: int


def _align4(n: int) -> int:
    return (n + 3) & ~3


def iter_cpio(data: bytes | mmap.mmap, *, what: str) -> Iterator[CpioEntry]:
    """Walk a newc archive, raising ImageError on anything malformed."""
    pos, end = 0, len(data)
    while True:
        if pos + CPIO_HEADER > end:
            raise ImageError(f"{what}: cpio archive truncated at offset {pos} (no TRAILER!!!)")
        header = bytes(data[pos:pos + CPIO_HEADER])
        if header[:6] not in CPIO_MAGICS:
            raise ImageError(f"{what}: bad cpio header magic at offset {pos}: only newc ('070701') is supported")
        try:
            fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ImageError(f"{what}: cpio header at offset {pos} has non-hex fields") from None
        mode, nlink, size, namesize = fields[1], fields[4], fields[6], fields[11]
        if not 1 <= namesize <= MAX_PATH:
            raise ImageError(f"{what}: cpio entry at offset {pos} has a name of {namesize} bytes")
        name_start = pos + CPIO_HEADER
        raw = bytes(data[name_start:name_start + namesize])
        if len(raw) != namesize or raw[-1:] != b"\0":
            raise ImageError(f"{what}: cpio entry name at offset {pos} is truncated or not NUL-terminated")
        try:
            name = raw[:-1].decode()
        except UnicodeDecodeError:
            raise ImageError(f"{what}: cpio entry name at offset {pos} is not UTF-8") from None
        data_offset = _align4(name_start + namesize)
        if data_offset + size > end:
            raise ImageError(f"{what}: cpio entry {name!r} claims {size} bytes past the end of the archive")
        pos = _align4(data_offset + size)
        if name == CPIO_TRAILER:
            return
        yield CpioEntry(_normalise(name, what), mode, nlink, data_offset, size)


def _normalise(name: str, what: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or "\0" in name:
        raise ImageError(f"{what}: cpio entry {name!r} points outside the PD root ('..')")
    return "/".join(parts)


def check_archive(data: bytes | mmap.mmap, *, what: str) -> None:
    """A PD root archive must be well formed, hold only files/dirs/symlinks, and have /init."""
    init = None
    for entry in iter_cpio(data, what=what):
        kind = _ALLOWED_TYPES.get(stat.S_IFMT(entry.mode))
        if kind is None:
            raise ImageError(f"{what}: cpio entry {entry.name!r} is a device node, fifo or socket; a PD root "
                             f"holds only files, directories and symlinks (the layer provides /dev)")
        if entry.name in ("proc", "dev", "tmp") and kind != "directory":
            raise ImageError(f"{what}: cpio entry {entry.name!r} must be a directory (the layer mounts it)")
        if entry.name == "init":
            init = entry
    if init is None or stat.S_IFMT(init.mode) == stat.S_IFDIR:
        raise ImageError(f"{what}: the archive has no /init program to run (build one with `bmi bundle`)")


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
