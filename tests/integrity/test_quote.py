"""Integrity links: real swtpm quotes, offline verification, tampering, tpm2-tools interop."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bmi.errors import IntegrityError, InvalidArgument
from bmi.types import IntegrityReport
from bmi.integrity.verify import verify_report

NONCE = bytes(range(20))
PD = hashlib.sha256(b"a PD image").digest()


def _flip(b: bytes, i: int = -1) -> bytes:
    b = bytearray(b)
    b[i] ^= 0x01
    return bytes(b)


def test_quote_verifies_offline_against_expected_pcrs(service):
    report = service.integrity_link(NONCE, PD, pd_id=4)
    assert report.tpm == "software" and report.pd_id == 4 and report.tvl_pcr == 13
    assert report.pcr_selection == "sha256:0,1,2,3,4,5,6,7,13"
    tvl_value = bytes.fromhex(service.describe()["tvl_pcr_value"])
    assert report.pcr_values[13] == tvl_value != bytes(32)      # the TVL measured itself
    verify_report(report, nonce=NONCE, pd_integrity=PD, pcrs={13: tvl_value, 0: bytes(32)},
                  ak=service.attestation_key().pem)


def _other_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("change, check", [
    (lambda r: {"signature": _flip(r.signature)}, "signature"),
    (lambda r: {"attestation": _flip(r.attestation)}, "signature"),
    (lambda r: {"pubkey": _other_key_pem()}, "signature"),
    (lambda r: {"attestation": r.attestation[:-3]}, "attestation"),
    (lambda r: {"pd_integrity": _flip(r.pd_integrity)}, "PD measurement"),
    (lambda r: {"pcr_values": {**r.pcr_values, 3: b"\x01" * 32}}, "PCR digest"),
    (lambda r: {"pcr_values": {i: v for i, v in r.pcr_values.items() if i != 13}}, "PCR digest"),
    (lambda r: {"pcr_selection": "sha256:0,1,2,3,4,5,6,7"}, "PCR digest"),
])
def test_each_tampered_field_fails_its_check(service, change, check):
    report = service.integrity_link(NONCE, PD)
    tampered = dataclasses.replace(report, **change(report))
    with pytest.raises(IntegrityError, match=f"{check} check failed"):
        verify_report(tampered, nonce=NONCE, pd_integrity=PD, ak=service.attestation_key().fingerprint)


def test_wrong_nonce_changed_image_and_unexpected_pcr_are_refused(service):
    ak = service.attestation_key()
    report = service.integrity_link(NONCE, PD)
    with pytest.raises(IntegrityError, match="nonce check failed"):
        verify_report(report, nonce=b"another nonce", pd_integrity=PD, ak=ak)
    with pytest.raises(IntegrityError, match="PD measurement check failed"):
        verify_report(report, nonce=NONCE, pd_integrity=hashlib.sha256(b"other image").digest(), ak=ak)
    with pytest.raises(IntegrityError, match="PCR value check failed: PCR 13"):
        verify_report(report, nonce=NONCE, pd_integrity=PD, pcrs={13: bytes(32)}, ak=ak)


def test_changed_tvl_pcr_is_refused_by_expected_values(service):
    ak = service.attestation_key()
    before = service.integrity_link(NONCE, PD)
    service.record_pd(1, "pd-1", {"sha256": PD}, extend=True)      # extends the TVL PCR (pd_pcr = tvl_pcr)
    after = service.integrity_link(NONCE, PD)
    verify_report(after, nonce=NONCE, pd_integrity=PD, ak=ak)         # self-consistent ...
    with pytest.raises(IntegrityError, match="PCR value check failed: PCR 13"):
        verify_report(after, nonce=NONCE, pd_integrity=PD, pcrs={13: before.pcr_values[13]}, ak=ak)


@pytest.mark.parametrize("nonce", [b"", bytes(65), "text"])
def test_bad_nonce_is_invalid_argument(service, nonce):
    with pytest.raises(InvalidArgument, match="PD 7: the nonce must be 1..64 bytes") as e:
        service.integrity_link(nonce, PD, pd_id=7)
    assert e.value.pd_id == 7


def test_json_round_trip(service):
    ak = service.attestation_key()
    report = service.integrity_link(NONCE, PD, pd_id=2)
    again = IntegrityReport.from_json(report.to_json())
    assert again == report
    verify_report(again, nonce=NONCE, pd_integrity=PD, ak=ak)
    with pytest.raises(InvalidArgument, match="not a bmi integrity report"):
        IntegrityReport.from_json('{"format": "bmi-integrity-report-v1", "pd_integrity": "zz"}')


@pytest.mark.skipif(shutil.which("tpm2_checkquote") is None, reason="tpm2-tools (tpm2_checkquote) not installed")
def test_tpm2_checkquote_accepts_export(service, tmp_path):
    report = service.integrity_link(NONCE, PD)
    out = report.export_tpm2_tools(tmp_path / "q", nonce=NONCE, ak=service.attestation_key().pem)

    def checkquote(qual: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tpm2_checkquote", "-u", "ak.pub.pem", "-m", "quote.msg", "-s", "quote.sig",
                               "-f", "quote.pcrs", "-g", "sha256", "-q", qual],
                              cwd=out, capture_output=True, text=True, timeout=30)

    ok = checkquote((out / "qualification.hex").read_text())
    assert ok.returncode == 0, ok.stderr
    assert report.pcr_values[13].hex() in ok.stdout.lower()
    bad = checkquote(hashlib.sha256(b"wrong" + PD).hexdigest())
    assert bad.returncode != 0
