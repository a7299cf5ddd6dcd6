"""linux+ssh://: the API and the CLI through a real sshd to a real bmid, and every way the link can fail."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import bmi
from bmi.testing import child_processes, file_digest
from tests.helpers import busybox_path
from tests.remote.sshd import Sshd, keygen
from tests.server.bmid import running_bmid

TICKER = "i=0; while :; do echo tick $i; i=$((i+1)); busybox sleep 0.1; done"
FAILS_WITHIN = 15.0     # s: every failure must come back as an error well before this (never a hang)


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bmi.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def _ssh_children() -> list[int]:
    """This process's ssh clients (one per connection through a +ssh URI)."""
    out = []
    for pid in child_processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"ssh":
            out.append(pid)
    return out


def _wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def _raised_within(seconds: float, call) -> BaseException | None:
    """What call() raised (None if it returned), failing the test if it takes longer than seconds: a hang."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:      # noqa: BLE001 (handed to the test)
            outcome.append(e)

    worker = threading.Thread(target=run, name="call-under-test", daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"the call hung for {seconds} s instead of failing"
    return outcome[0]


def test_the_api_over_ssh_measures_runs_and_streams_events(remote):
    _, daemon, uri = remote
    with bmi.open(uri) as mgr:
        assert mgr.get_version() == 1 and mgr.list_pd() == [0]
        events = mgr.events(timeout=20)
        pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        pd.setup_pd(bmi.FileImage(busybox_path()))          # streamed: the remote bmid measures what it got
        assert pd.measurement()["sha256"] == file_digest(busybox_path())
        pd.set_config_param("/boot/cmdline", "busybox sh -c 'echo hello over ssh; busybox sleep 0.3'")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        assert pd.wait(timeout=30) is bmi.PDStatus.SHUTDOWN
        assert pd.get_current_status() is bmi.PDStatus.SHUTDOWN   # no status board over ssh: asked of bmid
        _, console = pd.read_console(0)
        assert b"hello over ssh" in console
        seen = []
        for event in events:
            seen.append(event.status)
            if event.status is bmi.PDStatus.SHUTDOWN:
                break
        events.close()
        assert bmi.PDStatus.RUNNING in seen and seen[-1] is bmi.PDStatus.SHUTDOWN
        [row] = [r for r in mgr.describe() if r["pd"] == pd.get_pd_id()]
        assert row["sha256"] == file_digest(busybox_path()).hex()
        # an image that is not a file: copied into a memfd here, streamed, sealed there, measured by bmid
        other = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        other.setup_pd(bmi.BytesImage(open(busybox_path(), "rb").read()))
        assert other.measurement()["sha256"] == file_digest(busybox_path())
        other.destroy()
        pd.destroy()
        assert mgr.list_pd() == [0]
        remote_facts = mgr.layer_info()["remote"]
        assert remote_facts["transport"] == "ssh"
        assert set(remote_facts["not_over_ssh"]) == {"connect", "accept", "status_board"}
    # what bmid saw is what a local client sees: the same PDs, through its own socket
    with daemon.open() as local:
        assert local.list_pd() == [0]


def test_fds_that_cannot_cross_ssh_are_refused_with_the_reason(remote):
    *_, uri = remote
    with bmi.open(uri) as mgr:
        for method in ("status_board", "connect"):
            with pytest.raises(bmi.NotSupported, match=f"{method} over ssh: .*cannot cross ssh|{method} over ssh"):
                mgr._channel.call(method, {} if method == "status_board" else
                                  {"tid": 1, "con_type": "IPC", "mode": 3})
        assert mgr.get_version() == 1               # and the connection serves on


def test_the_cli_over_ssh(remote, tmp_path):
    _, daemon, uri = remote
    created = _cli("--uri", uri, "create", "--image", busybox_path(), "--name", "web", "--start", "--",
                   "busybox", "sh", "-c", "echo served; busybox sleep 60")
    assert created.returncode == 0, created.stderr
    listed = _cli("list", "--json", env={"BMI_URI": uri})      # BMI_URI as well as --uri
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows if r["pd"] != 0] == ["web"]
    _wait_for(lambda: "served" in _cli("--uri", uri, "console", "web").stdout, "the PD's console over ssh")
    shown = _cli("--uri", uri, "show", "web", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "RUNNING", shown.stderr
    info = _cli("--uri", uri, "info", "--json")
    assert info.returncode == 0 and "not_over_ssh" in info.stdout, info.stderr
    assert _cli("--uri", uri, "destroy", "web").returncode == 0
    with daemon.open() as local:
        assert local.list_pd() == [0]
    # failures are one line and a typed error, never a traceback
    bad = _cli("--uri", uri + "&user=x", "list")
    assert bad.returncode == 2 and bad.stderr.startswith("bmi: InvalidArgument: ") and "'user'" in bad.stderr
    down = _cli("--uri", uri.replace(daemon.socket, "/nonexistent/bmid.sock"), "list")
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert down.stderr.startswith("bmi: DriverUnavailable: ") and "cannot reach bmid" in down.stderr


@pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")
def test_attest_over_ssh_verifies_against_the_pinned_key(sshd, tmp_path):
    with running_bmid(tmp_path / "bmid", tpm=True) as daemon:
        uri = sshd.uri(socket=daemon.socket)
        ak_file = str(tmp_path / "host-ak.pem")
        enrolled = _cli("--uri", uri, "ak", "--out", ak_file)
        assert enrolled.returncode == 0, enrolled.stderr
        with bmi.open(uri) as mgr, daemon.open() as local:
            key = mgr.get_attestation_key()
            assert key.fingerprint == local.get_attestation_key().fingerprint
            assert key.fingerprint in enrolled.stdout and open(ak_file).read() == key.pem
        assert _cli("--uri", uri, "create", "--image", busybox_path(), "--name", "web", "--start", "--",
                    "busybox", "sleep", "60").returncode == 0
        good = _cli("--uri", uri, "attest", "web", "--nonce", "00ff", "--ak", ak_file)
        assert good.returncode == 0, good.stderr
        report = bmi.IntegrityReport.from_json(good.stdout)
        assert report.pd_integrity == file_digest(busybox_path())
        assert "verified: signed by the pinned AK " + key.fingerprint in good.stderr
        # a report is checked against the pinned key, not against whatever key the host sends now
        other_key = "sha256:" + "00" * 32
        forged = _cli("--uri", uri, "attest", "web", "--nonce", "00ff", "--ak", other_key)
        assert forged.returncode == 1 and forged.stderr.startswith("bmi: IntegrityError: "), forged.stderr
        assert _cli("--uri", uri, "destroy", "web").returncode == 0


def test_a_connection_killed_mid_call_is_a_typed_error_and_the_next_call_reconnects(remote):
    *_, uri = remote
    with bmi.open(uri) as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        pd.setup_pd(bmi.FileImage(busybox_path()))
        pd.set_config_param("/boot/cmdline", f"busybox sh -c '{TICKER}'")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        [ssh] = _ssh_children()
        killer = threading.Timer(0.5, os.kill, (ssh, signal.SIGKILL))
        killer.start()
        try:
            error = _raised_within(FAILS_WITHIN, lambda: pd.wait(timeout=None))    # would wait for good otherwise
        finally:
            killer.join()
        assert isinstance(error, bmi.ResourceError), error
        assert re.fullmatch(r"wait: the ssh connection to root@127\.0\.0\.1:\d+ dropped mid-call: "
                            r"ssh was killed by SIGKILL", str(error)), error
        assert ssh not in _ssh_children()            # reaped
        assert pd.get_current_status() is bmi.PDStatus.RUNNING     # a new ssh session; the PD ran on
        assert len(_ssh_children()) == 1
        pd.destroy()
    _wait_for(lambda: not _ssh_children(), "ssh ended after close()")


def _helpers_under(sshd_pid: int) -> list[int]:
    """bmi-remote-helper processes that our sshd started (its sessions' descendants)."""
    def parent(pid: int) -> int:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if b"bmi-remote-helper" not in f.read():
                    continue
            pid = int(name)
            while pid > 1 and pid != sshd_pid:
                pid = parent(pid)
        except (OSError, ValueError):
            continue
        if pid == sshd_pid:
            found.append(int(name))
    return found


def test_the_remote_end_dying_mid_call_is_a_typed_error_too(remote):
    sshd, _, uri = remote
    with bmi.open(uri) as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        pd.setup_pd(bmi.FileImage(busybox_path()))
        pd.set_config_param("/boot/cmdline", f"busybox sh -c '{TICKER}'")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        [helper] = _helpers_under(sshd.proc.pid)
        killer = threading.Timer(0.5, os.kill, (helper, signal.SIGKILL))
        killer.start()
        try:
            error = _raised_within(FAILS_WITHIN, lambda: pd.wait(timeout=60))
        finally:
            killer.join()
        assert isinstance(error, bmi.ResourceError), error
        assert re.fullmatch(r"wait: the ssh connection to root@127\.0\.0\.1:\d+ dropped mid-call: ssh exit status "
                            r"255 without a message \(the remote end of the session was closed or killed\)",
                            str(error)), error
        pd.destroy()


def test_an_event_stream_ends_with_an_error_when_its_connection_drops(remote):
    *_, uri = remote
    with bmi.open(uri) as mgr:
        before = set(_ssh_children())
        with mgr.events(timeout=FAILS_WITHIN) as events:
            [ssh] = set(_ssh_children()) - before
            os.kill(ssh, signal.SIGKILL)
            error = _raised_within(FAILS_WITHIN, lambda: next(events))
            assert isinstance(error, bmi.ResourceError) and "bmid ended the subscription" in str(error), error


def test_a_stalled_host_times_out_per_call(remote):
    _, daemon, uri = remote
    with bmi.open(uri + "&timeout=6") as mgr:      # connecting takes a loaded CI host a few seconds
        assert mgr.get_version() == 1
        daemon.proc.send_signal(signal.SIGSTOP)     # bmid takes the request and never answers
        try:
            error = _raised_within(6 + FAILS_WITHIN, mgr.list_pd)
            assert isinstance(error, bmi.ResourceError), error
            assert re.match(r"list_pd: no reply from root@127\.0\.0\.1:\d+ within its timeout \(6 s", str(error)), error
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert mgr.list_pd() == [0]                 # answered again, through a new session


def test_refusals_are_typed_and_carry_ssh_s_reason(sshd, tmp_path):
    """An unknown host key, a refused key, bmid down; each fails at open, with ssh's words."""
    stranger = str(tmp_path / "stranger.known_hosts")
    with open(stranger, "w") as f:
        f.write(f"[127.0.0.1]:{sshd.port} {keygen(str(tmp_path / 'other_host_key'))}\n")
    with pytest.raises(bmi.PermissionDenied, match="host key of root@127.0.0.1:.* is not trusted.*"
                                                   "ssh: .*Host key verification failed"):
        bmi.open(sshd.uri(known_hosts=stranger))
    keygen(str(tmp_path / "unknown_key"))
    with pytest.raises(bmi.PermissionDenied, match=r"refused the login: ssh: .*Permission denied \(publickey\)"):
        bmi.open(sshd.uri(keyfile=str(tmp_path / "unknown_key")))
    with pytest.raises(bmi.DriverUnavailable, match="on root@127.0.0.1:.*cannot reach bmid on /nonexistent/bmid.sock"):
        bmi.open(sshd.uri(socket="/nonexistent/bmid.sock"))
    sshd.stop()
    with pytest.raises(bmi.DriverUnavailable, match="cannot reach bmi on .*ssh: .*Connection refused"):
        bmi.open(sshd.uri())


def test_a_host_without_bmi_is_named(tmp_path):
    """The helper is not on the remote PATH (bmi not installed there)."""
    from tests.remote.sshd import require_sshd
    require_sshd()
    bare = Sshd(str(tmp_path), path="/usr/bin:/bin").start()
    try:
        with pytest.raises(bmi.DriverUnavailable, match="has no bmi-remote-helper on its PATH .*command not found"):
            bmi.open(bare.uri(socket="/run/bmi/bmid.sock"))
    finally:
        bare.close()


def test_a_hostile_host_cannot_write_past_one_line_nor_drive_the_terminal(tmp_path):
    """Its helper floods stderr, then writes a screen clear, a window title and a forged line, and fails: the error
    is one line with those controls escaped, from the tail of what it wrote (not all of it read into memory)."""
    from tests.remote.sshd import require_sshd
    require_sshd()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "bmi-remote-helper"
    helper.write_text("#!/bin/sh\nhead -c 20000000 /dev/zero | tr '\\0' x >&2\n"
                      "printf '\\nboom\\033[2J\\033]0;pwned\\007\\nbmi: PermissionDenied: forged\\n' >&2\nexit 1\n")
    helper.chmod(0o755)
    hostile = Sshd(str(tmp_path), path=f"{bin_dir}:/usr/bin:/bin").start()
    try:
        failed = _cli("--uri", hostile.uri(socket="/run/bmi/bmid.sock"), "list")
    finally:
        hostile.close()
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr[-500:]
    assert failed.stderr.startswith("bmi: DriverUnavailable: ") and "boom" in failed.stderr
    assert "\x1b" not in failed.stderr and "\x07" not in failed.stderr, failed.stderr[-300:]
    assert "\\x1b[2J" in failed.stderr


def test_a_silent_host_times_out_at_connect(tmp_path):
    """Something accepts the TCP connection and never speaks: ?timeout= bounds the wait."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        started = time.monotonic()
        with pytest.raises(bmi.DriverUnavailable, match=r"127\.0\.0\.1.*(within 1 s|timed out)"):
            bmi.open(f"linux+ssh://root@127.0.0.1:{listener.getsockname()[1]}/system?no_verify=1&timeout=1")
        assert time.monotonic() - started < FAILS_WITHIN
    finally:
        listener.close()


@pytest.mark.parametrize("uri, message", [
    ("linux+ssh:///system", "unknown URI"),
    ("linux+ssh://host/system?user=me", "unknown query option 'user'"),
    ("linux+ssh://host/system?timeout=soon", "timeout= 'soon' is not a number of seconds"),
    ("linux+ssh://host/system?no_verify=yes", "no_verify is 1 or 0"),
    ("linux+ssh://host/system?no_verify=1&known_hosts=/etc/hostname", "contradict"),
    ("linux+ssh://host/system?keyfile=/nonexistent", "not a readable file"),
    ("linux+ssh://-oProxyCommand=x/system", "is not a host or user name"),
    ("linux+ssh://host/session", "unknown URI"),
    ("linux+ssh://[::1/system", "'linux\\+ssh://\\[::1/system': Invalid IPv6 URL"),     # was a ValueError
    ("xen+ssh://h]/system", "Invalid IPv6 URL"),
])
def test_bad_uris_are_refused_before_ssh_runs(uri, message):
    with pytest.raises(bmi.InvalidArgument, match=message):
        bmi.open(uri)
    assert not _ssh_children()


def test_bmi_ssh_timeout_is_read(monkeypatch):
    monkeypatch.setenv("BMI_SSH_TIMEOUT", "never")
    with pytest.raises(bmi.InvalidArgument, match=r"\$BMI_SSH_TIMEOUT 'never'"):
        bmi.open("linux+ssh://host/system")
    from bmi.remote.ssh import parse
    monkeypatch.setenv("BMI_SSH_TIMEOUT", "7")
    assert parse("xen+ssh://host/system").timeout == 7 and parse("xen+ssh://host/system?timeout=3").timeout == 3
    assert "bmi-remote-helper --uri xen:///system" in parse("xen+ssh://host/system").argv()[-1]


def test_a_key_limited_to_the_helper_serves_bmi(remote):
    """README's deployment: `restrict,command="bmi-remote-helper ..."` in authorized_keys; socket= then ignored."""
    sshd, daemon, _ = remote
    sshd.authorize(sshd.client_public, options=f'restrict,command="bmi-remote-helper --socket {daemon.socket}"')
    with bmi.open(sshd.uri(socket="/elsewhere/bmid.sock")) as mgr:
        assert mgr.list_pd() == [0]


def test_the_remote_host_bounds_a_streamed_image_before_bmid_sees_it(tmp_path):
    """The helper's memfd is bounded by the remote host's BMI_MAX_IMAGE, checked on the announced size."""
    from tests.remote.sshd import require_sshd
    require_sshd()
    small = Sshd(str(tmp_path), env="BMI_MAX_IMAGE=1M").start()
    try:
        with running_bmid(tmp_path / "bmid") as daemon, bmi.open(small.uri(socket=daemon.socket)) as mgr:
            pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
            size = os.path.getsize(busybox_path())
            with pytest.raises(bmi.ResourceError, match=f"an image of {size} bytes is over this host's limit of "
                                                        r"1048576 bytes \(BMI_MAX_IMAGE\)"):
                pd.setup_pd(bmi.FileImage(busybox_path()))
            assert pd.get_current_status() is bmi.PDStatus.ALLOCATED     # nothing half-done; the session serves on
            pd.destroy()
    finally:
        small.close()
