"""Forged integrity reports: a verifier trusts only the AK it pinned beforehand, never the key a report carries.

The forger takes a genuine report of this machine, makes up a PD digest,
rewrites the quote's qualifying data for it and re-signs the quote with a
P-256 key of their own.  Each test is one attempt to get such a report
accepted: through bmi.verify_report, export_tpm2_tools + tpm2_checkquote,
and the `bmi verify` command (a real subprocess), pinned and not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

import bmi
from bmi.integrity import wire
from tests.helpers import busybox_path

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")

NONCE = b"verifier's fresh nonce"
MADE_UP = hashlib.sha256(b"the image the forger claims runs").digest()


@dataclasses.dataclass
class Case:
    genuine: bmi.IntegrityReport
    forged: bmi.IntegrityReport
    ak: bmi.integrity.keys.AttestationKey        # what the verifier enrolled earlier
    image_digest: bytes


def _forge(report: bmi.IntegrityReport, *, keep_pubkey: bool = False) -> bmi.IntegrityReport:
    """The report re-signed by a fresh key, its quote bound to MADE_UP and NONCE."""
    a = report.attestation
    r = wire.Reader(a, "TPMS_ATTEST")
    r.take(6)
    r.tpm2b()                                       # qualifiedSigner stays as it was
    start = r.pos
    r.tpm2b()                                       # extraData: replaced
    attestation = a[:start] + wire.tpm2b(hashlib.sha256(NONCE + MADE_UP).digest()) + a[r.pos:]
    key = ec.generate_private_key(ec.SECP256R1())
    sig_r, sig_s = decode_dss_signature(key.sign(attestation, ec.ECDSA(hashes.SHA256())))
    signature = struct.pack(">HH", wire.ALG_ECDSA, wire.ALG_IDS["sha256"]) + \
        wire.tpm2b(sig_r.to_bytes(32, "big")) + wire.tpm2b(sig_s.to_bytes(32, "big"))
    pubkey = report.pubkey if keep_pubkey else key.public_key().public_bytes(Encoding.PEM,
                                                                            PublicFormat.SubjectPublicKeyInfo)
    return dataclasses.replace(report, attestation=attestation, signature=signature, pubkey=pubkey,
                               pd_integrity=MADE_UP)


@pytest.fixture
def case(tmgr):
    image = Path(busybox_path()).read_bytes()
    pd = tmgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    pd.setup_pd(bmi.BytesImage(image))
    ak = tmgr.get_attestation_key()
    genuine = pd.get_integrity_link(NONCE)
    forged = _forge(genuine)
    with pytest.warns(UserWarning):         # the forgery is self-consistent: only the pin catches it
        bmi.verify_report(forged, nonce=NONCE, pd_integrity=MADE_UP, trust_report_key=True)
    return Case(genuine, forged, ak, hashlib.sha256(image).digest())


# -- the API -------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["pem", "pem-bytes", "key", "fingerprint"])
def test_forged_report_is_refused_pinned(case, form):
    pinned = {"pem": case.ak.pem, "pem-bytes": case.ak.pem.encode(), "key": load_pem_public_key(case.ak.pem.encode()),
              "fingerprint": case.ak.fingerprint}[form]
    with pytest.raises(bmi.IntegrityError, match="signature check failed: the report names the key .* not the "
                                                  "pinned AK"):
        bmi.verify_report(case.forged, nonce=NONCE, pd_integrity=MADE_UP, ak=pinned)
    bmi.verify_report(case.genuine, nonce=NONCE, pd_integrity=case.image_digest, ak=pinned)


def test_forged_report_keeping_the_genuine_key_is_refused_pinned(case):
    forged = _forge(case.genuine, keep_pubkey=True)
    for pinned in (case.ak.pem, case.ak.fingerprint):
        with pytest.raises(bmi.IntegrityError, match="signature check failed: the quote is not signed by the AK"):
            bmi.verify_report(forged, nonce=NONCE, pd_integrity=MADE_UP, ak=pinned)


def test_forged_report_is_refused_unpinned(case):
    with pytest.raises(bmi.IntegrityError, match="no attestation key pinned: pass ak="):
        bmi.verify_report(case.forged, nonce=NONCE, pd_integrity=MADE_UP)


def test_genuine_report_of_another_tpm_is_refused(case, tmp_path_factory):
    """A real quote of the claimed image, but from the forger's own machine (another TPM, another AK)."""
    from bmi.integrity.service import IntegrityService
    config = {"state_dir": str(tmp_path_factory.mktemp("forger")), "tpm": "swtpm"}
    with IntegrityService.open(config=config) as forger:
        theirs = forger.integrity_link(NONCE, MADE_UP)
    bmi.verify_report(theirs, nonce=NONCE, pd_integrity=MADE_UP, ak=theirs.pubkey)    # a real TPM quote ...
    with pytest.raises(bmi.IntegrityError, match="not the pinned AK"):
        bmi.verify_report(theirs, nonce=NONCE, pd_integrity=MADE_UP, ak=case.ak.fingerprint)


def test_forged_report_cannot_be_exported_with_the_pinned_key(case, tmp_path):
    with pytest.raises(bmi.IntegrityError, match="signature check failed"):
        case.forged.export_tpm2_tools(tmp_path / "forged", nonce=NONCE, ak=case.ak)
    assert not (tmp_path / "forged").exists()


@pytest.mark.skipif(shutil.which("tpm2_checkquote") is None, reason="tpm2-tools (tpm2_checkquote) not installed")
def test_tpm2_checkquote_with_the_pinned_key_refuses_the_forgery(case, tmp_path):
    def checkquote(out, ak_pem: str) -> int:
        (out / "pinned.pem").write_text(ak_pem)
        return subprocess.run(["tpm2_checkquote", "-u", "pinned.pem", "-m", "quote.msg", "-s", "quote.sig", "-f",
                               "quote.pcrs", "-g", "sha256", "-q", (out / "qualification.hex").read_text()],
                              cwd=out, capture_output=True, timeout=30).returncode
    with pytest.warns(UserWarning):
        forged = case.forged.export_tpm2_tools(tmp_path / "forged", nonce=NONCE)   # writes the forger's key
    assert checkquote(forged, (forged / "ak.pub.pem").read_text()) == 0        # ... which tpm2-tools accepts
    assert checkquote(forged, case.ak.pem) != 0
    genuine = case.genuine.export_tpm2_tools(tmp_path / "genuine", nonce=NONCE, ak=case.ak.pem)
    assert checkquote(genuine, case.ak.pem) == 0


# -- `bmi verify` ----------------------------------------------------------------------------------
def _bmi_verify(tmp_path, report: bmi.IntegrityReport, digest: bytes, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "report.json").write_text(report.to_json())
    return subprocess.run([sys.executable, "-m", "bmi.cli", "verify", str(tmp_path / "report.json"), "--nonce",
                           NONCE.hex(), "--expect-digest", digest.hex(), *extra],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("pin", ["file", "fingerprint", "none"])
@pytest.mark.parametrize("as_json", [False, True])
def test_bmi_verify_refuses_the_forgery(case, tmp_path, pin, as_json):
    (tmp_path / "ak.pem").write_text(case.ak.pem)
    args = {"file": ["--ak", str(tmp_path / "ak.pem")], "fingerprint": ["--ak", case.ak.fingerprint],
            "none": []}[pin] + (["--json"] if as_json else [])
    done = _bmi_verify(tmp_path, case.forged, MADE_UP, *args)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    error = json.loads(done.stdout)["error"] if as_json else done.stdout
    assert ("--ak" if pin == "none" else "not the pinned AK") in error
    assert "OK" not in done.stdout and '"ok": true' not in done.stdout


@pytest.mark.parametrize("as_json", [False, True])
def test_bmi_verify_passes_the_genuine_report_only_pinned(case, tmp_path, as_json):
    flag = ["--json"] if as_json else []
    done = _bmi_verify(tmp_path, case.genuine, case.image_digest, "--ak", case.ak.fingerprint, *flag)
    assert done.returncode == 0, done
    assert (json.loads(done.stdout)["ok"] is True) if as_json else done.stdout.startswith("OK: ")
    unpinned = _bmi_verify(tmp_path, case.genuine, case.image_digest, *flag)
    assert unpinned.returncode == 1 and "--ak" in unpinned.stdout
    trusted = _bmi_verify(tmp_path, case.genuine, case.image_digest, "--trust-report-key", *flag)
    assert trusted.returncode == 0 and trusted.stderr.startswith("WARNING: ")
    if as_json:
        assert json.loads(trusted.stdout)["trusted_report_key"] is True
