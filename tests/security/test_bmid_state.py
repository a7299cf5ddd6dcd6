"""bmid's state and socket as another host user or a second bmid would attack them.

The state directory is created the way an operator (or a unit's
StateDirectory=) makes it, 0755, and bmid is started with umask 022: the
config values in the database (/boot/env/DB_PASSWORD) must still be
readable by root only.  A second bmid on the same --socket must not take
the first one's socket over.
"""
from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import tempfile

import pytest

import bmi
from tests.server.bmid import Bmid, require_root

SECRET = "hunter2-correct-horse"


@pytest.fixture
def public_dir():
    """A directory every user may traverse, so only bmid's own modes protect what is inside."""
    require_root()
    path = tempfile.mkdtemp(prefix="bmid-sec-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", "--one-file-system", path], check=True)


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                          capture_output=True, timeout=30)


def test_another_user_cannot_read_the_config_values_bmid_stores(public_dir):
    d = Bmid(public_dir)
    os.makedirs(d.state_dir)
    os.chmod(d.state_dir, 0o755)                    # as `mkdir -p /var/lib/bmi` leaves it
    with _umask(0o022):
        d.start()
    try:
        with d.open() as mgr:
            pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
            pd.set_config_param("/boot/env/DB_PASSWORD", SECRET)
        files = [os.path.join(d.state_dir, name) for name in os.listdir(d.state_dir)]
        leaked = [f for f in files if not os.path.isdir(f) and _as_nobody("cat", f).returncode == 0]
        assert not leaked, f"readable by uid 65534: {leaked}"
        found = _as_nobody("grep", "-r", SECRET, d.state_dir)
        assert found.returncode != 0 and SECRET.encode() not in found.stdout
        assert stat.S_IMODE(os.stat(d.state_dir).st_mode) == 0o700
        for f in files:
            if os.path.isfile(f):
                assert stat.S_IMODE(os.stat(f).st_mode) & 0o077 == 0, f"{f} is {oct(os.stat(f).st_mode)}"
    finally:
        d.close()


def test_a_second_bmid_cannot_take_over_the_socket(public_dir):
    first = Bmid(public_dir).start()
    try:
        with first.open() as mgr:
            pd_id = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)).get_pd_id()
        second = Bmid(os.path.join(public_dir, "other"), socket_dir=public_dir)
        assert second.socket == first.socket
        line = second.refused()
        assert "another bmid serves that socket" in line and first.socket in line, line
        with first.open() as mgr:                   # the first one still answers on its socket
            assert mgr.list_pd() == [0, pd_id]
    finally:
        first.close()
