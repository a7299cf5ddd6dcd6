"""End to end: a stock Keylime 7.14.3 verifier attests bmi's agent and the PD launches on its TPM.

Runs under `make test-keylime` (which builds the Keylime venv and sets BMI_KEYLIME_VENV).
"""
from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import busybox_path

from .site import MAX_RETRIES, QUOTE_INTERVAL, RETRY_INTERVAL, Site

VENV = os.environ.get("BMI_KEYLIME_VENV", "")
pytestmark = [
    pytest.mark.skipif(not VENV, reason="needs Keylime 7.14.3: run `make test-keylime`"),
    pytest.mark.skipif(shutil.which("swtpm_setup") is None, reason="swtpm-tools (swtpm_setup) is not installed"),
]
STATES = {3: "Get Quote", 4: "Get Quote (retry)", 7: "Failed", 9: "Invalid Quote", 10: "Tenant Quote Failed"}
AGENT, FRESH = "d432fbb3-d2f1-4a97-9ef7-75bd81c00001", "d432fbb3-d2f1-4a97-9ef7-75bd81c00002"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(Path(VENV), Path(tmp_path_factory.mktemp("kl")))
    try:
        s.make_tpm()
        s.make_config()
        s.start_keylime()
        yield s
    finally:
        s.stop()


def bmi_cli(site: Site, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "bmi"), *args], capture_output=True, text=True,
                          env=site.env(), timeout=120)


def launch(site: Site, name: str | None, image: Path) -> None:
    """Run an image as a PD (to completion) on the site's TPM, the way any bmi manager would."""
    code = ("import bmi,sys\n"
            "with bmi.open() as m:\n"
            " pd = m.allocate_pd(bmi.PDDescription(mem=16 << 20))\n"
            " pd.setup_pd(bmi.FileImage(sys.argv[1]))\n"
            " pd.set_config_param('/boot/cmdline', 'busybox true')\n"
            " if sys.argv[2]: pd.set_config_param('/name', sys.argv[2])\n"
            " pd.request_status_change(bmi.PDStatus.RUNNING)\n"
            " pd.wait(10)\n")
    r = subprocess.run([sys.executable, "-c", code, str(image), name or ""], capture_output=True, text=True,
                       env=site.env(), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def wait_state(site: Site, uuid: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = site.status(uuid)
        if STATES.get(status.get("operational_state")) == state:
            return status
        time.sleep(0.3)
    raise AssertionError(f"agent {uuid} did not reach {state}: {status}\n{site.tail('verifier')}")


def quote_latencies(site: Site, n: int = 50) -> tuple[float, float]:
    """Median seconds: the verifier's integrity-quote request to the agent (its mTLS client certificate, a
    new connection each poll, as the verifier does) and a raw tpm2-pytss quote of the same PCRs, same swtpm."""
    import http.client
    import ssl

    from bmi.integrity.service import IntegrityService
    ca = site.keylime_dir / "cv_ca"
    context = ssl.create_default_context(cafile=str(site.root / "agent-tls/agent-cert.pem"))
    context.check_hostname = False
    context.load_cert_chain(ca / "client-cert.crt", ca / "client-private.pem")
    polls = []
    for i in range(n):
        start = time.perf_counter()
        conn = http.client.HTTPSConnection("127.0.0.1", site.ports["agent"], context=context, timeout=10)
        conn.request("GET", f"/v2.2/quotes/integrity?nonce=latency{i:013d}&mask=0x400&partial=1&ima_ml_entry=0")
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()
        reply.read()
        conn.close()
        polls.append(time.perf_counter() - start)
    env = site.env()
    saved = {k: os.environ.get(k) for k in ("BMI_STATE_DIR", "BMI_TPM_TCTI")}
    os.environ.update({k: env[k] for k in saved})
    try:
        with IntegrityService.open() as service:
            raw = []
            for i in range(n):
                start = time.perf_counter()
                service.tpm.quote("sha256:10,16", f"raw{i:017d}".encode())
                raw.append(time.perf_counter() - start)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return statistics.median(polls), statistics.median(raw)


def attested_after_launch(site: Site, uuid: str, since: dict, name: str, image: Path) -> dict:
    """Launch a PD; the verifier keeps attesting the host ("Get Quote", attestation count grows)."""
    launch(site, name, image)
    time.sleep(4 * QUOTE_INTERVAL)
    status = wait_state(site, uuid, "Get Quote")
    assert status["attestation_count"] > since["attestation_count"], status
    return status


def test_fleet_attestation(site, tmp_path, capsys):
    try:
        scenario(site, tmp_path, capsys)
    finally:
        site.kill("agent")
        site.kill("bmid")


def scenario(site: Site, tmp_path: Path, capsys) -> None:
    image = Path(busybox_path())
    rogue = tmp_path / "rogue-busybox"
    rogue.write_bytes(image.read_bytes() + b"\0not in the policy")
    rogue.chmod(0o755)
    policy = tmp_path / "policy.json"
    r = bmi_cli(site, "keylime-policy", "--image", f"web={image}", "-o", str(policy))
    assert r.returncode == 0, r.stderr

    # Only listed PDs launch: the verifier keeps quoting, the count grows.
    agent = site.start_agent(AGENT)
    launch(site, "web", image)
    site.add(AGENT, policy)
    later = attested_after_launch(site, AGENT, wait_state(site, AGENT, "Get Quote"), "web", image)

    # SIGKILL of the agent, restart within the retry window: the persisted list still explains PCR 10.
    site.kill("agent", signal.SIGKILL)
    time.sleep(2 * RETRY_INTERVAL)
    site.start_agent(AGENT)
    attested_after_launch(site, AGENT, later, "web", image)
    assert MAX_RETRIES * RETRY_INTERVAL > 2 * RETRY_INTERVAL

    verifier_s, raw_s = quote_latencies(site)
    with capsys.disabled():
        print(f"\nquote latency, median of 50: verifier's request to bmi's agent {verifier_s * 1000:.1f} ms, "
              f"raw tpm2-pytss quote {raw_s * 1000:.2f} ms (same swtpm)")

    # An unlisted PD launches: the verifier notices.
    launch(site, "rogue", rogue)
    failed = wait_state(site, AGENT, "Invalid Quote")
    assert "ima.validation.ima-ng.not_in_allowlist" in str(failed.get("last_event_id")), failed

    # A fresh agent, re-added with a policy that lists the new PD: attested again.
    site.kill("agent")
    site.delete(AGENT)
    updated = tmp_path / "updated.json"
    r = bmi_cli(site, "keylime-policy", "--image", f"web={image}", "--image", f"rogue={rogue}", "-o", str(updated))
    assert r.returncode == 0, r.stderr
    site.start_bmid(FRESH)                      # this time the agent runs in bmid
    site.add(FRESH, updated)
    grown = attested_after_launch(site, FRESH, wait_state(site, FRESH, "Get Quote"), "web", image)

    # SIGKILL of bmid (and the agent in it), restart within the retry window: still attested.
    site.kill("bmid", signal.SIGKILL)
    site.start_bmid(FRESH)
    attested_after_launch(site, FRESH, grown, "rogue", rogue)
