"""The AK: rooted in this TPM's EK (hierarchy, qualified name, credential activation), pinned by verifiers."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import struct
import subprocess

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_public_key

from bmi.errors import IntegrityError, InvalidArgument
from bmi.integrity import keys, wire
from bmi.integrity.service import IntegrityService
from bmi.integrity.tpm import AK_HANDLE, OLD_AK_HANDLE, Swtpm
from bmi.integrity.verify import UnpinnedKeyWarning, make_credential, verify_report

NONCE = b"attestation key test"
PD = hashlib.sha256(b"image").digest()
TPM_RH_ENDORSEMENT = 0x4000000B


def _qualified_name(parent_qn: bytes, public_area: bytes) -> bytes:
    """Part 1, 16.6: QN(object) = nameAlg || H(QN(parent) || Name(object))."""
    digest = hashlib.sha256(parent_qn + wire.object_name(public_area)).digest()
    return struct.pack(">H", wire.ALG_IDS["sha256"]) + digest


def test_ak_is_a_restricted_signing_key_under_the_ek(service):
    ak = service.attestation_key()
    parsed = keys.check_ak_public(ak.public_area)        # fixedTPM, fixedParent, restricted, sign, no decrypt
    assert parsed.type == wire.ALG_ECC and parsed.curve == wire.ECC_NIST_P256 and parsed.scheme == wire.ALG_ECDSA
    assert keys.fingerprint(parsed.key) == ak.fingerprint == keys.fingerprint(load_pem_public_key(ak.pem.encode()))
    ek = wire.parse_public(ak.ek_public_area)
    assert ek.attributes & wire.RESTRICTED and ek.attributes & wire.DECRYPT and keys.to_pem(ek.key) == ak.ek_pem
    # The TPM puts the signer's qualified name into every quote: it names the AK's parent chain,
    # endorsement hierarchy -> this EK -> this AK.
    ek_qn = _qualified_name(struct.pack(">I", TPM_RH_ENDORSEMENT), ak.ek_public_area)
    quote = wire.parse_quote(service.integrity_link(NONCE, PD).attestation)
    assert quote.qualified_signer == _qualified_name(ek_qn, ak.public_area)


def test_quotes_carry_the_real_reset_counts(service):
    """An AK outside the endorsement hierarchy gets obfuscated reset/restart counts; ours does not."""
    quote = wire.parse_quote(service.integrity_link(NONCE, PD).attestation)
    assert quote.reset_count == service._tpm.reset_count()
    assert quote.restart_count == 0


def test_credential_activation_round_trip(service):
    """What Keylime's registrar does: a secret only this TPM, with this AK beside its EK, recovers."""
    secret = b"registrar nonce 0123456789abcdef"
    blob, encrypted = make_credential(service.attestation_key(), secret)
    assert service.activate_credential(blob, encrypted) == secret
    blob2, encrypted2 = make_credential(service.attestation_key(), secret)
    assert (blob2, encrypted2) != (blob, encrypted)        # a fresh seed every time
    with pytest.raises(IntegrityError, match="refused the credential"):
        service.activate_credential(blob[:-1] + bytes([blob[-1] ^ 1]), encrypted)
    assert service._tpm.transient_handles() == []


def test_credential_for_a_foreign_ek_or_ak_is_not_activated(service, tmp_path_factory):
    with IntegrityService.open(config={"state_dir": str(tmp_path_factory.mktemp("other")), "tpm": "swtpm"}) as other:
        mine, theirs = service.attestation_key(), other.attestation_key()
        assert mine.ek_pem != theirs.ek_pem and mine.fingerprint != theirs.fingerprint
        foreign_ek = dataclasses.replace(mine, ek_public_area=theirs.ek_public_area)
        with pytest.raises(IntegrityError, match="refused the credential"):
            service.activate_credential(*make_credential(foreign_ek, b"s"))
        # our EK, their AK: the credential names an AK this TPM does not hold
        foreign_ak = dataclasses.replace(theirs, ek_public_area=mine.ek_public_area)
        with pytest.raises(IntegrityError, match="refused the credential"):
            service.activate_credential(*make_credential(foreign_ak, b"s"))
        assert other.activate_credential(*make_credential(theirs, b"s")) == b"s"


def test_make_credential_checks_the_ak_it_vouches_for(service):
    ak = service.attestation_key()
    storage = service._tpm.storage_public_area            # a decryption key is no AK
    with pytest.raises(InvalidArgument, match="not those of a restricted signing key"):
        make_credential(dataclasses.replace(ak, public_area=storage), b"s")
    other = keys.fingerprint(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(InvalidArgument, match="is not the key"):
        make_credential(dataclasses.replace(ak, fingerprint=other), b"s")
    for bad in (b"", bytes(33), "text"):
        with pytest.raises(InvalidArgument, match="1..32 bytes"):
            make_credential(ak, bad)
    with pytest.raises(InvalidArgument, match="expected an AttestationKey"):
        make_credential(ak.pem, b"s")


def test_attestation_key_wire_round_trip(service):
    ak = service.attestation_key()
    assert keys.AttestationKey.from_wire(ak.to_wire()) == ak
    lying = {**ak.to_wire(), "fingerprint": "sha256:" + "0" * 64, "pem": "x"}
    assert keys.AttestationKey.from_wire(lying) == ak        # recomputed from the public area
    with pytest.raises(InvalidArgument, match="malformed reply"):
        keys.AttestationKey.from_wire({"public_area": "zz"})


def test_an_older_bmis_owner_hierarchy_ak_is_replaced(state_dir):
    """A TPM state from bmi < 0.2 holds an AK that is a primary of the owner hierarchy at 0x81000B11."""
    from tpm2_pytss import ESAPI, ESYS_TR, TCTILdr, TPM2_ALG, TPM2_CAP, TPM2_HC, TPM2B_PUBLIC, TPMT_SIG_SCHEME
    from bmi.integrity.tpm import _TEMPLATES
    swtpm = Swtpm.attach(state_dir / "tpm")
    tcti = TCTILdr("swtpm", f"path={swtpm.sock}")
    esys = ESAPI(tcti)
    try:
        spec, attrs = _TEMPLATES[AK_HANDLE]
        old = esys.create_primary(None, TPM2B_PUBLIC.parse(spec, objectAttributes=attrs), ESYS_TR.OWNER)[0]
        esys.evict_control(ESYS_TR.OWNER, old, OLD_AK_HANDLE)
        attest, _ = esys.quote(old, "sha256:0", b"q", TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
        esys.flush_context(old)
        obfuscated = wire.parse_quote(bytes(attest))
        real = int(esys.read_clock().clockInfo.resetCount)
        assert obfuscated.reset_count != real           # the old AK's quotes hide the reset count
        with IntegrityService.open(config={"state_dir": str(state_dir), "tpm": "swtpm"}) as svc:
            quote = wire.parse_quote(svc.integrity_link(NONCE, PD).attestation)
            assert quote.reset_count == real
            assert svc.activate_credential(*make_credential(svc.attestation_key(), b"s")) == b"s"
        _, caps = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.PERSISTENT_FIRST, 64)
        persistent = [int(h) for h in caps.data.handles]
        assert OLD_AK_HANDLE not in persistent and AK_HANDLE in persistent
    finally:
        esys.close()
        tcti.close()
        swtpm.detach()


@pytest.mark.parametrize("ak", [123, object(), ["pem"], {"pem": "x"}, 1.5])
def test_ak_of_another_type_is_invalid_argument(service, ak):
    with pytest.raises(InvalidArgument, match="ak must be the AK's PEM"):
        verify_report(service.integrity_link(NONCE, PD), nonce=NONCE, pd_integrity=PD, ak=ak)


@pytest.mark.parametrize("ak, match", [("not a pem", "not a PEM public key"), (b"", "not a PEM public key"),
                                       ("sha256:12", "not a fingerprint"), ("SHA256:" + "g" * 64, "not a fingerprint")])
def test_malformed_ak_is_invalid_argument(service, ak, match):
    with pytest.raises(InvalidArgument, match=match):
        verify_report(service.integrity_link(NONCE, PD), nonce=NONCE, pd_integrity=PD, ak=ak)


def test_each_form_of_the_pinned_key_verifies(service):
    ak = service.attestation_key()
    report = service.integrity_link(NONCE, PD)
    key = load_pem_public_key(ak.pem.encode())
    for pinned in (ak.pem, ak.pem.encode(), key, ak.fingerprint, ak.fingerprint.upper().replace("SHA", "sha"), ak):
        verify_report(report, nonce=NONCE, pd_integrity=PD, ak=pinned)
    with pytest.raises(InvalidArgument, match="not both"):
        verify_report(report, nonce=NONCE, pd_integrity=PD, ak=ak.pem, trust_report_key=True)


def test_unpinned_is_refused_and_trusting_the_report_warns(service):
    report = service.integrity_link(NONCE, PD)
    with pytest.raises(IntegrityError, match=r"no attestation key pinned: pass ak= \(CLI: --ak"):
        verify_report(report, nonce=NONCE, pd_integrity=PD)
    with pytest.warns(UnpinnedKeyWarning, match="trusting the attestation key the report carries"):
        verify_report(report, nonce=NONCE, pd_integrity=PD, trust_report_key=True)


def test_export_writes_the_pinned_key_and_warns_without_one(service, tmp_path):
    ak = service.attestation_key()
    report = service.integrity_link(NONCE, PD)
    report.export_tpm2_tools(tmp_path / "pinned", ak=ak.fingerprint)
    assert (tmp_path / "pinned" / "ak.pub.pem").read_text() == ak.pem
    with pytest.warns(UnpinnedKeyWarning):
        report.export_tpm2_tools(tmp_path / "unpinned")
    assert (tmp_path / "unpinned" / "ak.pub.pem").read_bytes() == report.pubkey
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(IntegrityError, match="signature check failed"):
        report.export_tpm2_tools(tmp_path / "other", ak=other)
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(shutil.which("tpm2_checkquote") is None, reason="tpm2-tools (tpm2_checkquote) not installed")
def test_tpm2_checkquote_accepts_the_pinned_export(service, tmp_path):
    report = service.integrity_link(NONCE, PD)
    out = report.export_tpm2_tools(tmp_path / "q", nonce=NONCE, ak=service.attestation_key())
    done = subprocess.run(["tpm2_checkquote", "-u", "ak.pub.pem", "-m", "quote.msg", "-s", "quote.sig", "-f",
                           "quote.pcrs", "-g", "sha256", "-q", (out / "qualification.hex").read_text()],
                          cwd=out, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _self_signed_der() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test EK certificate")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


def test_only_an_rsa_ek_certificate_gives_an_rsa_ek(state_dir):
    """A TPM whose NV holds only an RSA EK certificate (as many shipped ones do): the AK goes under the RSA EK."""
    from tpm2_pytss import ESAPI, TCTILdr, TPM2_ALG, TPM2B_NV_PUBLIC, TPMA_NV, TPMS_NV_PUBLIC
    from bmi.integrity.tpm import EK_CERT_INDEXES
    der = _self_signed_der()
    swtpm = Swtpm.attach(state_dir / "tpm")
    tcti = TCTILdr("swtpm", f"path={swtpm.sock}")
    esys = ESAPI(tcti)
    try:
        padded = der + bytes(16)                       # NV areas are often larger than the certificate
        index = esys.nv_define_space(None, TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
            nvIndex=EK_CERT_INDEXES["EK-RSA2048"], nameAlg=TPM2_ALG.SHA256,
            attributes=TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.NO_DA, dataSize=len(padded))))
        for offset in range(0, len(padded), 512):
            esys.nv_write(index, padded[offset:offset + 512], offset)
        with IntegrityService.open(config={"state_dir": str(state_dir), "tpm": "swtpm"}) as svc:
            ak = svc.attestation_key()
            assert wire.parse_public(ak.ek_public_area).type == wire.ALG_RSA
            assert load_pem_public_key(ak.ek_pem.encode()).key_size == 2048
            assert ak.ek_certificate is not None and "BEGIN CERTIFICATE" in ak.ek_certificate
            assert x509_der(ak.ek_certificate) == der
            assert svc.activate_credential(*make_credential(ak, b"rsa ek")) == b"rsa ek"   # OAEP seed
            verify_report(svc.integrity_link(NONCE, PD), nonce=NONCE, pd_integrity=PD, ak=ak)
    finally:
        esys.close()
        tcti.close()
        swtpm.detach()


def x509_der(pem: str) -> bytes:
    from cryptography import x509
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
