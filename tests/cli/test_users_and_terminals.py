"""`bmi` as an unprivileged host user, and on a terminal (progress bars on stderr, off with --quiet)."""
from __future__ import annotations

import json
import os
import pty
import shutil
import site
import subprocess
import sys
import time

import pytest

import bmi
from tests.cli.conftest import BMI, bmi_command
from tests.helpers import busybox_path
from tests.images import newc

NOBODY = 65534
REPO = os.path.dirname(os.path.dirname(os.path.abspath(bmi.__file__)))


def _python_for_nobody() -> str:
    """An interpreter of this version the nobody user may run (the venv's may live under root's home)."""
    for candidate in (os.path.realpath(sys.executable), shutil.which(f"python3.{sys.version_info.minor}")):
        if candidate and subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                         candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    pytest.skip(f"no python3.{sys.version_info.minor} the nobody user can run")


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    """`bmi ARGS` as uid/gid 65534 with no groups and a HOME it cannot write (no TPM device either)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to become another user")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "BMI_TPM": "swtpm",
           "PYTHONPATH": os.pathsep.join([REPO, *site.getsitepackages()])}
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           _python_for_nobody(), "-m", "bmi.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd="/")


def test_info_works_for_a_user_without_a_tpm_or_a_home():
    done = as_nobody("info")
    assert done.returncode == 0, done.stderr
    tpm = next(line for line in done.stdout.splitlines() if line.startswith("tpm "))
    assert "unavailable" in tpm and "/nonexistent" in tpm
    assert "Traceback" not in done.stderr


def test_run_without_cgroup_access_says_what_to_do():
    done = as_nobody("run", busybox_path(), "--", "busybox", "true")
    if done.returncode == 0:
        pytest.skip("this user may make cgroups here (delegated): nothing to refuse")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("run as root or delegate a cgroup "
                                        "(systemd-run --user --scope -p Delegate=yes)"), done.stderr
    assert "EACCES" not in done.stderr and "/sys/fs/cgroup" not in done.stderr


def on_a_terminal(*args: str, uri: str | None = None) -> tuple[int, str]:
    """`bmi ARGS` with stderr on a pseudo-terminal (stdout to /dev/null); its status and what the terminal got."""
    env = dict(os.environ, COLUMNS="100", **({"BMI_URI": uri} if uri else {}))
    controller, terminal = pty.openpty()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen([*BMI, *args], stdout=null, stderr=terminal, env=env)
    os.close(terminal)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 65536)
        except OSError:             # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    return proc.wait(timeout=60), seen.decode(errors="replace")


@pytest.fixture
def big_image(tmp_path):
    """busybox padded to 100 MiB: long enough for a bar (the bar starts at 64 MiB)."""
    path = tmp_path / "big.img"
    with open(busybox_path(), "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
        dst.truncate(100 << 20)
    return str(path)


def test_measuring_shows_a_bar_on_a_terminal_and_quiet_turns_it_off(big_image):
    status, seen = on_a_terminal("run", big_image, "--", "busybox", "true")
    assert status == 0, seen
    assert "measuring:" in seen and "%|" in seen and "/100M" in seen, seen
    assert "unpacking" not in seen, seen            # an ELF image is not unpacked: no bar for it
    status, seen = on_a_terminal("--quiet", "run", big_image, "--", "busybox", "true")
    assert status == 0 and "measuring" not in seen and "%" not in seen, seen
    status, seen = on_a_terminal("run", "-q", big_image, "--", "busybox", "true")
    assert status == 0 and "measuring" not in seen, seen


@pytest.fixture
def big_archive(tmp_path):
    """A root archive of 100 MiB: busybox as /init and a 99 MiB file."""
    with open(busybox_path(), "rb") as f:
        busybox = f.read()
    path = tmp_path / "big.cpio"
    path.write_bytes(newc([("bin", 0o40755), ("bin/busybox", 0o100755, busybox), ("init", 0o120777, b"bin/busybox"),
                           ("blob", 0o100644, bytes((100 << 20) - len(busybox) - 512))]))
    return str(path)


def test_unpacking_a_root_shows_a_bar_and_quiet_turns_it_off(big_archive):
    status, seen = on_a_terminal("run", "--mem", "256M", big_archive, "--", "busybox", "ls", "/blob")
    assert status == 0, seen
    assert "unpacking:" in seen and "%|" in seen and "/100M" in seen, seen
    status, seen = on_a_terminal("run", "-q", "--mem", "256M", big_archive, "--", "busybox", "ls", "/blob")
    assert status == 0 and "unpacking" not in seen and "%" not in seen, seen


def test_create_start_shows_bmids_unpacking(daemon, big_archive):
    """In system mode bmid unpacks the root; its progress records reach the client's bar."""
    status, seen = on_a_terminal("create", "--mem", "256M", "--image", big_archive, "--start", "--",
                                 "busybox", "sleep", "30", uri=daemon.uri)
    assert status == 0 and "unpacking:" in seen and "/100M" in seen, seen


def test_no_bar_when_stderr_is_not_a_terminal(big_image):
    done = subprocess.run([*BMI, "run", big_image, "--", "busybox", "true"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "measuring" not in done.stderr and "%|" not in done.stderr


def test_create_shows_its_upload_and_bundle_its_archive(daemon, big_image, tmp_path):
    status, seen = on_a_terminal("create", "--image", big_image, uri=daemon.uri)
    assert status == 0 and "measuring:" in seen and "/100M" in seen, seen
    status, seen = on_a_terminal("bundle", "/bin/sh", "-o", str(tmp_path / "sh.cpio"))
    assert status == 0 and "bundling" in seen, seen
    status, seen = on_a_terminal("--quiet", "create", "--image", big_image, uri=daemon.uri)
    assert status == 0 and "measuring" not in seen and "%" not in seen, seen
    status, seen = on_a_terminal("bundle", "-q", "/bin/sh", "-o", str(tmp_path / "sh.cpio"))
    assert status == 0 and "bundling" not in seen and "%" not in seen, seen


HOSTILE = "ok\x1b]0;owned\x07\x1b[2J\r\u202eevil\nforged line"


def test_text_from_outside_cannot_drive_the_admins_terminal(daemon):
    """A value a PD (or a remote bmid) chose -- here a child's /owner and a config value holding an OSC title,
    a screen clear, a CR, a bidi override and a newline -- reaches `bmi list --owner`, `bmi config get` and
    `bmi show` with every control escaped, and in a table cell on its own line; --json keeps it exact."""
    with daemon.open() as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        pd.set_config_param("/owner", HOSTILE)
        pd.set_config_param("/note", HOSTILE)
        pid = str(pd.get_pd_id())
    outputs = {args: bmi_command(*args, uri=daemon.uri) for args in
               (("list", "--owner"), ("config", "get", pid, "/note"), ("show", pid))}
    for args, done in outputs.items():
        assert done.returncode == 0, (args, done.stderr)
        for char in ("\x1b", "\x07", "\r", "\u202e"):
            assert char not in done.stdout, (args, done.stdout)
    listed = [line for line in outputs["list", "--owner"].stdout.splitlines() if line.split()[0] == pid]
    assert len(listed) == 1 and "\\x1b]0;owned\\x07" in listed[0] and "\\nforged line" in listed[0], listed
    assert "forged line" not in outputs["list", "--owner"].stdout.replace("\\nforged line", "")
    got = outputs["config", "get", pid, "/note"].stdout
    assert got == "ok\\x1b]0;owned\\x07\\x1b[2J\\r\\u202eevil\nforged line\n", repr(got)
    exact = bmi_command("config", "get", pid, "/note", "--json", uri=daemon.uri)
    assert json.loads(exact.stdout)["value"] == HOSTILE
