"""Fixtures of the remote-host tests: a real sshd and a real bmid on this machine, reached over ssh."""
from __future__ import annotations

import pytest

from tests.remote.sshd import Sshd, require_sshd
from tests.server.bmid import running_bmid


@pytest.fixture
def sshd(tmp_path):
    require_sshd()
    server = Sshd(str(tmp_path)).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def remote(sshd, tmp_path):
    """(sshd, bmid, the linux+ssh:// URI of that bmid through that sshd)."""
    with running_bmid(tmp_path / "bmid") as daemon:
        yield sshd, daemon, sshd.uri(socket=daemon.socket)
