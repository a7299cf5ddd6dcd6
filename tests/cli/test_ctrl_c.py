"""Ctrl-C at any moment of `bmi`, from its first milliseconds on: a quiet end with status 130 (or the command's
own status once it has finished), never a traceback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import busybox_path

#: CPython's own start-up (before the first line of any program runs) reports a Ctrl-C as a fatal error with a
#: traceback; nothing a Python program ships can take Ctrl-C earlier (only a native launcher could block it).
INTERPRETER_START = "Fatal Python error: init_"
DELAYS_MS = (0, 10, 30, 60, 100, 150, 200, 300, 450, 600, 800, 1100)


def _console_script() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "bmi")
    if not os.path.exists(script):
        pytest.skip(f"no `bmi` console script next to {sys.executable} (the package is not installed)")
    return script


def _interrupt(command: list[str], delay: float) -> tuple[int, str]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode(errors="replace")


@pytest.mark.parametrize("args", [["info"], ["run", "BUSYBOX", "--", "busybox", "true"]], ids=["info", "run"])
def test_ctrl_c_in_the_first_second_ends_quietly(args):
    command = [_console_script(), *(busybox_path() if a == "BUSYBOX" else a for a in args)]
    normal = subprocess.run(command, capture_output=True, timeout=60).returncode
    assert normal == 0
    reached = []
    for delay in DELAYS_MS:
        status, err = _interrupt(command, delay / 1000)
        if status == -signal.SIGINT and not err:
            continue        # before the interpreter took SIGINT over: the default action (a shell says 130)
        if err.startswith(INTERPRETER_START):
            continue        # CPython's own start-up, see INTERPRETER_START
        assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Exception ignored" not in err, \
            (delay, err)
        assert status in (128 + signal.SIGINT, normal), (delay, status, err)
        reached.append(status)
    assert 128 + signal.SIGINT in reached, "no Ctrl-C reached bmi's own code: the delays need to be longer here"
