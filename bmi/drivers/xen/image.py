"""What the Xen driver boots: a PV/PVH kernel, or a cpio bundle of `kernel`, `ramdisk`, `cmdline`.

setup_pd measures the image while writing it into one sealed memfd; the
files libxl loads are that memfd (a plain kernel) or byte-exact slices of
it copied in the kernel into further sealed memfds (a bundle).  libxl
reads them through /proc/self/fd/N, so what boots is what was measured.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

from ...errors import ImageError, ResourceError
from ..cpio import CPIO_MAGICS, iter_cpio

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MAX_CMDLINE = 1023          # Xen's guest command line buffer is 1024 bytes with the NUL
BUNDLE_FILES = ("kernel", "ramdisk", "cmdline")
_COMPRESSED = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh", b"\x02\x21\x4c\x18", b"\x28\xb5\x2f\xfd", b"\x5d\x00\x00")


def kernel_kind(head: bytes) -> str | None:
    """'elf', 'bzimage' or 'compressed' for what libxc's loader takes; None otherwise."""
    if head[:4] == b"\x7fELF":
        return "elf"
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return "bzimage"
    if any(head.startswith(m) for m in _COMPRESSED):
        return "compressed"
    return None


@dataclass(frozen=True)
class Slice:
    offset: int
    size: int


@dataclass(frozen=True)
class BundleLayout:
    kernel: Slice
    ramdisk: Slice | None
    cmdline: str | None


def parse_bundle(data: bytes | mmap.mmap, *, what: str) -> BundleLayout:
    """Find kernel, ramdisk and cmdline in a newc archive; anything else in it is an error."""
    found: dict[str, Slice] = {}
    for entry in iter_cpio(data, what=what):
        if stat.S_ISDIR(entry.mode) and entry.name in ("", "."):
            continue
        if entry.name not in BUNDLE_FILES:
            raise ImageError(f"{what}: the bundle holds {entry.name!r}; a Xen bundle has only "
                             f"{', '.join(BUNDLE_FILES)}")
        if not stat.S_ISREG(entry.mode):
            raise ImageError(f"{what}: bundle entry {entry.name!r} is not a regular file")
        if entry.name in found:
            raise ImageError(f"{what}: the bundle holds {entry.name!r} twice")
        found[entry.name] = Slice(entry.data_offset, entry.size)
    kernel = found.get("kernel")
    if kernel is None or kernel.size == 0:
        raise ImageError(f"{what}: the bundle has no kernel (needs a file named 'kernel')")
    if kernel_kind(bytes(data[kernel.offset:kernel.offset + 0x206])) is None:
        raise ImageError(f"{what}: the bundle's kernel is not an ELF vmlinux, a bzImage or a compressed kernel")
    cmdline = None
    if "cmdline" in found:
        s = found["cmdline"]
        raw = bytes(data[s.offset:s.offset + s.size])
        try:
            cmdline = raw.decode().strip()
        except UnicodeDecodeError:
            raise ImageError(f"{what}: the bundle's cmdline is not UTF-8 text") from None
        check_cmdline(cmdline, what=what, error=ImageError)
    ramdisk = found.get("ramdisk")
    return BundleLayout(kernel, ramdisk if ramdisk and ramdisk.size else None, cmdline)


def check_cmdline(cmdline: str, *, what: str, error: type[Exception]) -> None:
    if "\0" in cmdline or "\n" in cmdline:
        raise error(f"{what}: the kernel command line contains NUL or a newline")
    if len(cmdline.encode()) > MAX_CMDLINE:
        raise error(f"{what}: the kernel command line is {len(cmdline.encode())} bytes; Xen takes at most "
                    f"{MAX_CMDLINE}")


@dataclass
class Boot:
    """The sealed memfds libxl loads, and the bundle's own command line."""

    kernel_fd: int
    ramdisk_fd: int | None
    cmdline: str | None
    fmt: str                        # 'kernel' or 'bundle'

    @property
    def kernel_path(self) -> str:
        return f"/proc/self/fd/{self.kernel_fd}"

    @property
    def ramdisk_path(self) -> str | None:
        return None if self.ramdisk_fd is None else f"/proc/self/fd/{self.ramdisk_fd}"

    def close(self) -> None:
        for fd in (self.kernel_fd, self.ramdisk_fd):
            if fd is not None:
                os.close(fd)


def memfd(name: str, *, what: str, pd_id: int) -> int:
    try:
        return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as e:
        raise ResourceError(f"{what}: memfd_create failed: {e.strerror}", pd_id=pd_id) from e


def _copy_slice(src: int, piece: Slice, name: str, *, what: str, pd_id: int) -> int:
    """A sealed memfd holding exactly bytes [offset, offset+size) of the sealed memfd src."""
    fd = memfd(name, what=what, pd_id=pd_id)
    try:
        done = 0
        while done < piece.size:
            n = os.copy_file_range(src, fd, piece.size - done, piece.offset + done, done)
            if n <= 0:
                raise ResourceError(f"{what}: copying the bundle's {name} stopped at {done} of {piece.size} "
                                    f"bytes", pd_id=pd_id)
            done += n
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as e:
        os.close(fd)
        raise ResourceError(f"{what}: copying the bundle's {name}: {e.strerror}", pd_id=pd_id) from e
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare(fd: int, *, what: str, pd_id: int) -> Boot:
    """Turn the sealed, measured memfd into what libxl boots; takes ownership of fd."""
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as data:
            head = bytes(data[:0x206])
            if head[:6] in CPIO_MAGICS:
                layout = parse_bundle(data, what=what)
            elif kernel_kind(head) is not None:
                return Boot(fd, None, None, "kernel")
            else:
                raise ImageError(f"{what}: not a Xen guest image: expected an ELF vmlinux, a bzImage, a "
                                 f"compressed kernel, or a newc cpio bundle of kernel, ramdisk, cmdline",
                                 pd_id=pd_id)
        kernel = _copy_slice(fd, layout.kernel, "kernel", what=what, pd_id=pd_id)
        try:
            ramdisk = (_copy_slice(fd, layout.ramdisk, "ramdisk", what=what, pd_id=pd_id)
                       if layout.ramdisk else None)
        except BaseException:
            os.close(kernel)
            raise
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return Boot(kernel, ramdisk, layout.cmdline, "bundle")
