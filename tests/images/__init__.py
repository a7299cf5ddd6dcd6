"""Images for PD tests: static programs built from the C sources here, sealed
memfds holding them, and a newc writer that can also produce hostile archives."""
from __future__ import annotations

import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess

from bmi.drivers.linux.driver import LinuxDriver

HERE = pathlib.Path(__file__).resolve().parent
BUILD_DIR = HERE.parent / ".build"
ALL_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def build(name: str) -> pathlib.Path:
    """Compile tests/images/<name>.c with `gcc -static -O2`, cached by source hash."""
    src = HERE / f"{name}.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = BUILD_DIR / f"{name}-{digest}"
    if not out.exists():
        if shutil.which("gcc") is None:
            raise RuntimeError("gcc is needed to build the test images")
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
        tmp.replace(out)
    return out


def sealed_memfd(data: bytes, name: str = "pd-image") -> int:
    """A memfd holding data, made and sealed as the driver does before running it (MFD_EXEC where the
    kernel has it: 6.3 on)."""
    fd = LinuxDriver._memfd(name, 0)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def newc_entry(name: str | bytes, mode: int, data: bytes = b"", *, ino: int = 0, nlink: int = 1,
               namesize: int | None = None) -> bytes:
    """One newc ("070701") record; namesize may lie, to build hostile archives."""
    raw = name.encode() if isinstance(name, str) else name
    raw += b"\0"
    fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0,
              len(raw) if namesize is None else namesize, 0]
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + raw
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def newc(entries: list[tuple], *, trailer: bool = True) -> bytes:
    """An archive from (name, mode[, data[, options]]) tuples."""
    out = b"".join(newc_entry(*e[:3], **(e[3] if len(e) > 3 else {})) for e in entries)
    return out + (newc_entry("TRAILER!!!", 0) if trailer else b"")
