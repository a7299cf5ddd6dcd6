"""Spec data structures (BMI v0.1 section 7.5) and enums.

Plain dataclasses so they print, compare and serialise without ceremony.
The ground floor: imports only bmi.errors and bmi.units (the integrity
export helper lazily, when it is called).
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument
from .units import parse_size

READ = 1
WRITE = 2
RW = READ | WRITE


class _NamedIntEnum(enum.IntEnum):
    """An IntEnum that prints as its name: `print(pd.get_current_status())` reads PAUSED, not 4."""

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


class PDStatus(_NamedIntEnum):
    """Life-cycle states of a protection domain (spec 7.2.4)."""

    ALLOCATED = 1
    READY = 2
    RUNNING = 3
    PAUSED = 4
    SUSPENDED = 5
    SHUTDOWN = 6
    CRASHED = 7
    RESTARTING = 8
    DESTROYED = 9


class ConnectionType(_NamedIntEnum):
    """Kinds of inter-PD connection (spec 4.4)."""

    IPC = 1
    STREAM = 2
    SHM = 3
    EVENT = 4


@dataclass(frozen=True)
class PDDescription:
    """Resource requirements of a new PD (spec 7.5.6).

    mem: hard memory limit in bytes, or a size as the parameters take it
    ("64M"), held as int bytes from construction on.  cpu: number of CPUs.
    performance: the share of those CPUs the PD may use, in percent (1..100).
    """

    mem: int
    cpu: int = 1
    performance: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.mem, str):
            object.__setattr__(self, "mem", parse_size(self.mem, what="PDDescription.mem"))


@dataclass(frozen=True)
class ConnectionPolicy:
    """An allowed connection type and direction (spec 7.5.1)."""

    con_type: ConnectionType
    mode: int = RW


@dataclass(frozen=True)
class ConnectionIntegrityPolicy(ConnectionPolicy):
    """A connection policy that also names the destination's measurement (7.5.2)."""

    dest: bytes = b""


@dataclass(frozen=True)
class IntegrityPolicy:
    """What a PD must be for its protected credentials to be released (7.5.4)."""

    pd_integrity: bytes
    pd_connections: tuple[ConnectionIntegrityPolicy, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ProtectedCredentials:
    """The plaintext inside a protected-credentials blob (7.5.5)."""

    secret: bytes
    policy_validation: bytes


@dataclass(frozen=True)
class RuntimeCapability:
    """A runtime parameter name and whether it can be read / written (7.5.7)."""

    name: str
    read: bool
    write: bool


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
        own extraData.  quote.pcrs is tpm2-tools' "serialized" layout.
        """
        from .integrity.signature import export_tpm2_tools      # needs cryptography: only when asked
        return export_tpm2_tools(self, directory, nonce=nonce, ak=ak)


__all__ = [
    "READ", "WRITE", "RW", "PDStatus", "ConnectionType", "PDDescription",
    "ConnectionPolicy", "ConnectionIntegrityPolicy", "IntegrityPolicy",
    "ProtectedCredentials", "RuntimeCapability", "IntegrityReport",
]
