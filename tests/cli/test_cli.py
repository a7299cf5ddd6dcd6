"""The `bmi` command, run as a user would (a real subprocess)."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import busybox_path

BMI = [sys.executable, "-m", "bmi.cli"]


def run(*args, **kw):
    return subprocess.run([*BMI, *args], capture_output=True, text=True, timeout=60, **kw)


def test_help_teaches():
    done = run("--help")
    assert done.returncode == 0
    for command in ("info", "run", "bundle"):
        assert command in done.stdout
    run_help = run("run", "--help").stdout
    assert "examples:" in run_help and "--mem" in run_help


def test_info_json():
    done = run("info", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["driver"] == "linux"
    assert info["cgroup"]["version"] in ("1", "2", 1, 2)
    assert "user" in info["namespaces"] and "net" in info["namespaces"]
    assert info["api_version"] == "0.1"
    client = info["pd_client_dir"]      # where C PD programs find bmi_client.h: the one answer of bmi.clientlib
    assert os.path.isfile(os.path.join(client, "bmi_client.h")) and os.path.isfile(os.path.join(client, "bmi_client.c"))


def test_run_streams_console_and_exits_with_pd_status():
    done = run("run", busybox_path(), "--", "busybox", "sh", "-c", "echo out-line; exit 7")
    assert done.returncode == 7, done.stderr
    assert done.stdout == "out-line\n"
    digest = hashlib.sha256(open(busybox_path(), "rb").read()).hexdigest()
    assert f"sha256:{digest}" in done.stderr


def test_run_json_summary_and_signal_exit():
    done = run("run", "--json", "--mem", "32M", busybox_path(), "--", "busybox", "sh", "-c", "kill -KILL $$")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "CRASHED" and "SIGKILL" in summary["reason"]
    assert done.returncode == 128 + 9


def test_run_caps():
    status = ["busybox", "grep", "CapEff", "/proc/self/status"]
    assert run("run", busybox_path(), "--", *status).stdout.split() == ["CapEff:", "0" * 16]
    kept = run("run", "--caps", "net_raw", busybox_path(), "--", *status)
    assert kept.stdout.split() == ["CapEff:", f"{1 << 13:016x}"], kept.stderr
    bad = run("run", "--caps", "fly", busybox_path(), "--", "busybox", "true")
    assert bad.returncode == 2 and "'fly' is not a Linux capability" in bad.stderr


def test_run_allow_io_uring():
    from tests.channel.progs import build
    hostile = str(build("hostile"))
    assert run("run", hostile, "--", "hostile", "iouring").stdout == "iouring: EPERM\n"
    allowed = run("run", "--allow", "io_uring", hostile, "--", "hostile", "iouring")
    assert allowed.stdout == "iouring: ok\n", allowed.stderr
    bad = run("run", "--allow", "fly", hostile, "--", "hostile", "iouring")
    assert bad.returncode == 2 and "'fly' cannot be allowed" in bad.stderr


def test_run_bad_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"not an image")
    done = run("run", str(bad))
    assert done.returncode == 1             # a runtime error, not a usage error
    assert "ImageError" in done.stderr and "unknown image format" in done.stderr


def test_run_rejects_bad_sizes():
    done = run("run", "--mem", "lots", busybox_path())
    assert done.returncode == 2 and "size" in done.stderr


def test_bundle_then_run(tmp_path):
    out = tmp_path / "root.cpio"
    done = run("bundle", "/bin/sh", "--add", "/bin/echo", "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert "/bin/sh" in json.loads(done.stdout)["files"] or "/usr/bin/sh" in json.loads(done.stdout)["files"]
    done = run("run", str(out), "--", "sh", "-c", "echo bundled; exit 0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "bundled\n"
    assert not os.path.exists(str(out) + ".tmp")


def test_bundle_missing_program(tmp_path):
    done = run("bundle", "/no/such/prog", "-o", str(tmp_path / "x.cpio"))
    assert done.returncode == 2             # InvalidArgument: the command line names no program and "not an executable" in done.stderr
    assert not (tmp_path / "x.cpio").exists()


@pytest.mark.skipif(not os.path.exists("/usr/bin/swtpm"), reason="swtpm is not installed")
def test_run_attest_then_verify(tmp_path):
    env = {**os.environ, "BMI_STATE_DIR": str(tmp_path / "state"), "BMI_TPM": "swtpm"}
    report = tmp_path / "report.json"
    done = run("run", "--attest", "--nonce", "00ff", "--attest-out", str(report), busybox_path(), "--",
               "busybox", "true", env=env)
    assert done.returncode == 0, done.stderr
    tpm = run("tpm", "--json", env=env)                  # enrolment: the verifier learns the AK
    assert tpm.returncode == 0, tpm.stderr
    ak = json.loads(tpm.stdout)["ak_fingerprint"]
    done = run("verify", str(report), "--nonce", "00ff", "--expect-image", busybox_path(), "--ak", ak, env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    done = run("verify", str(report), "--nonce", "00fe", "--expect-image", busybox_path(), "--ak", ak, env=env)
    assert done.returncode != 0 and "nonce" in (done.stderr + done.stdout).lower()
    done = run("verify", str(report), "--nonce", "00ff", "--expect-image", busybox_path(), env=env)
    assert done.returncode == 1 and "IntegrityError" in done.stderr and "--ak" in done.stderr and "Traceback" not in done.stderr


def test_uri_goes_before_or_after_the_command():
    env = dict(os.environ, BMI_URI="linux:///nowhere")
    after = run("info", "--json", "--uri", "linux:///session", env=env)
    assert after.returncode == 0 and json.loads(after.stdout)["driver"] == "linux", after.stderr
    before = run("--uri", "linux:///session", "info", "--json", env=env)
    assert before.returncode == 0 and json.loads(before.stdout)["driver"] == "linux", before.stderr
    bad = run("info", env=env)
    assert bad.returncode == 2 and "unknown URI 'linux:///nowhere'" in bad.stderr
