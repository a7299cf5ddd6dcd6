"""Integrity through bmid: reports and sealed credentials that survive bmid's SIGKILL and restart."""
from __future__ import annotations

import hashlib
import shutil

import pytest

import bmi
from bmi import IntegrityPolicy
from tests.helpers import busybox_path
from tests.server.bmid import running_bmid

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")


@pytest.fixture
def daemon(tmp_path):
    with running_bmid(tmp_path, tpm=True) as d:
        yield d


def _digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def test_reports_and_credentials_survive_a_bmid_crash(daemon):
    measured = _digest(busybox_path())
    policy = IntegrityPolicy(measured)
    with daemon.open() as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        pd.setup_pd(bmi.FileImage(busybox_path()))
        pd.set_config_param("/boot/cmdline", "busybox sleep 100")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        ak = mgr.get_attestation_key()               # enrolment: pinned before the crash
        before = pd.get_integrity_link(b"before")
        assert before.pubkey.decode() == ak.pem and ak.tpm == "software"
        bmi.verify_report(before, nonce=b"before", pd_integrity=measured, ak=ak.fingerprint)
        blob = mgr.seal_credentials(policy, b"kept across restarts")
        assert pd.get_protected_credentials(policy, blob) == b"kept across restarts"
        pd_id = pd.get_pd_id()
    daemon.kill()
    daemon.start()
    with daemon.open() as mgr:
        pd = mgr.get_controller(pd_id)
        assert pd.get_current_status() is bmi.PDStatus.RUNNING
        after = pd.get_integrity_link(b"after")
        assert after.pd_integrity == measured and after.pubkey == before.pubkey
        assert after.pcr_values == before.pcr_values          # the TVL is unchanged: no second extend
        assert mgr.get_attestation_key() == ak
        bmi.verify_report(after, nonce=b"after", pd_integrity=measured, ak=ak.pem)
        with pytest.raises(bmi.IntegrityError, match="nonce"):
            bmi.verify_report(after, nonce=b"before", pd_integrity=measured, ak=ak.pem)
        assert pd.get_protected_credentials(policy, blob) == b"kept across restarts"
        other = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        other.setup_pd(bmi.BytesImage(open(busybox_path(), "rb").read() + b"\0"))
        assert other.get_protected_credentials(policy, blob) == b""      # another image: refused
        assert pd.get_protected_credentials(policy, blob[:-1] + bytes([blob[-1] ^ 1])) == b""
