"""IntegrityReport: what get_integrity_link returns and a verifier reads."""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, InvalidArgument

FORMAT = "bmi-integrity-report-v1"


@dataclass
class IntegrityReport:
    """Spec 7.5.3 plus what an offline verifier needs.

    pd_integrity: SHA-256 of the PD image.  pubkey: the attestation key
    (PEM SubjectPublicKeyInfo).  signature: marshalled TPMT_SIGNATURE.
    attestation: marshalled TPMS_ATTEST (the quoted structure).
    pcr_selection: e.g. "sha256:0,1,2,3,4,5,6,7,13".  pcr_values: index ->
    digest.  tpm: "hardware" or "software".  pd_id: the PD reported on
    (None: no PD, e.g. the TVL alone).  tvl_pcr: which selected PCR holds
    the TVL's self-measurement.
    """

    pd_integrity: bytes
    pubkey: bytes
    signature: bytes
    attestation: bytes = b""
    pcr_selection: str = ""
    pcr_values: dict[int, bytes] = field(default_factory=dict)
    hash_alg: str = "sha256"
    tpm: str = ""
    pd_id: int | None = None
    tvl_pcr: int | None = None

    def to_json(self) -> str:
        """Self-describing JSON (binary fields hex, the PEM as text) to carry between machines."""
        return json.dumps({
            "format": FORMAT, "pd_integrity": self.pd_integrity.hex(), "pubkey": self.pubkey.decode("ascii"),
            "signature": self.signature.hex(), "attestation": self.attestation.hex(),
            "pcr_selection": self.pcr_selection,
            "pcr_values": {str(i): v.hex() for i, v in sorted(self.pcr_values.items())},
            "hash_alg": self.hash_alg, "tpm": self.tpm, "pd_id": self.pd_id, "tvl_pcr": self.tvl_pcr,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "IntegrityReport":
        """Parse to_json output; InvalidArgument saying which field is wrong."""
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
            return cls(
                pd_integrity=bytes.fromhex(doc["pd_integrity"]), pubkey=doc["pubkey"].encode("ascii"),
                signature=bytes.fromhex(doc["signature"]), attestation=bytes.fromhex(doc["attestation"]),
                pcr_selection=str(doc["pcr_selection"]),
                pcr_values={int(i): bytes.fromhex(v) for i, v in doc["pcr_values"].items()},
                hash_alg=str(doc["hash_alg"]), tpm=str(doc["tpm"]),
                pd_id=None if doc.get("pd_id") is None else int(doc["pd_id"]),
                tvl_pcr=None if doc.get("tvl_pcr") is None else int(doc["tvl_pcr"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidArgument(f"IntegrityReport.from_json: not a bmi integrity report: "
                                  f"{type(e).__name__}: {e}") from None

    def export_tpm2_tools(self, directory: str | Path, *, nonce: bytes | None = None, ak: Any = None) -> Path:
        """Write quote.msg, quote.sig, quote.pcrs, ak.pub.pem, qualification.hex for tpm2_checkquote.

        ak.pub.pem is the pinned `ak` (PEM, public key or fingerprint, as
        for verify_report) once the signature is checked against it
        (IntegrityError if not); without `ak` it is the key the report
        carries, with a warning: tpm2_checkquote then proves nothing about
        who signed.  qualification.hex is SHA-256(nonce || pd_integrity)
        when `nonce` is given (what the verifier expects), else the quote's
        own extraData.  quote.pcrs is tpm2-tools' "serialized" layout: the
        C structs TPML_PCR_SELECTION, a u32 count and that many TPML_DIGEST,
        in little-endian host layout.
        """
        from . import keys, verify, wire      # not at import time: bmi.types imports this module
        what = "export_tpm2_tools"
        key = verify.signing_key(self, ak, trust_report_key=ak is None, what=what)
        why = None if ak is None else verify.check_signature(self, key)
        if why is not None:
            raise IntegrityError(f"{what}: signature check failed: {why}", pd_id=self.pd_id)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        bank, pcrs = wire.parse_selection(self.pcr_selection)
        if nonce is None:
            qual = wire.parse_quote(self.attestation).extra_data
        else:
            qual = hashlib.sha256(nonce + self.pd_integrity).digest()
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
                v = self.pcr_values[chunk[n]] if n < len(chunk) else b""
                digests += struct.pack("<H", len(v)) + v.ljust(64, b"\0")
        (out / "quote.msg").write_bytes(self.attestation)
        (out / "quote.sig").write_bytes(self.signature)
        (out / "quote.pcrs").write_bytes(sel + digests)
        (out / "ak.pub.pem").write_text(keys.to_pem(key))
        (out / "qualification.hex").write_text(qual.hex())
        return out
