"""Small helpers the tests share (not fixtures)."""
from __future__ import annotations

import shlex
import shutil
import time

import pytest

import bmi

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def busybox_path() -> str:
    """The static busybox from busybox-static; skip the test when it is absent."""
    import os
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox (Debian busybox-static) is not installed")
    with open(BUSYBOX, "rb") as f:
        if b"/lib64/ld-linux" in f.read(4096):
            pytest.skip(f"{BUSYBOX} is dynamically linked; install busybox-static")
    return BUSYBOX


def start(mgr: bmi.PDManagement, argv: list[str], *, image: str | None = None, mem: int = 64 << 20,
          cpu: int = 1, performance: int = 100) -> bmi.PDController:
    """Allocate, set up and start a PD running `argv` (busybox by default)."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=mem, cpu=cpu, performance=performance))
    pd.setup_pd(bmi.FileImage(image or busybox_path()))
    pd.set_config_param("/boot/cmdline", shlex.join(argv))
    pd.request_status_change(bmi.PDStatus.RUNNING)
    return pd


def output(pd: bmi.PDController, timeout: float = 20.0) -> str:
    """Wait for the PD to end and return its whole console."""
    status = pd.wait(timeout)
    assert status not in (bmi.PDStatus.RUNNING, bmi.PDStatus.PAUSED), f"PD still {status.name} after {timeout}s"
    offset, data = 0, b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        offset, chunk = pd.read_console(offset, timeout=0.5)
        data += chunk
        if not chunk:
            break
    return data.decode()


def sh(mgr: bmi.PDManagement, script: str, **kw) -> tuple[bmi.PDController, str]:
    """Run a busybox shell script in a fresh PD; return the PD and its console."""
    pd = start(mgr, ["busybox", "sh", "-c", script], **kw)
    return pd, output(pd)
