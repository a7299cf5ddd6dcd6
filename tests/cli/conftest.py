"""Fixtures of the CLI tests: the `bmi` command as a user runs it, against linux:///session or a real bmid."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.server.bmid import running_bmid

BMI = [sys.executable, "-m", "bmi.cli"]


def bmi_command(*args: str, uri: str | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `bmi ARGS` as a separate process (BMI_URI=uri when given) and return what it did."""
    env = dict(kw.pop("env", os.environ))
    if uri is not None:
        env["BMI_URI"] = uri
    return subprocess.run([*BMI, *args], capture_output=True, text=True, timeout=kw.pop("timeout", 60), env=env,
                          **kw)


@pytest.fixture
def daemon(tmp_path):
    """A bmid of this test's own (no TPM link); its PDs are destroyed at the end."""
    with running_bmid(tmp_path) as d:
        yield d
