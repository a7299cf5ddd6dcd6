"""What the Linux driver runs: a static ELF, or a newc cpio archive as the PD's root.

The checks here run on the sealed, measured copy of the image in the
parent, so a bad image fails at setup_pd with a message that says what to
do instead, before anything of it runs.  The extraction itself happens in
bmi-init inside the PD's own mount namespace; a cpio archive is parsed and
checked by the same C code in both places (bmi/drivers/cpio.py over
csrc/cpio/cpio.c).
"""
from __future__ import annotations

import mmap
import os
import struct

from ...errors import ImageError
from ..cpio import CPIO_MAGICS, check_archive

ELF_MAGIC = b"\x7fELF"
PT_INTERP = 3
_HOST_MACHINES = {"x86_64": 62, "aarch64": 183}


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
