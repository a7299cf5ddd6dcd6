"""The virsh-like `bmi` subcommands against a real bmid, run as a separate process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


from tests.helpers import busybox_path
from tests.server.bmid import Bmid


def _bmi(d: Bmid, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BMI_URI=d.uri)
    return subprocess.run([sys.executable, "-m", "bmi.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_create_list_control_and_destroy_by_name(daemon):
    made = _bmi(daemon, "create", "--json", "--image", busybox_path(), "--name", "web", "--start", "--",
                "busybox", "sh", "-c", "echo hello; busybox sleep 100")
    assert made.returncode == 0, made.stderr
    pd = json.loads(made.stdout)
    assert pd["status"] == "RUNNING" and pd["name"] == "web"
    listed = json.loads(_bmi(daemon, "list", "--json").stdout)
    assert [(r["pd"], r["name"], r["status"]) for r in listed] == [(pd["pd"], "web", "RUNNING")]
    assert _bmi(daemon, "pause", "web").stdout.strip() == f"PD {pd['pd']} PAUSED"
    assert _bmi(daemon, "param", "get", "web", "/system/status").stdout.strip() == "PAUSED"
    assert _bmi(daemon, "resume", str(pd["pd"])).returncode == 0
    assert _bmi(daemon, "config", "get", "web", "/name").stdout.strip() == "web"
    assert _bmi(daemon, "console", "web").stdout == "hello\n"
    assert _bmi(daemon, "create", "--image", busybox_path(), "--name", "web").returncode == 2   # names are unique
    assert _bmi(daemon, "destroy", "web").returncode == 0
    assert json.loads(_bmi(daemon, "list", "--json").stdout) == []
    missing = _bmi(daemon, "start", "web")
    assert missing.returncode == 1 and "NoSuchDomain" in missing.stderr and "'web'" in missing.stderr


def test_create_with_a_bad_image_leaves_nothing(daemon, tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"not an executable")
    got = _bmi(daemon, "create", "--image", str(bad), "--name", "bad")
    assert got.returncode == 1 and "ImageError" in got.stderr
    assert json.loads(_bmi(daemon, "list", "--json").stdout) == []


def test_info_against_bmid(daemon):
    done = _bmi(daemon, "info", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["driver"] == "linux" and info["uri"].startswith("linux:///system")


def test_allow_and_connections_by_name(daemon):
    for name in ("web", "db"):
        assert _bmi(daemon, "create", "--image", busybox_path(), "--name", name).returncode == 0
    done = _bmi(daemon, "allow", "web", "db", "--type", "ipc", "--type", "shm", "--mode", "r")
    assert done.returncode == 0, done.stderr
    assert "may now open towards PD" in done.stderr and "IPC r, SHM r" in done.stderr
    with daemon.open() as mgr:
        ids = {r["name"]: r["pd"] for r in mgr.describe()}
        policies = mgr.get_controller(ids["web"]).get_allowed_connections(ids["db"])
    assert sorted((p.con_type.name, p.mode) for p in policies) == [("IPC", 1), ("SHM", 1)]
    assert json.loads(_bmi(daemon, "connections", "db", "--json").stdout) == []
    missing = _bmi(daemon, "allow", "web", "nosuch", "--type", "ipc")
    assert missing.returncode == 1 and "'nosuch': no PD has that name" in missing.stderr


def test_events_replay_and_follow(daemon):
    made = json.loads(_bmi(daemon, "create", "--json", "--image", busybox_path(), "--name", "ev").stdout)
    assert _bmi(daemon, "destroy", "ev").returncode == 0
    done = _bmi(daemon, "events", "--json", "--since", "0", "--timeout", "0.5")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["pd"], r["status"]) for r in rows] == [(made["pd"], "ALLOCATED"), (made["pd"], "READY"),
                                                       (made["pd"], "DESTROYED")]
    assert rows[-1]["name"] == "ev"                 # events carry the PD's name once it has one
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    session = subprocess.run([sys.executable, "-m", "bmi.cli", "--uri", "linux:///session", "events"],
                             capture_output=True, text=True, timeout=60)
    assert session.returncode == 1 and "PDs of linux:///session end with this command" in session.stderr


def test_create_allow_io_uring(daemon):
    from tests.channel.progs import build
    hostile = str(build("hostile"))
    made = _bmi(daemon, "create", "--json", "--image", hostile, "--allow", "io_uring", "--start", "--",
                "hostile", "iouring")
    assert made.returncode == 0, made.stderr
    pd = str(json.loads(made.stdout)["pd"])
    assert _bmi(daemon, "config", "get", pd, "/boot/allow").stdout.strip() == "io_uring"
    deadline = time.monotonic() + 30
    while (out := _bmi(daemon, "console", pd).stdout) == "" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert out == "iouring: ok\n"
    bad = _bmi(daemon, "create", "--image", hostile, "--allow", "fly")
    assert bad.returncode == 2 and "'fly' cannot be allowed" in bad.stderr
    assert [r["pd"] for r in json.loads(_bmi(daemon, "list", "--json").stdout)] == [int(pd)]   # nothing half-built
