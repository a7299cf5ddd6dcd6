"""Protected credentials against a real swtpm: seal, offline wrap, unseal, refusals."""
from __future__ import annotations

import hashlib

import pytest

from bmi.errors import IntegrityError, InvalidArgument
from bmi.integrity.credentials import parse_blob
from bmi.integrity.service import policy_digest
from bmi.integrity.verify import wrap_credentials
from bmi.types import ConnectionIntegrityPolicy, ConnectionType, IntegrityPolicy

PD = hashlib.sha256(b"image").digest()
PEER = hashlib.sha256(b"peer image").digest()
POLICY = IntegrityPolicy(PD, (ConnectionIntegrityPolicy(ConnectionType.IPC, 3, PEER),
                              ConnectionIntegrityPolicy(ConnectionType.SHM, 1, PEER)))


def test_policy_digest_is_canonical():
    swapped = IntegrityPolicy(PD, tuple(reversed(POLICY.pd_connections)))
    assert policy_digest(swapped) == policy_digest(POLICY)
    assert policy_digest(IntegrityPolicy(PEER, POLICY.pd_connections)) != policy_digest(POLICY)
    other_mode = IntegrityPolicy(PD, (ConnectionIntegrityPolicy(ConnectionType.IPC, 1, PEER),))
    assert policy_digest(other_mode) != policy_digest(IntegrityPolicy(PD, POLICY.pd_connections[:1]))
    with pytest.raises(InvalidArgument, match="pd_integrity"):
        policy_digest(IntegrityPolicy(b""))


@pytest.mark.parametrize("make", ["seal", "wrap"])
def test_seal_or_wrap_then_unseal(service, make):
    secret = b"s3cret" * 100                                   # larger than a TPM sealed object holds
    blob = service.seal(POLICY, secret) if make == "seal" else \
        wrap_credentials(POLICY, secret, service.storage_public())
    creds = service.unseal(blob, pd_id=5)
    assert creds.secret == secret
    assert creds.policy_validation == policy_digest(POLICY)


@pytest.mark.parametrize("make", ["seal", "wrap"])
def test_refused_after_tvl_pcr_changes(service, make):
    blob = service.seal(POLICY, b"x") if make == "seal" else wrap_credentials(POLICY, b"x", service.storage_public())
    service.record_pd(9, "pd-9", {"sha256": PD}, extend=True)    # the TVL PCR moves on
    with pytest.raises(IntegrityError, match="PD 3: .*TVL PCRs .* differ") as e:
        service.unseal(blob, pd_id=3)
    assert e.value.pd_id == 3


def _tamper_ciphertext(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


def _tamper_public(blob: bytes) -> bytes:
    p = parse_blob(blob)
    i = blob.index(p.public) + len(p.public) - 1               # the last byte of unique
    return blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:]


def _other_selection(blob: bytes) -> bytes:
    return blob.replace(b"sha256:0,1,2,3,4,5,6,7,13", b"sha256:0,1,2,3,4,5,6,7,14")


@pytest.mark.parametrize("garble, why", [
    (lambda b: b"", "bad magic"),
    (lambda b: b"BMICRED1", "truncated"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b"\0" * len(b), "bad magic"),
    (_tamper_ciphertext, "altered"),
    (_tamper_public, "TPM (import|load)"),
    (_other_selection, "sealed to sha256:0,1,2,3,4,5,6,7,14"),
])
@pytest.mark.parametrize("make", ["seal", "wrap"])
def test_garbage_blobs_are_integrity_errors(service, make, garble, why):
    blob = service.seal(POLICY, b"x") if make == "seal" else wrap_credentials(POLICY, b"x", service.storage_public())
    with pytest.raises(IntegrityError, match=why):
        service.unseal(garble(blob))
    assert service.unseal(blob).secret == b"x"                 # the TPM was left in a usable state


def test_wrap_rejects_bad_storage_public(service):
    with pytest.raises(InvalidArgument, match="storage public"):
        wrap_credentials(POLICY, b"x", b"{}")
    with pytest.raises(InvalidArgument, match="secret must be bytes"):
        wrap_credentials(POLICY, "x", service.storage_public())


def test_blob_from_another_tpm_is_refused(service, tmp_path_factory):
    from bmi.integrity.service import IntegrityService
    with IntegrityService.open(config={"state_dir": str(tmp_path_factory.mktemp("other")), "tpm": "swtpm"}) as other:
        blob = other.seal(POLICY, b"not for you")
        wrapped = wrap_credentials(POLICY, b"not for you", other.storage_public())
    for b in (blob, wrapped):
        with pytest.raises(IntegrityError):
            service.unseal(b)
