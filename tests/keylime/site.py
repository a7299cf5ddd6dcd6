"""A Keylime site on loopback for the end-to-end test: swtpm with a local-CA EK certificate, registrar,
verifier, tenant (keylime==7.14.3 from the venv `make test-keylime` builds) and bmi's agent.

Every process runs in its own process group and is stopped by group (the verifier ignores SIGTERM
to its main pid).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

QUOTE_INTERVAL = 1          # seconds between the verifier's polls
MAX_RETRIES = 10            # the verifier's retries of an unreachable agent ...
RETRY_INTERVAL = 1          # ... this many seconds apart, no backoff: a 10 s window to restart an agent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set(path: Path, values: dict[str, object]) -> None:
    """Set `key = value` lines in a generated Keylime config file."""
    text = path.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{re.escape(key)}\s*=.*$", f"{key} = {value}", text, count=1)
        assert n == 1, f"{path.name}: no option {key}"
    path.write_text(text)


class Site:
    def __init__(self, venv: Path, root: Path):
        self.venv, self.root = venv, root
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.keylime_dir = root / "keylime"
        self.cfg = root / "cfg"
        self.ports = {n: free_port() for n in ("verifier", "registrar", "registrar_tls", "agent")}
        self.tpm_sock = root / "tpm.sock"

    # -- set-up -----------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ, KEYLIME_DIR=str(self.keylime_dir), KEYLIME_LOGGING_CONFIG=str(self.cfg / "logging.conf"))
        for component in ("verifier", "registrar", "tenant", "ca"):
            env[f"KEYLIME_{component.upper()}_CONFIG"] = str(self.cfg / f"{component}.conf")
        env["BMI_STATE_DIR"] = str(self.root / "bmi")
        env["BMI_TPM_TCTI"] = f"swtpm:path={self.tpm_sock}"
        env.pop("BMI_TPM", None)
        return env

    def make_tpm(self) -> None:
        ca, state = self.root / "ca", self.root / "tpm"
        ca.mkdir()
        state.mkdir()
        (ca / "localca.conf").write_text("".join(f"{k} = {ca / v}\n" for k, v in (
            ("statedir", ""), ("signingkey", "signkey.pem"), ("issuercert", "issuercert.pem"),
            ("certserial", "certserial"))))
        (ca / "localca.options").write_text("--platform-manufacturer bmi\n--platform-version 2.1\n"
                                            "--platform-model test\n")
        (ca / "setup.conf").write_text(f"create_certs_tool = /usr/bin/swtpm_localca\n"
                                       f"create_certs_tool_config = {ca / 'localca.conf'}\n"
                                       f"create_certs_tool_options = {ca / 'localca.options'}\n"
                                       "active_pcr_banks = sha256\n")
        subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
                        "--config", str(ca / "setup.conf"), "--overwrite"], check=True, capture_output=True)
        store = self.root / "tpm_cert_store"
        store.mkdir()
        (store / "bmi-test-localca.pem").write_bytes((ca / "issuercert.pem").read_bytes())
        self.spawn("swtpm", ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                             "--server", f"type=unixio,path={self.tpm_sock}",
                             "--ctrl", f"type=unixio,path={self.tpm_sock}.ctrl",
                             "--flags", "not-need-init,startup-clear", "--log", "file=/dev/null"])
        self.wait_for(lambda: self.tpm_sock.exists(), "swtpm socket")

    def make_config(self) -> None:
        self.cfg.mkdir()
        self.keylime_dir.mkdir()
        templates = next((self.venv / "sdist").glob("keylime-*/templates"))
        subprocess.run([str(self.venv / "bin/keylime_upgrade_config"), "--defaults", "--out", str(self.cfg),
                        "--templates", str(templates)], check=True, capture_output=True, env=self.env())
        p = self.ports
        _set(self.cfg / "verifier.conf", {
            "port": p["verifier"], "registrar_port": p["registrar_tls"], "quote_interval": QUOTE_INTERVAL,
            "max_retries": MAX_RETRIES, "retry_interval": RETRY_INTERVAL, "exponential_backoff": "False",
            "request_timeout": 10})
        _set(self.cfg / "registrar.conf", {"port": p["registrar"], "tls_port": p["registrar_tls"]})
        _set(self.cfg / "tenant.conf", {
            "verifier_port": p["verifier"], "registrar_port": p["registrar_tls"],
            "tpm_cert_store": self.root / "tpm_cert_store", "require_ek_cert": "True",
            "accept_tpm_signing_algs": "['ecdsa', 'ecschnorr', 'rsassa']", "request_timeout": 10,
            "max_retries": 3, "retry_interval": 1})

    def start_keylime(self) -> None:
        self.spawn("verifier", [str(self.venv / "bin/keylime_verifier")])
        self.wait_for(lambda: (self.keylime_dir / "cv_ca/client-cert.crt").exists() and self._listening("verifier"),
                      "the verifier", 60)
        self.spawn("registrar", [str(self.venv / "bin/keylime_registrar")])
        self.wait_for(lambda: self._listening("registrar") and self._listening("registrar_tls"), "the registrar", 60)

    def _listening(self, name: str) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.ports[name])) == 0

    # -- processes ------------------------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(), cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_agent(self, uuid: str) -> subprocess.Popen:
        proc = self.spawn("agent", [str(Path(sys.executable).parent / "bmi"), "keylime-agent", "--uuid", uuid,
                                    "--registrar", f"127.0.0.1:{self.ports['registrar']}",
                                    "--contact", f"127.0.0.1:{self.ports['agent']}",
                                    "--tls-dir", str(self.root / "agent-tls"),
                                    "--trusted-client-ca", str(self.keylime_dir / "cv_ca/cacert.crt")])
        self.wait_for(lambda: b"serving" in self.logs["agent"].read_bytes(), "bmi's agent", 30, proc)
        return proc

    def start_bmid(self, uuid: str) -> subprocess.Popen:
        """bmid --keylime: the agent runs inside bmid, on bmid's TPM link."""
        config = self.root / "keylime.toml"
        values = {"uuid": uuid, "registrar": f"127.0.0.1:{self.ports['registrar']}", "ip": "127.0.0.1",
                  "port": self.ports["agent"], "tls_dir": str(self.root / "agent-tls"),
                  "trusted_client_ca": str(self.keylime_dir / "cv_ca/cacert.crt")}
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        log = self.root / "bmid.log"
        start = log.stat().st_size if log.exists() else 0
        proc = self.spawn("bmid", [str(Path(sys.executable).parent / "bmid"), "--socket", str(self.root / "bmid.sock"),
                                   "--state-dir", str(self.root / "bmid"), "--keylime", str(config)])
        self.wait_for(lambda: b"READY" in log.read_bytes()[start:], "bmid", 30, proc)
        return proc

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in ("agent", "bmid", "verifier", "registrar", "swtpm"):
            self.kill(name)

    def wait_for(self, ok, what: str, timeout: float = 20, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{what} exited ({proc.returncode}):\n{self.tail(what)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not ready after {timeout} s:\n{self.tail(what)}")
            time.sleep(0.1)

    def tail(self, what: str) -> str:
        name = next((n for n in self.logs if n in what), None)
        return self.logs[name].read_text(errors="replace")[-3000:] if name else ""

    # -- tenant and verifier --------------------------------------------------------------------------------
    def tenant(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin/keylime_tenant"), "-v", "127.0.0.1", "-vp",
                               str(self.ports["verifier"]), "-r", "127.0.0.1", "-rp", str(self.ports["registrar_tls"]),
                               *args], capture_output=True, text=True, env=self.env(), timeout=120)

    def add(self, uuid: str, policy: Path) -> None:
        r = self.tenant("-c", "add", "-u", uuid, "-t", "127.0.0.1", "-tp", str(self.ports["agent"]),
                        "--runtime-policy", str(policy))
        assert r.returncode == 0, f"keylime_tenant add failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    def delete(self, uuid: str) -> None:
        self.tenant("-c", "delete", "-u", uuid)
        self.tenant("-c", "regdelete", "-u", uuid)

    def status(self, uuid: str) -> dict:
        """The verifier's view of an agent (GET /v2.x/agents/UUID with the tenant's client certificate)."""
        ca = self.keylime_dir / "cv_ca"
        context = ssl.create_default_context(cafile=str(ca / "cacert.crt"))
        context.check_hostname = False
        context.load_cert_chain(ca / "client-cert.crt", ca / "client-private.pem")
        conn = http.client.HTTPSConnection("127.0.0.1", self.ports["verifier"], context=context, timeout=10)
        try:
            conn.request("GET", f"/v2.1/agents/{uuid}")
            return json.loads(conn.getresponse().read())["results"]
        finally:
            conn.close()
