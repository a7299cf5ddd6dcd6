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


def test_fleet_attestation(site, tmp_path):
    image = Path(busybox_path())
    other = tmp_path / "other-busybox"
    other.write_bytes(image.read_bytes() + b"\0unlisted")
    other.chmod(0o755)
    policy = tmp_path / "policy.json"
    r = bmi_cli(site, "keylime-policy", "--image", f"web={image}", "-o", str(policy))
    assert r.returncode == 0, r.stderr

    agent = site.start_agent(AGENT)
    launch(site, "web", image)
    site.add(AGENT, policy)
    first = wait_state(site, AGENT, "Get Quote")
    launch(site, "web", image)
    time.sleep(3 * QUOTE_INTERVAL)
    later = wait_state(site, AGENT, "Get Quote")
    assert later["attestation_count"] > first["attestation_count"]
    assert agent.poll() is None
