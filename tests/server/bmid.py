"""Start and stop real bmid processes for tests (state and socket in a tmp dir)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest

import bmi

START_TIMEOUT = 120.0    # s: python in a Xen dom0 under TCG (the Xen rig) starts 10-20x slower
STOP_TIMEOUT = 30.0     # s: a loaded CI host may take a while to stop bmid and its threads


@contextlib.contextmanager
def running_bmid(directory: str, *extra: str, **kw: Any) -> Iterator["Bmid"]:
    """A started Bmid, closed (restarted first if a test left it down) at the end."""
    require_root()
    d = Bmid(str(directory), *extra, **kw).start()
    try:
        yield d
    finally:
        if d.proc is None:
            d.start()
        d.close()


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("bmid needs root (namespaces and cgroups for PDs of any user)")


class Bmid:
    """One bmid serving `system` (linux:///system or xen:///system) on a state dir; restartable, SIGKILLable."""

    def __init__(self, directory: str, *extra: str, socket_dir: str | None = None, system: str = "linux:///system",
                 tpm: bool = False, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
        """tpm=True: with the integrity link, on a swtpm of its own (state under directory/tpm);
        env: extra environment (e.g. BMID_TEST_PAUSE) for the next start()s; prefix: a command that execs
        bmid (e.g. nsenter into a network namespace the test made)."""
        self.state_dir = os.path.join(directory, "state")
        self.tpm_dir = os.path.join(directory, "tpm") if tpm else None
        self.socket = os.path.join(socket_dir or directory, "bmid.sock")
        self.system = system
        self.uri = f"{system}?socket={self.socket}"
        self.extra = extra
        self.env = dict(env or {})
        self.prefix = prefix
        self.proc: subprocess.Popen | None = None

    def start(self, *, ready: bool = True) -> "Bmid":
        """Start bmid and (ready=True) wait until it serves its socket."""
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "bmi.server.main", "--uri", self.system, "--state-dir", self.state_dir,
             "--socket", self.socket, *(() if self.tpm_dir else ("--no-integrity",)), "--shutdown-grace", "2",
             *self.extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, **self.env,
                 **({"BMI_STATE_DIR": self.tpm_dir, "BMI_TPM": "swtpm"} if self.tpm_dir else {})})
        deadline = time.monotonic() + START_TIMEOUT
        while ready and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                proc, self.proc = self.proc, None       # a later start() or close() must not mask this
                with proc.stderr:
                    raise RuntimeError(f"bmid exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(self.socket)
                return self
            except OSError:
                time.sleep(0.02)
            finally:
                probe.close()
        if not ready:
            return self
        self.kill()
        raise RuntimeError("bmid did not come up")

    def refused(self) -> str:
        """Start bmid expecting a refusal: its one stderr line (it must exit non-zero, without a traceback)."""
        proc = subprocess.run(
            [sys.executable, "-m", "bmi.server.main", "--uri", self.system, "--state-dir", self.state_dir,
             "--socket", self.socket, "--no-integrity", *self.extra], stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=START_TIMEOUT, env={**os.environ, **self.env})
        assert proc.returncode != 0, f"bmid started: {proc.stderr}"
        self.exit_status = proc.returncode
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bmid: "), f"not one `bmid:` line: {proc.stderr}"
        return lines[0]

    def wait_paused(self, point: str, timeout: float = 30.0) -> None:
        """Until bmid (started with BMID_TEST_PAUSE) stopped at point."""
        marker = os.path.join(self.state_dir, f"paused-{point}")
        deadline = time.monotonic() + timeout
        while not os.path.exists(marker):
            assert time.monotonic() < deadline, f"bmid never reached {point}"
            assert self.proc is not None and self.proc.poll() is None, "bmid ended"
            time.sleep(0.02)
        os.unlink(marker)

    def resume(self, point: str) -> None:
        """Let bmid, stopped at point (see wait_paused), go on."""
        with open(os.path.join(self.state_dir, f"resume-{point}"), "w"):
            pass

    def open(self) -> bmi.PDManagement:
        return bmi.open(self.uri)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc.stderr.close()
            self.proc = None

    def stop(self) -> None:
        """SIGTERM: bmid stops serving, the PDs keep running."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.proc.stderr.close()
            self.proc = None

    def destroy_all(self) -> None:
        with self.open() as mgr:
            for pd_id in reversed(mgr.list_pd()[1:]):
                if pd_id in mgr.list_pd():
                    mgr.get_controller(pd_id).destroy()

    def close(self) -> None:
        """Destroy every PD, then stop (the fd keeper then exits too)."""
        if self.proc is not None:
            self.destroy_all()
            self.stop()
