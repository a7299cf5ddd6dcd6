"""Protected-credentials formats: the policy hash, the sealed blob, the storage public.

Shared by the TPM side (seal/unseal) and the offline side (wrap), so the
two always agree.  A TPM sealed object holds at most 128 bytes, so the TPM
seals a fresh AES-256 key under PolicyPCR on the TVL PCRs and the
ProtectedCredentials ride AES-GCM-encrypted next to it, authenticated
together with every other byte of the blob.

Blob (all integers big-endian, TPM2B = u16 length + bytes):
    b"BMICRED1" | u8 kind (1 = created by this TPM, 2 = duplicated offline)
    | TPM2B pcr-selection text | TPM2B TPMT_PUBLIC | TPM2B private-or-duplicate
    | TPM2B inSymSeed (empty for kind 1) | 12-byte GCM nonce | GCM ciphertext
Plaintext: TPM2B policy_validation | the secret.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import InvalidArgument
from ..types import ConnectionType, IntegrityPolicy, ProtectedCredentials
from . import wire

MAGIC = b"BMICRED1"
KIND_CREATED, KIND_DUPLICATED = 1, 2
MAX_SECRET = 1 << 20
STORAGE_PUBLIC_FORMAT = "bmi-storage-public-v1"


def policy_digest(policy: IntegrityPolicy) -> bytes:
    """SHA-256 over the canonical encoding of an IntegrityPolicy.

    Encoding: b"bmi.IntegrityPolicy.v1\\0" | u16 len | pd_integrity | u16 n
    | the n connections, each u8 con_type | u8 mode | u16 len | dest,
    sorted by their encoding (the list is a set: order must not matter).
    """
    if not isinstance(policy, IntegrityPolicy):
        raise InvalidArgument(f"policy_digest: expected an IntegrityPolicy, got {type(policy).__name__}")
    pd = policy.pd_integrity
    if not isinstance(pd, bytes) or not 0 < len(pd) <= 64:
        raise InvalidArgument("policy_digest: policy.pd_integrity must be 1..64 bytes (an image digest)")
    entries = []
    for c in policy.pd_connections:
        if not isinstance(c.dest, bytes) or len(c.dest) > 64 or c.mode not in (1, 2, 3) \
                or c.con_type not in tuple(ConnectionType):
            raise InvalidArgument(f"policy_digest: bad connection policy {c!r} (need a ConnectionType, "
                                  "mode 1..3 and dest of at most 64 bytes)")
        entries.append(struct.pack(">BB", int(c.con_type), c.mode) + wire.tpm2b(c.dest))
    body = b"bmi.IntegrityPolicy.v1\0" + wire.tpm2b(pd) + struct.pack(">H", len(entries))
    return hashlib.sha256(body + b"".join(sorted(entries))).digest()


@dataclass(frozen=True)
class Blob:
    kind: int
    selection: str
    public: bytes
    private: bytes
    seed: bytes
    nonce: bytes
    ciphertext: bytes

    def header(self) -> bytes:
        return (MAGIC + bytes([self.kind]) + wire.tpm2b(self.selection.encode()) + wire.tpm2b(self.public)
                + wire.tpm2b(self.private) + wire.tpm2b(self.seed))

    def to_bytes(self) -> bytes:
        return self.header() + self.nonce + self.ciphertext


def parse_blob(data: bytes) -> Blob:
    """ValueError saying what is wrong when `data` is not a bmi credentials blob."""
    if not isinstance(data, (bytes, bytearray)) or not bytes(data).startswith(MAGIC):
        raise ValueError("not a bmi protected-credentials blob (bad magic)")
    r = wire.Reader(bytes(data)[len(MAGIC):], "credentials blob")
    kind = r.u8()
    if kind not in (KIND_CREATED, KIND_DUPLICATED):
        raise ValueError(f"credentials blob: unknown kind {kind}")
    selection = r.tpm2b().decode("ascii", "replace")
    wire.parse_selection(selection)
    public, private, seed = r.tpm2b(), r.tpm2b(), r.tpm2b()
    nonce = r.take(12)
    ciphertext = r.data[r.pos:]
    if len(ciphertext) < 16 + 2:
        raise ValueError("credentials blob: ciphertext truncated")
    return Blob(kind, selection, public, private, seed, nonce, ciphertext)


def check_secret(secret: bytes, what: str) -> None:
    if not isinstance(secret, (bytes, bytearray)):
        raise InvalidArgument(f"{what}: secret must be bytes, got {type(secret).__name__}")
    if len(secret) > MAX_SECRET:
        raise InvalidArgument(f"{what}: secret is {len(secret)} bytes, at most {MAX_SECRET} allowed")


def seal_payload(blob_without_ct: Blob, key: bytes, policy: IntegrityPolicy, secret: bytes) -> bytes:
    """Encrypt ProtectedCredentials(secret, policy_digest(policy)) into the finished blob."""
    plain = wire.tpm2b(policy_digest(policy)) + bytes(secret)
    ct = AESGCM(key).encrypt(blob_without_ct.nonce, plain, blob_without_ct.header())
    return replace(blob_without_ct, ciphertext=ct).to_bytes()


def open_payload(blob: Blob, key: bytes) -> ProtectedCredentials:
    plain = AESGCM(key).decrypt(blob.nonce, blob.ciphertext, blob.header())
    r = wire.Reader(plain, "protected credentials")
    validation = r.tpm2b()
    return ProtectedCredentials(secret=r.data[r.pos:], policy_validation=validation)


def new_blob(kind: int, selection: str, public: bytes, private: bytes, seed: bytes) -> Blob:
    return Blob(kind, selection, public, private, seed, os.urandom(12), b"")


def encode_storage_public(public_area: bytes, selection: str, values: dict[int, bytes]) -> bytes:
    """JSON the remote party feeds to wrap_credentials: the storage key and the PCR state to seal to."""
    return json.dumps({"format": STORAGE_PUBLIC_FORMAT, "public": public_area.hex(),
                       "pcr_selection": selection,
                       "pcr_values": {str(i): v.hex() for i, v in sorted(values.items())}},
                      indent=1).encode()


def decode_storage_public(data: bytes) -> tuple[wire.PublicKey, str, list[bytes]]:
    """(parent key, selection text, PCR values in selection order); ValueError if malformed."""
    try:
        doc = json.loads(bytes(data))
        if doc.get("format") != STORAGE_PUBLIC_FORMAT:
            raise ValueError(f"format is not {STORAGE_PUBLIC_FORMAT!r}")
        key = wire.parse_storage_key(bytes.fromhex(doc["public"]))
        bank, pcrs = wire.parse_selection(doc["pcr_selection"])
        values = [bytes.fromhex(doc["pcr_values"][str(i)]) for i in pcrs]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"storage public: {e}") from None
    return key, wire.format_selection(bank, pcrs), values
