"""Test PD programs that use the C client: compiled statically with csrc/client/bmi_client.c."""
from __future__ import annotations

import hashlib
import os
import pathlib
import shlex
import shutil
import subprocess
import time

import pytest

import bmi
from bmi.clientlib import pd_client_dir
from tests.images import BUILD_DIR, HERE

CLIENT = pd_client_dir() / "bmi_client.c"      # what tests/images/*.c #include, as installed


def build(name: str) -> pathlib.Path:
    """tests/images/<name>.c (which #includes the C client), cached by both sources' hash."""
    src = HERE / f"{name}.c"
    digest = hashlib.sha256(src.read_bytes() + CLIENT.read_bytes()
                            + (CLIENT.parent / "bmi_client.h").read_bytes()).hexdigest()[:16]
    out = BUILD_DIR / f"{name}-{digest}"
    if not out.exists():
        if shutil.which("gcc") is None:
            pytest.skip("gcc is needed to build the channel test programs")
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(tmp), str(src)], check=True)
        tmp.replace(out)
    return out


def run_pd(mgr: bmi.PDManagement, prog: str, argv: list[str], *, mem: int = 32 << 20,
           start: bool = True) -> bmi.PDController:
    """Allocate and set up a PD running the static test program `prog` with argv (argv[0] added)."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=mem))
    pd.setup_pd(bmi.FileImage(str(build(prog))))
    pd.set_config_param("/boot/cmdline", shlex.join([prog, *argv]))
    if start:
        pd.request_status_change(bmi.PDStatus.RUNNING)
    return pd


def console(pd: bmi.PDController) -> str:
    return pd.get_runtime_param("/console/log")


def lines(pd: bmi.PDController, timeout: float = 20.0) -> dict[str, list[str]]:
    """Wait for the PD to end; its console as {command: [results in order]}."""
    status = pd.wait(timeout)
    assert status not in (bmi.PDStatus.RUNNING, bmi.PDStatus.PAUSED), f"PD still {status.name}: {console(pd)}"
    deadline = time.monotonic() + 5
    text = console(pd)
    while not text.endswith("\n") and text and time.monotonic() < deadline:
        time.sleep(0.05)
        text = console(pd)
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        cmd, _, result = line.partition(": ")
        out.setdefault(cmd, []).append(result)
    return out


def wait_console(pd: bmi.PDController, needle: str, timeout: float = 10.0) -> str:
    """Block until the PD printed `needle` (sync point between test and PD)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console(pd)
        if needle in text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"PD {pd.get_pd_id()} did not print {needle!r}: {console(pd)!r}")


def step(pd: bmi.PDController, value: str) -> None:
    """Release a PD waiting in `wait /test/step VALUE`."""
    pd.set_config_param("/test/step", value)


def fields(argv: str) -> list[str]:
    return shlex.split(argv)
