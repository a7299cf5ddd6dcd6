"""The habits virsh and systemctl users bring: exit statuses, one error shape, no tracebacks, `show`, names."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bmi import __version__
from tests.cli.conftest import BMI, bmi_command as bmi
from tests.helpers import busybox_path

SESSION_REFUSAL = "PDs of linux:///session end with this command; use --uri linux:///system (bmid) to keep them"


def test_version():
    done = bmi("--version")
    assert done.returncode == 0 and done.stdout.split()[:2] == ["bmi", __version__]


def _json_error(done: subprocess.CompletedProcess) -> dict:
    """The one error object of --json: alone on stdout, nothing else there."""
    out = json.loads(done.stdout)
    assert out["ok"] is False and set(out) == {"ok", "error"} and set(out["error"]) == {"type", "message"}, out
    assert "Traceback" not in done.stderr
    return out["error"]


def test_a_missing_or_unknown_command_is_a_usage_error():
    for args in ([], ["frob"]):
        done = bmi(*args)
        assert done.returncode == 2 and done.stdout == "" and done.stderr.startswith("usage: bmi"), done.stderr
        assert done.stderr.splitlines()[-1].startswith("bmi: InvalidArgument: bmi: ")
        as_json = bmi(*args, "--json")
        assert as_json.returncode == 2 and _json_error(as_json)["type"] == "InvalidArgument"


def test_exit_status_and_json_error_shape_are_the_same_for_every_command(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"not an image")
    runtime = bmi("run", "--json", str(bad))                         # the image is wrong: a runtime error
    assert runtime.returncode == 1 and _json_error(runtime)["type"] == "ImageError"
    usage = bmi("run", "--json", "--mem", "lots", busybox_path())    # argparse's own refusal
    assert usage.returncode == 2 and _json_error(usage)["type"] == "InvalidArgument"
    assert "'lots' is not a size" in _json_error(usage)["message"]
    api = bmi("run", "--json", "--performance", "0", busybox_path())  # the API's refusal of an argument
    assert api.returncode == 2 and "performance=0" in _json_error(api)["message"]
    report = tmp_path / "report.json"
    report.write_text("{}")
    verify = bmi("verify", "--json", str(report), "--nonce", "00", "--expect-digest", "00" * 32)
    assert verify.returncode in (1, 2) and _json_error(verify)["type"] in ("InvalidArgument", "IntegrityError")
    session = bmi("list", "--json")
    assert session.returncode == 1 and _json_error(session) == {"type": "NotSupported", "message": SESSION_REFUSAL}
    human = bmi("run", str(bad))
    assert human.returncode == 1 and human.stdout == ""
    assert human.stderr.splitlines()[-1].startswith("bmi: ImageError: setup_pd of PD 1: unknown image format")


#: One failing invocation of every command, and the status it must end with.
FAILING = {
    "info": (["--uri", "linux:///nowhere"], 2),
    "ak": (["--uri", "linux+ssh://host/system?user=me"], 2),            # an option +ssh URIs do not have
    "run": (["/no/such/image"], 2),
    "bundle": (["/no/such/prog", "-o", "/nonexistent/x.cpio"], 1),     # the output cannot be made
    "verify": (["/no/such/report.json", "--nonce", "00", "--expect-digest", "00"], 2),
    "seal": (["--policy", "/no/such/policy.json", "--secret-file", "/x", "-o", "/nonexistent/blob"], 2),
    "eventlog": ([], 1),
    "tpm": ([], 1),
    "keylime-agent": ([], 1),                                           # no TPM to reach
    "keylime-policy": (["--image", "web=/no/such/image"], 2),
    **{command: (args, 1) for command, args in {
        "allow": ["1", "2"], "connections": ["1"], "list": [], "create": ["--image", "/bin/true"],
        "show": ["1"], "start": ["1"], "pause": ["1"], "resume": ["1"], "shutdown": ["1"], "restart": ["1"],
        "destroy": ["1"], "param": ["get", "1", "/system/status"], "config": ["get", "1", "/name"],
        "attest": ["1", "--nonce", "00"], "console": ["1"], "events": [],
        "device": ["assign", "1", "/dev/net/tun"], "net": ["create", "lab0", "--subnet", "10.213.7.0/24"]}.items()},
}


def test_every_command_fails_with_one_json_object():
    from bmi.cli import build_parser
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == set(FAILING), "a new command needs its failing invocation here"
    env = dict(os.environ, BMI_TPM_TCTI="device:/nonexistent")     # no TPM to reach: tpm and eventlog fail
    for command, (args, status) in FAILING.items():
        done = bmi(command, *args, "--json", env=env)
        assert done.returncode == status, (command, done.stdout, done.stderr)
        _json_error(done)


def test_a_file_argument_never_hangs_bmi_nor_fills_its_memory(tmp_path):
    """For every file a command reads: /dev/zero (it never ends) fails at once in one line naming the option and
    the file, a FIFO no one writes to (open() would wait for a writer) reads as empty, and a pipe works (a shell's
    `bmi verify <(...)`); binary bytes where text is asked for are refused as such."""
    from bmi.types import IntegrityReport
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    report, policy, secret = tmp_path / "r.json", tmp_path / "policy.json", tmp_path / "secret"
    report.write_text(IntegrityReport(pd_integrity=bytes(32), pubkey=b"x", signature=b"").to_json())
    policy.write_text(json.dumps({"pd_integrity": "00" * 32}))
    secret.write_bytes(b"s")
    verify = ["verify", str(report), "--nonce", "00"]
    blob = str(tmp_path / "blob")
    documents = (   # read whole: /dev/zero has too many bytes
        (["verify", "{}", "--nonce", "00", "--expect-digest", "00"], "verify: the report"),
        ([*verify, "--expect-digest", "00", "--ak", "{}"], "verify: --ak"),
        (["seal", "--policy", "{}", "--secret-file", str(secret), "-o", blob], "policy"),
        (["seal", "--policy", str(policy), "--secret-file", "{}", "--storage-public", "{}", "-o", blob],
         "seal: --secret-file"))
    hashed = (      # hashed in pieces: a device is refused
        ([*verify, "--expect-image", "{}"], "verify: --expect-image"),
        (["keylime-policy", "--image", "web={}"], "keylime-policy: --image"),
        (["keylime-policy", "--any-name", "{}"], "keylime-policy: --any-name"))
    for args, what in documents + hashed:
        zero = bmi(*(a.replace("{}", "/dev/zero") for a in args), timeout=30)
        why = "has more than" if (args, what) in documents else "is a character device, not a regular file"
        assert (zero.returncode, zero.stdout, len(zero.stderr.splitlines())) == (2, "", 1), (args, zero.stderr)
        assert zero.stderr.startswith(f"bmi: InvalidArgument: {what}: /dev/zero {why}"), (args, zero.stderr)
        empty = bmi(*(a.replace("{}", fifo) for a in args), timeout=30)       # TimeoutExpired: it hung
        assert "Traceback" not in empty.stderr and len(empty.stderr.splitlines()) <= 1, (args, empty.stderr)
    r, w = os.pipe()
    os.write(w, report.read_bytes())
    os.close(w)
    piped = bmi("verify", f"/dev/fd/{r}", "--nonce", "00", "--expect-digest", "00" * 32, pass_fds=(r,))
    os.close(r)
    assert piped.returncode == 1 and piped.stderr.startswith("bmi: IntegrityError: "), piped.stderr   # read, checked
    binary = bmi("verify", busybox_path(), "--nonce", "00", "--expect-digest", "00")
    assert binary.returncode == 2 and len(binary.stderr.splitlines()) == 1
    assert binary.stderr.startswith(f"bmi: InvalidArgument: verify: the report: {busybox_path()} is not UTF-8 text")


def test_a_uri_urllib_cannot_split_is_a_usage_error_in_one_line():
    for command in (["list"], ["info"], ["run", busybox_path()]):
        done = bmi("--uri", "linux+ssh://[::1/system", *command)       # the IPv6 bracket is never closed
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr == "bmi: InvalidArgument: open 'linux+ssh://[::1/system': Invalid IPv6 URL\n"


def test_run_exits_with_the_pds_status():
    assert bmi("run", busybox_path(), "--", "busybox", "sh", "-c", "exit 42").returncode == 42


def test_bmid_commands_refuse_session_uris_in_one_line():
    for args in (["create", "--image", busybox_path(), "--name", "web"], ["list"], ["pause", "web"],
                 ["resume", "web"], ["destroy", "web"], ["show", "1"], ["console", "web"], ["connections", "1"],
                 ["config", "set", "web", "/boot/cmdline", "x"]):
        done = bmi(*args, uri="linux:///session")
        assert (done.returncode, done.stdout, done.stderr) == (1, "", f"bmi: NotSupported: {SESSION_REFUSAL}\n"), args


def _pipe_to_head(lines: int, *args: str, uri: str | None = None) -> tuple[int, bytes, bytes]:
    """`bmi ARGS | head -LINES`: bmi's status, what head printed, and bmi's stderr."""
    env = dict(os.environ, **({"BMI_URI": uri} if uri else {}))
    producer = subprocess.Popen([*BMI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    head = subprocess.run(["head", f"-{lines}"], stdin=producer.stdout, capture_output=True, timeout=60)
    producer.stdout.close()
    err = producer.stderr.read()
    return producer.wait(timeout=60), head.stdout, err


def test_run_into_a_closed_pipe_ends_quietly():
    status, out, err = _pipe_to_head(2, "run", busybox_path(), "--", "busybox", "sh", "-c", "while :; do echo x; done")
    assert out == b"x\nx\n"
    assert status == 128 + signal.SIGPIPE, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err


def test_console_follow_into_a_closed_pipe_ends_quietly(daemon):
    made = bmi("create", "--image", busybox_path(), "--name", "chat", "--start", "--", "busybox", "sh", "-c",
               "while :; do echo line; busybox sleep 0.05; done", uri=daemon.uri)
    assert made.returncode == 0, made.stderr
    status, out, err = _pipe_to_head(1, "console", "chat", "-f", uri=daemon.uri)
    assert out == b"line\n"
    assert status == 128 + signal.SIGPIPE and err == b"", err


def test_ctrl_c_during_create_ends_quietly_and_leaves_nothing(daemon, tmp_path):
    big = tmp_path / "big.img"                   # a valid ELF padded to 600 MB: creating it takes a while
    with open(busybox_path(), "rb") as src, open(big, "wb") as dst:
        dst.write(src.read())
        dst.truncate(600 << 20)
    create = subprocess.Popen([*BMI, "create", "--image", str(big), "--name", "big"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(os.environ, BMI_URI=daemon.uri))
    with daemon.open() as mgr:
        deadline = time.monotonic() + 30
        while len(mgr.list_pd()) == 1 and create.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)                     # until create has allocated its PD
        create.send_signal(signal.SIGINT)
        out, err = create.communicate(timeout=60)
        assert create.returncode == 130 and b"Traceback" not in err and out == b"", err
        assert mgr.describe() == [] or all(r["status"] == "DESTROYED" for r in mgr.describe())


def test_ctrl_c_during_run_destroys_the_pd_in_bmid_too(daemon):
    run = subprocess.Popen([*BMI, "run", busybox_path(), "--", "busybox", "sleep", "100"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=dict(os.environ, BMI_URI=daemon.uri))
    with daemon.open() as mgr:
        deadline = time.monotonic() + 30
        while [r["status"] for r in mgr.describe()] != ["RUNNING"] and time.monotonic() < deadline:
            time.sleep(0.02)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 130 and b"Traceback" not in err, err
        assert all(r["status"] == "DESTROYED" for r in mgr.describe())


def test_show_tells_everything_in_one_call(daemon):
    made = bmi("create", "--json", "--image", busybox_path(), "--name", "web", "--start", "--priority", "3",
               "--mem", "48M", "--env", "GREETING=hi", "--", "busybox", "sh", "-c", "echo $GREETING; exec busybox sleep 100",
               uri=daemon.uri)
    assert made.returncode == 0, made.stderr
    pd = json.loads(made.stdout)["pd"]
    time.sleep(1.2)
    info = json.loads(bmi("show", "web", "--json", uri=daemon.uri).stdout)
    digest = json.loads(made.stdout)["sha256"]
    assert (info["pd"], info["name"], info["status"], info["priority"], info["parent"]) == (pd, "web", "RUNNING", 3, 0)
    assert info["measurement"] == {"sha256": digest}
    assert info["memory"]["max"] == info["memory"]["current"] == 48 << 20 and info["memory"]["used"] > 0
    assert info["cpu"]["current"] == 1 and info["cpu"]["performance"] == 100
    assert info["pids"]["current"] >= 1 and info["pids"]["max"] == 1024
    assert info["uptime"] >= 1 and info["exit_status"] is None and info["connections"] == []
    assert bmi("console", "web", uri=daemon.uri).stdout == "hi\n"       # --env reached the PD
    human = bmi("show", str(pd), uri=daemon.uri).stdout
    for line in ("Name:", "web", "Status:", "RUNNING", f"sha256:  {digest}", "Priority:", "Uptime:"):
        assert line in human
    assert bmi("shutdown", "web", uri=daemon.uri).returncode == 0
    ended = json.loads(bmi("show", "web", "--json", uri=daemon.uri).stdout)
    assert ended["status"] in ("SHUTDOWN", "CRASHED") and ended["exit_reason"] and ended["uptime"] is None


def test_show_tells_how_a_pd_ended(daemon):
    made = bmi("create", "--image", busybox_path(), "--name", "job", "--start", "--", "busybox", "sh", "-c", "exit 3",
               uri=daemon.uri)
    assert made.returncode == 0, made.stderr
    deadline = time.monotonic() + 20
    while (info := json.loads(bmi("show", "job", "--json", uri=daemon.uri).stdout))["status"] == "RUNNING":
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    assert (info["status"], info["exit_status"], info["uptime"]) == ("SHUTDOWN", 3, None), info
    assert "exited with status 3" in info["exit_reason"], info
    human = bmi("show", "job", uri=daemon.uri).stdout
    assert "SHUTDOWN" in human and "exited with status 3" in human, human


def test_create_has_runs_options(daemon):
    bad = bmi("create", "--image", busybox_path(), "--banks", "sha256,md5", uri=daemon.uri)
    assert bad.returncode == 2 and "md5" in bad.stderr
    made = bmi("create", "--json", "--image", busybox_path(), "--banks", "sha256,sha384", "--caps", "net_raw",
               uri=daemon.uri)
    assert made.returncode == 0, made.stderr
    info = json.loads(bmi("show", str(json.loads(made.stdout)["pd"]), "--json", uri=daemon.uri).stdout)
    assert set(info["measurement"]) == {"sha256", "sha384"}


def test_names_are_never_ids_and_stay_unique(daemon):
    digits = bmi("create", "--image", busybox_path(), "--name", "123", uri=daemon.uri)
    assert digits.returncode == 2 and "all digits" in digits.stderr
    for name in ("web", "db"):
        assert bmi("create", "--image", busybox_path(), "--name", name, uri=daemon.uri).returncode == 0
    taken = bmi("config", "set", "db", "/name", "web", uri=daemon.uri)
    assert taken.returncode == 2 and "names are unique" in taken.stderr
    assert bmi("config", "set", "db", "/name", "7", uri=daemon.uri).returncode == 2
    slashless = bmi("config", "set", "db", "name", "other", uri=daemon.uri)
    assert slashless.returncode == 2 and "leading '/'" in slashless.stderr
    assert bmi("config", "get", "db", "/name", uri=daemon.uri).stdout == "db\n"      # nothing was renamed
    assert bmi("config", "set", "db", "/name", "store", uri=daemon.uri).returncode == 0
    assert [r["name"] for r in json.loads(bmi("list", "--json", uri=daemon.uri).stdout)] == ["web", "store"]


def test_boot_typos_and_bare_env_are_refused(daemon):
    assert bmi("create", "--image", busybox_path(), "--name", "web", uri=daemon.uri).returncode == 0
    typo = bmi("config", "set", "web", "/boot/cmdlin", "busybox true", uri=daemon.uri)
    assert typo.returncode == 2
    assert "/boot/cmdline, /boot/capabilities, /boot/allow, /boot/env/NAME" in typo.stderr and "'/boot/cmdlin'" in typo.stderr
    assert bmi("config", "set", "web", "/boot/env/DEBUG", "1", uri=daemon.uri).returncode == 0
    assert bmi("config", "set", "web", "/app/mode", "fast", uri=daemon.uri).returncode == 0   # not /boot/: kept
    bare = bmi("run", "--env", "FOO", busybox_path())
    assert bare.returncode == 2 and "'FOO' is not NAME=VALUE" in bare.stderr


def test_arguments_are_checked_before_the_image_is_read(tmp_path):
    """A FIFO nobody writes to: reading it as the image would hang, so a quick refusal proves the order."""
    fifo = tmp_path / "image"
    os.mkfifo(fifo)
    for args in (["--priority", "20"], ["--caps", "fly"], ["--env", "1BAD=x"], ["--performance", "101"]):
        done = bmi("run", "--json", *args, str(fifo), "--", "busybox", "true", timeout=20)
        assert done.returncode == 2 and _json_error(done)["type"] == "InvalidArgument", (args, done.stderr)


def test_connections_with_none_print_a_header(daemon):
    assert bmi("create", "--image", busybox_path(), "--name", "web", uri=daemon.uri).returncode == 0
    assert bmi("connections", "web", uri=daemon.uri).stdout.split() == ["CONN", "DIR", "PEER", "TYPE", "MODE"]
    assert json.loads(bmi("connections", "web", "--json", uri=daemon.uri).stdout) == []


def test_info_on_a_hybrid_host_names_the_v1_freezer():
    info = json.loads(bmi("info", "--json").stdout)
    if info["cgroup"]["mode"] != "hybrid":
        pytest.skip(f"this host's cgroups are {info['cgroup']['mode']}, not hybrid")
    assert info["cgroup"]["freeze"] == "freezer.state (v1)"
    assert "cgroup.freeze (v2)" not in bmi("info").stdout


def test_no_traceback_even_for_a_bug(monkeypatch, capsys):
    """An unexpected exception is one line too (BMI_DEBUG=1 shows the traceback)."""
    from bmi import cli
    monkeypatch.delenv("BMI_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_run", lambda args: {}["boom"])
    assert cli.main(["info", "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["type"] == "RuntimeError" and "internal error: KeyError" in error["message"]
    assert cli.main(["info"]) == 1
    assert capsys.readouterr().err.startswith("bmi: RuntimeError: internal error: KeyError: 'boom'")
    monkeypatch.setenv("BMI_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["info"])
