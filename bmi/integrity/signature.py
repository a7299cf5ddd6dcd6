"""Which key signed an integrity report, and the report in tpm2-tools' files.

Imports nothing of bmi above errors, keys and wire: bmi.types's
IntegrityReport calls export_tpm2_tools from here (lazily).
"""
from __future__ import annotations

import hashlib
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import IntegrityError, InvalidArgument
from . import keys, wire
from .keys import PublicKeyType

if TYPE_CHECKING:
    from ..types import IntegrityReport


UNPINNED = ("no attestation key pinned: pass ak= (CLI: --ak FILE|FINGERPRINT) with the AK you enrolled "
            "beforehand over a channel you trust (mgr.get_attestation_key(), `bmi tpm`); the key inside a "
            "report proves nothing, anyone can re-sign a report with their own. Only trust_report_key=True "
            "(CLI: --trust-report-key) accepts the report's own key")


class UnpinnedKeyWarning(UserWarning):
    """A report was checked against the key it carries itself (trust_report_key=True)."""


def signing_key(report: IntegrityReport, ak: object = None, *, trust_report_key: bool = False,
                what: str = "verify_report") -> PublicKeyType:
    """The key the report's signature must verify with: the pinned one, or (loudly) the report's own.

    IntegrityError when nothing is pinned and trust_report_key is not set,
    or when the report's key is not the pinned AK.
    """
    if ak is not None and trust_report_key:
        raise InvalidArgument(f"{what}: give ak= or trust_report_key=True, not both")
    if ak is None and not trust_report_key:
        raise IntegrityError(f"{what}: {UNPINNED}", pd_id=report.pd_id)
    pin = keys.resolve(ak, what) if ak is not None else None
    try:
        carried = keys.load_pem(report.pubkey, f"{what}: the report's key")
        carried_fp = keys.pem_fingerprint(report.pubkey, f"{what}: the report's key")
    except InvalidArgument as e:
        raise IntegrityError(f"{what}: signature check failed: {e}", pd_id=report.pd_id) from None
    if pin is None:
        warnings.warn(f"{what}: trusting the attestation key the report carries ({carried_fp}): "
                      "anyone can forge such a report; pin the AK with ak=", UnpinnedKeyWarning, stacklevel=3)
    elif carried_fp != pin.fingerprint:
        raise IntegrityError(f"{what}: signature check failed: the report names the key "
                             f"{carried_fp}, not the pinned AK {pin.fingerprint}", pd_id=report.pd_id)
    return pin.key if pin is not None and pin.key is not None else carried


def check_signature(report: IntegrityReport, key: PublicKeyType) -> str | None:
    """None if `key` signed report.attestation (ECDSA TPMT_SIGNATURE), else why not."""
    try:
        halg, der = wire.ecdsa_der(report.signature)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return "the attestation key is not an ECC key"
        key.verify(der, report.attestation, ec.ECDSA(wire.crypto_hash(halg)))
    except InvalidSignature:
        return f"the quote is not signed by the AK {keys.fingerprint(key)}"
    except (ValueError, TypeError) as e:
        return str(e)
    return None



def export_tpm2_tools(report: "IntegrityReport", directory: str | Path, *, nonce: bytes | None = None,
                      ak: Any = None) -> Path:
    """IntegrityReport.export_tpm2_tools (bmi/types.py says what each file holds).

    quote.pcrs is tpm2-tools' "serialized" layout: the C structs
    TPML_PCR_SELECTION, a u32 count and that many TPML_DIGEST, in
    little-endian host layout.
    """
    what = "export_tpm2_tools"
    key = signing_key(report, ak, trust_report_key=ak is None, what=what)
    why = None if ak is None else check_signature(report, key)
    if why is not None:
        raise IntegrityError(f"{what}: signature check failed: {why}", pd_id=report.pd_id)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    bank, pcrs = wire.parse_selection(report.pcr_selection)
    if nonce is None:
        qual = wire.parse_quote(report.attestation).extra_data
    else:
        qual = hashlib.sha256(nonce + report.pd_integrity).digest()
    bitmap = bytearray(4)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    sel = struct.pack("<IHB", 1, wire.ALG_IDS[bank], 3) + bytes(bitmap) + b"\0"
    sel += bytes(8 * 15)
    chunks = [pcrs[i:i + 8] for i in range(0, len(pcrs), 8)]
    digests = struct.pack("<I", len(chunks))
    for chunk in chunks:
        digests += struct.pack("<I", len(chunk))
        for n in range(8):
            v = report.pcr_values[chunk[n]] if n < len(chunk) else b""
            digests += struct.pack("<H", len(v)) + v.ljust(64, b"\0")
    (out / "quote.msg").write_bytes(report.attestation)
    (out / "quote.sig").write_bytes(report.signature)
    (out / "quote.pcrs").write_bytes(sel + digests)
    (out / "ak.pub.pem").write_text(keys.to_pem(key))
    (out / "qualification.hex").write_text(qual.hex())
    return out
