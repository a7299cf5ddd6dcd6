"""The attestation key (AK) a verifier pins, and how a pinned key is given.

A report carries the key that signed it, so that key proves nothing by
itself: anyone can re-sign a report with a key of their own.  A verifier
trusts only the AK it obtained earlier over a channel it trusts
(enrolment: `mgr.get_attestation_key()`, `bmi tpm`) and passes it in as
the PEM, a `cryptography` public key, or the fingerprint.

Needs only `cryptography` (a verifier has no TPM).
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Union

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from ..errors import InvalidArgument
from . import wire

PublicKeyType = Union[ec.EllipticCurvePublicKey, rsa.RSAPublicKey]
#: What `ak=` accepts: PEM (str or bytes), a public key, a fingerprint "sha256:<hex>", an AttestationKey.
PinnedKey = Union[str, bytes, PublicKeyType, "AttestationKey"]
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
#: TPMA_OBJECT bits an AK must have: its private part never left this TPM, it signs only TPM-made data.
AK_ATTRIBUTES = (wire.FIXED_TPM | wire.FIXED_PARENT | wire.SENSITIVE_DATA_ORIGIN | wire.RESTRICTED | wire.SIGN)


def fingerprint(key: PublicKeyType) -> str:
    """`sha256:<hex>` of the DER SubjectPublicKeyInfo."""
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def to_pem(key: PublicKeyType) -> str:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def load_pem(pem: str | bytes, what: str) -> PublicKeyType:
    """A PEM SubjectPublicKeyInfo of an ECC or RSA key; InvalidArgument saying what is wrong."""
    try:
        return _load(pem.encode("ascii") if isinstance(pem, str) else bytes(pem))[0]
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise InvalidArgument(f"{what}: {e}") from None


@functools.lru_cache(maxsize=64)
def _load(pem: bytes) -> tuple[PublicKeyType, str]:
    """(key, fingerprint): a verifier sees the same few keys again and again (keys are immutable)."""
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key ({e})") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise ValueError(f"a {type(key).__name__} is not a TPM attestation key (ECC or RSA)")
    return key, fingerprint(key)


def pem_fingerprint(pem: str | bytes, what: str) -> str:
    """fingerprint(load_pem(pem)), cached."""
    load_pem(pem, what)
    return _load(pem.encode("ascii") if isinstance(pem, str) else bytes(pem))[1]


@dataclass(frozen=True)
class AttestationKey:
    """The manager's AK and the endorsement key (EK) it was created under.

    pem / fingerprint: what a verifier pins.  public_area: the AK's
    marshalled TPMT_PUBLIC (its TPM name is sha256 over it), which shows
    it is a restricted signing key.  ek_pem / ek_public_area: the EK's
    public part, to make a credential only this TPM can activate
    (`bmi.integrity.verify.make_credential`).  ek_certificate: the
    manufacturer's EK certificate (PEM) from the TPM's NV, else None.
    """

    pem: str
    fingerprint: str
    public_area: bytes = b""
    ek_pem: str = ""
    ek_public_area: bytes = b""
    ek_certificate: str | None = None
    tpm: str = ""

    @classmethod
    def from_public_areas(cls, ak_area: bytes, ek_area: bytes, ek_certificate: str | None,
                          tpm: str) -> "AttestationKey":
        ak, ek = wire.parse_public(ak_area, "AK TPMT_PUBLIC"), wire.parse_public(ek_area, "EK TPMT_PUBLIC")
        return cls(to_pem(ak.key), fingerprint(ak.key), bytes(ak_area), to_pem(ek.key), bytes(ek_area),
                   ek_certificate, tpm)

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready form (bmid and the PD channel carry it)."""
        return {"pem": self.pem, "fingerprint": self.fingerprint, "public_area": self.public_area.hex(),
                "ek_pem": self.ek_pem, "ek_public_area": self.ek_public_area.hex(),
                "ek_certificate": self.ek_certificate, "tpm": self.tpm}

    @classmethod
    def from_wire(cls, doc: Any) -> "AttestationKey":
        """Rebuild from to_wire(); the fingerprint and PEMs are recomputed, not taken on trust."""
        try:
            return cls.from_public_areas(bytes.fromhex(doc["public_area"]), bytes.fromhex(doc["ek_public_area"]),
                                         doc.get("ek_certificate"), str(doc.get("tpm", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidArgument(f"attestation key: malformed reply: {type(e).__name__}: {e}") from None


def check_ak_public(public_area: bytes) -> wire.PublicKey:
    """The AK's TPMT_PUBLIC parsed; ValueError unless it is a restricted signing key fixed to its TPM."""
    ak = wire.parse_public(public_area, "AK TPMT_PUBLIC")
    missing = AK_ATTRIBUTES & ~ak.attributes
    if missing or ak.attributes & wire.DECRYPT:
        raise ValueError(f"AK TPMT_PUBLIC: attributes 0x{ak.attributes:08x} are not those of a restricted "
                         f"signing key that never left its TPM (need 0x{AK_ATTRIBUTES:08x}, no decrypt)")
    return ak


@dataclass(frozen=True)
class Pin:
    """A resolved `ak=`: either a key, or only a fingerprint the report's key must have."""

    key: PublicKeyType | None
    fingerprint: str


def resolve(ak: Any, what: str) -> Pin:
    """Turn what the caller passed as `ak=` into a Pin; InvalidArgument for any other type or a bad value."""
    if isinstance(ak, AttestationKey):
        ak = ak.pem
    if isinstance(ak, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        return Pin(ak, fingerprint(ak))
    if isinstance(ak, str) and ak.strip().lower().startswith("sha256:"):
        fp = ak.strip().lower()
        if not _FINGERPRINT.fullmatch(fp):
            raise InvalidArgument(f"{what}: ak {ak[:80]!r} is not a fingerprint sha256:<64 hex digits>")
        return Pin(None, fp)
    if isinstance(ak, (str, bytes, bytearray)):
        return Pin(load_pem(ak, f"{what}: ak"), pem_fingerprint(ak, f"{what}: ak"))
    raise InvalidArgument(f"{what}: ak must be the AK's PEM (str or bytes), a cryptography public key or its "
                          f"fingerprint 'sha256:<hex>', not {type(ak).__name__}")
