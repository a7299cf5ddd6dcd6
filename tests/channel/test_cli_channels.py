"""`bmi allow` and `bmi connections` on a real manager with real PDs."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest

import bmi
from bmi import ConnectionPolicy, ConnectionType as CT, PDDescription, cli
from bmi.cli import run as run_commands

MB = 1 << 20


@pytest.fixture
def on(mgr, monkeypatch):
    """Point the CLI at this test's manager (session PDs live only in their manager's process; the CLI
    refuses session URIs for these commands, so it is told a system one)."""
    monkeypatch.setattr(run_commands, "bmi_open", lambda uri, integrity=True: contextlib.nullcontext(mgr))
    monkeypatch.setenv("BMI_URI", "linux:///system")
    return mgr


def test_allow_sets_and_withdraws_the_policy_and_cuts(on, as_pd, capsys):
    a, b = (on.allocate_pd(PDDescription(mem=32 * MB)) for _ in range(2))
    src, dst = str(a.get_pd_id()), str(b.get_pd_id())
    assert cli.main(["allow", src, dst, "--type", "ipc", "--type", "shm", "--mode", "r"]) == 0
    assert a.get_allowed_connections(b.get_pd_id()) == [ConnectionPolicy(CT.IPC, bmi.READ),
                                                        ConnectionPolicy(CT.SHM, bmi.READ)]
    assert "IPC r, SHM r" in capsys.readouterr().err
    assert cli.main(["allow", src, dst, "--type", "ipc", "--type", "shm", "--mode", "r", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pd": a.get_pd_id(), "towards": b.get_pd_id(), "allowed": [
        {"type": "IPC", "mode": "r"}, {"type": "SHM", "mode": "r"}]}
    ca, cb = as_pd(a), as_pd(b)
    conn = ca.connect(b.get_pd_id(), CT.IPC, bmi.READ)
    assert cli.main(["connections", src, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"conn": conn.conn, "direction": "to", "peer": b.get_pd_id(), "type": "IPC", "mode": "READ",
                     "pending": True}]
    assert cli.main(["allow", src, dst, "--disable-existing"]) == 0
    assert a.get_allowed_connections(b.get_pd_id()) == []
    assert cli.main(["connections", src]) == 0
    assert capsys.readouterr().out.split() == ["CONN", "DIR", "PEER", "TYPE", "MODE"]    # a header, no rows
    with conn.socket() as s:
        assert s.recv(10) == b""
    assert cb.accept(timeout=0) is None


def test_allow_for_a_missing_pd_fails_with_the_reason(on, capsys):
    assert cli.main(["allow", "41", "42", "--type", "ipc"]) == 1
    err = capsys.readouterr().err
    assert "NoSuchDomain" in err and "PD 41" in err


def test_bad_mode_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "bmi.cli", "allow", "1", "2", "--mode", "x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a mode" in done.stderr
