"""A real OpenSSH server of a test's own on 127.0.0.1: its own host key, config and authorized key.

Nothing of the machine's ssh set-up is used or changed: the server reads
only the config written here and runs in the foreground (`sshd -D -e`),
the test's child, until stop().  Its files live in a root-owned 0700
directory outside /tmp, because StrictModes (left on, as deployed) refuses
an authorized_keys file below a world-writable directory.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 30.0


def require_sshd() -> None:
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip(f"OpenSSH is not installed ({SSHD}, ssh, ssh-keygen): `make deps` installs openssh-server")
    if os.geteuid() != 0:
        pytest.skip("the test sshd logs in as root (and bmid needs root)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def keygen(path: str) -> str:
    """A new ed25519 key pair at path (path.pub); the public key's line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bmi-test", "-f", path], check=True,
                   stdin=subprocess.DEVNULL)
    with open(path + ".pub") as f:
        return f.read().strip()


class Sshd:
    """sshd on 127.0.0.1:port for root, with one authorized client key and the venv's bin on PATH."""

    def __init__(self, client_dir: str, path: str | None = None, env: str = ""):
        """path: the sessions' PATH (default: the venv's bin, where bmi-remote-helper is, then the system's);
        env: more NAME=VALUE words for the sessions' environment."""
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)     # sshd's privilege separation directory
        self.home = tempfile.mkdtemp(prefix="bmi-test-sshd-", dir="/run")
        self.port = free_port()
        host_key = os.path.join(self.home, "host_key")
        host_public = keygen(host_key)
        self.client_key = os.path.join(client_dir, "client_key")
        self.client_public = keygen(self.client_key)
        self.authorized_keys = os.path.join(self.home, "authorized_keys")
        self.authorize(self.client_public)
        self.known_hosts = os.path.join(client_dir, "known_hosts")
        with open(self.known_hosts, "w") as f:
            f.write(f"[127.0.0.1]:{self.port} {host_public}\n")
        if path is None:
            path = f"{os.path.dirname(sys.executable)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.config = os.path.join(self.home, "sshd_config")
        with open(self.config, "w") as f:
            f.write(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile none
AuthorizedKeysFile {self.authorized_keys}
StrictModes yes
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
SetEnv PATH={path} {env}
""")
        self.log = os.path.join(self.home, "sshd.log")
        self.proc: subprocess.Popen | None = None

    def authorize(self, public_line: str, options: str = "restrict") -> None:
        """Replace the authorized keys by this one (`restrict`: no pty, no forwarding: all bmi needs)."""
        with open(self.authorized_keys, "w") as f:
            f.write(f"{options} {public_line}\n")
        os.chmod(self.authorized_keys, 0o600)

    def uri(self, scheme: str = "linux+ssh", **options: str) -> str:
        query = {"keyfile": self.client_key, "known_hosts": self.known_hosts, **options}
        return f"{scheme}://root@127.0.0.1:{self.port}/system?" + "&".join(f"{k}={v}" for k, v in query.items())

    def start(self) -> "Sshd":
        check = subprocess.run([SSHD, "-t", "-f", self.config], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd refuses its test config: {check.stderr.strip()}")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", self.config], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{self.port}: {self.log_text()}")

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        """Stop the listener; sessions still open end with their clients."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
