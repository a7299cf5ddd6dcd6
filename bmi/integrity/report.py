"""IntegrityReport: what get_integrity_link returns and a verifier reads."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IntegrityReport:
    """Spec 7.5.3 plus what an offline verifier needs.

    pd_integrity: SHA-256 of the PD image.  pubkey: the attestation key
    (PEM SubjectPublicKeyInfo).  signature: marshalled TPMT_SIGNATURE.
    attestation: marshalled TPMS_ATTEST (the quoted structure).
    pcr_selection: e.g. "sha256:0,1,2,3,4,5,6,7,16".  pcr_values: index ->
    digest.  tpm: "hardware" or "software".
    """

    pd_integrity: bytes
    pubkey: bytes
    signature: bytes
    attestation: bytes = b""
    pcr_selection: str = ""
    pcr_values: dict[int, bytes] = field(default_factory=dict)
    hash_alg: str = "sha256"
    tpm: str = ""
