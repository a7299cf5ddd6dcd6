"""Ctrl-C at any moment once bmi's own code runs (its console-script entry, _bmi_cli, is the first): a quiet end with
status 130 (or the command's own status once it has finished), never a traceback."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import bmi
from tests.helpers import busybox_path

#: A frame of bmi's own code (the package, or _bmi_cli, the console script's entry) in a traceback.  The package's
#: own folder, not any path with /bmi/ in it: a checkout at /work/bmi holds the venv and CPython's site.py too.
BMI_FRAME = re.compile(r'File "(%s/|[^"]*/_bmi_cli\.py")' % re.escape(os.path.dirname(os.path.realpath(bmi.__file__))))
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
        if ("KeyboardInterrupt" in err or "Fatal Python error: init_" in err) and not BMI_FRAME.search(err):
            # before bmi's first line ran: CPython's own start-up ("Fatal Python error: init_import_site", or
            # init_sys_streams with the interrupt turned into "TypeError: expected a message argument") or the
            # wrapper pip generates finding _bmi_cli; only a native launcher could take Ctrl-C that early
            continue
        assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Exception ignored" not in err, \
            (delay, err)
        # -SIGINT: SIGINT's default action, before the interpreter takes SIGINT over or after it gives it back
        # at exit; a shell reports 130 for it too
        assert status in (128 + signal.SIGINT, -signal.SIGINT, normal), (delay, status, err)
        reached.append(status)
    assert 128 + signal.SIGINT in reached, "no Ctrl-C reached bmi's own code: the delays need to be longer here"
