"""Helpers for test rigs that start, connect and attest PDs; the pytest plugin is bmi.testing.plugin.

Usable without pytest: `wait_status`, `wait_console`, `build_pd_program`
and `owner_tag` raise ordinary exceptions (AssertionError on a timeout,
so a failing wait reads as a failed test).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..clientlib import pd_client_dir
from ..errors import InvalidArgument, NotSupported
from ..types import PDStatus

OWNER_PARAM = "/owner"


def wait_status(pd: Any, status: PDStatus | str, timeout: float = 10.0) -> PDStatus:
    """Poll until the PD reports `status`; AssertionError with the last status seen on a timeout."""
    wanted = status if isinstance(status, PDStatus) else PDStatus[str(status).upper()]
    deadline = time.monotonic() + timeout
    while True:
        seen = pd.get_current_status()
        if seen == wanted:
            return seen
        if time.monotonic() >= deadline:
            raise AssertionError(f"PD {pd.get_pd_id()} is {seen.name}, not {wanted.name}, after {timeout} s")
        time.sleep(0.01)


def wait_console(pd: Any, text_or_regex: str | re.Pattern[str], timeout: float = 10.0) -> str:
    """Read the PD's console until `text_or_regex` appears; return everything read so far.

    A str is matched literally, a compiled pattern with search().  On a
    timeout the AssertionError carries the console's last 2000 characters.
    """
    pattern = text_or_regex if isinstance(text_or_regex, re.Pattern) else re.compile(re.escape(text_or_regex))
    deadline = time.monotonic() + timeout
    offset, seen = 0, b""
    while True:
        left = deadline - time.monotonic()
        offset, chunk = pd.read_console(offset, timeout=max(0.0, min(left, 0.2)))
        seen += chunk
        text = seen.decode(errors="replace")
        if pattern.search(text):
            return text
        if left <= 0:
            raise AssertionError(f"PD {pd.get_pd_id()}: {pattern.pattern!r} not on its console after {timeout} s; "
                                 f"console ends with: {text[-2000:]!r}")


def build_pd_program(source_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                     compiler: str | None = None) -> Path:
    """Compile a C PD program (it may use bmi_client.h) into a static ELF; cached by content hash.

    `source_or_path` is C source text or the path of a .c file.  NotSupported
    when there is no C compiler; InvalidArgument with the compiler's errors
    when the program does not build.
    """
    text = str(source_or_path)
    if "\n" not in text and text.endswith(".c"):
        try:
            source = Path(text).read_bytes()
        except OSError as e:
            raise InvalidArgument(f"bmi_pd_program: cannot read {text}: {e.strerror}") from None
        name = Path(text).stem
    else:
        source, name = text.encode(), "program"
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or not shutil.which(cc):
        raise NotSupported("bmi_pd_program: no C compiler (cc or gcc; set CC); install gcc and libc6-dev")
    client = pd_client_dir()
    digest = hashlib.sha256(source + (client / "bmi_client.c").read_bytes()
                            + (client / "bmi_client.h").read_bytes() + cc.encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("BMI_PROGRAM_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bmi" / "programs")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{name}-{digest}"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as work:
        src = Path(work) / f"{name}.c"
        src.write_bytes(source)
        out = Path(work) / name
        # a program may #include "bmi_client.c" itself (one translation unit); else link it in
        sources = [str(src)] + ([] if b"bmi_client.c" in source else [str(client / "bmi_client.c")])
        done = subprocess.run([cc, "-static", "-O2", "-Wall", "-I", str(client), "-o", str(out), *sources],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InvalidArgument(f"bmi_pd_program: {name}.c does not build:\n{done.stderr.strip()}")
        os.replace(out, target)     # atomic: parallel workers building the same program agree
    return target


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_tag(pid: int | None = None) -> str:
    """`host:pid:starttime` of a process (this one by default): what the plugin writes to /owner."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def owner_gone(tag: str) -> bool:
    """True when the process an owner tag names has ended (same host only; other hosts' tags: False)."""
    try:
        host, pid, started = tag.rsplit(":", 2)
        pid_number = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    return _start_time(pid_number) != started


def owned_pds(mgr: Any) -> list[tuple[int, str]]:
    """(PD id, owner tag) of every PD with config /owner set (one call per PD)."""
    from ..errors import BMIError
    found = []
    for pd_id in mgr.list_pd():
        if pd_id == 0:
            continue
        try:
            tag = mgr.get_controller(pd_id).get_config_param(OWNER_PARAM)
        except BMIError:
            continue            # unset, or gone meanwhile
        if tag:
            found.append((pd_id, tag))
    return found


def destroy_orphans(mgr: Any) -> list[int]:
    """Destroy the PDs whose owner process (see owner_tag) has ended; return their ids."""
    from ..errors import NoSuchDomain
    destroyed = []
    for pd_id, tag in owned_pds(mgr):
        if owner_gone(tag):
            try:
                mgr.get_controller(pd_id).destroy()
            except NoSuchDomain:
                continue
            destroyed.append(pd_id)
    return destroyed


def child_processes() -> set[int]:
    """Pids of this process's children, of every thread (leak checks: the suite's and bmi_no_leaks)."""
    pids: set[int] = set()
    for path in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        try:
            pids.update(int(p) for p in path.read_text().split())
        except OSError:
            continue
    return pids


def file_digest(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 of a file: the pd_integrity a PD set up from it reports."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


__all__ = ["wait_status", "wait_console", "pd_client_dir", "build_pd_program", "owner_tag", "owner_gone",
           "owned_pds", "destroy_orphans", "child_processes", "file_digest", "OWNER_PARAM"]
