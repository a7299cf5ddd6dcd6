"""TPM 2.0 wire formats in pure Python (big-endian, TPM Library Part 2).

Verifiers and remote parties that wrap credentials must not need a TPM or
the tss2 libraries, only `cryptography`: this module parses quotes and
signatures and builds the objects and duplication blobs TPM2_Import takes.
Every parse error is a ValueError naming the structure.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFHMAC, Mode

try:        # AES-CFB is what TPM duplication uses; newer cryptography files it under "decrepit"
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography < 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB

ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
ALG_NAMES = {v: k for k, v in ALG_IDS.items()}
ALG_KEYEDHASH = 0x0008
ALG_NULL = 0x0010
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023
ALG_AES = 0x0006
ALG_CFB = 0x0043
ECC_NIST_P256 = 0x0003
TPM_GENERATED = 0xFF544347
ST_ATTEST_QUOTE = 0x8018
CC_POLICY_PCR = 0x0000017F

# TPMA_OBJECT bits
NO_DA = 1 << 10
RESTRICTED = 1 << 16
DECRYPT = 1 << 17

_CRYPTO_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256,
                "sha384": hashes.SHA384, "sha512": hashes.SHA512}


class Reader:
    """Bounds-checked cursor over a marshalled structure."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = bytes(data), 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.what}: truncated at byte {self.pos} (wanted {n} more)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def tpm2b(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("TPM2B payload longer than 65535 bytes")
    return struct.pack(">H", len(data)) + data


# ---- PCR selections ------------------------------------------------------

def parse_selection(text: str) -> tuple[str, tuple[int, ...]]:
    """'sha256:0,1,13' -> ('sha256', (0, 1, 13)); one bank only."""
    bank, sep, rest = text.partition(":")
    if not sep or bank not in ALG_IDS:
        raise ValueError(f"PCR selection {text!r}: expected BANK:N,N,... with BANK in {sorted(ALG_IDS)}")
    try:
        pcrs = tuple(sorted({int(x) for x in rest.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"PCR selection {text!r}: PCR indexes must be integers") from None
    if not pcrs or pcrs[0] < 0 or pcrs[-1] > 23:
        raise ValueError(f"PCR selection {text!r}: need PCR indexes in 0..23")
    return bank, pcrs


def format_selection(bank: str, pcrs: tuple[int, ...] | list[int]) -> str:
    return f"{bank}:" + ",".join(str(i) for i in sorted(pcrs))


def marshal_selection(bank: str, pcrs: tuple[int, ...]) -> bytes:
    """TPML_PCR_SELECTION with one TPMS_PCR_SELECTION (3-byte bitmap)."""
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, ALG_IDS[bank], 3) + bytes(bitmap)


def _read_selection(r: Reader) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for _ in range(r.u32()):
        alg, size = r.u16(), r.u8()
        bitmap = r.take(size)
        pcrs = tuple(i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
        out.append((ALG_NAMES.get(alg, f"0x{alg:04x}"), pcrs))
    return out


def pcr_composite(bank: str, values: list[bytes]) -> bytes:
    """The digest a quote and PolicyPCR put over PCR values in index order."""
    return hashlib.new(bank, b"".join(values)).digest()


def policy_pcr_digest(bank: str, pcrs: tuple[int, ...], values: list[bytes]) -> bytes:
    """authPolicy after one TPM2_PolicyPCR from a fresh (all-zero) policy."""
    h = hashlib.sha256()
    h.update(bytes(32) + struct.pack(">I", CC_POLICY_PCR) + marshal_selection(bank, pcrs))
    h.update(pcr_composite(bank, values))
    return h.digest()


# ---- quotes -----------------------------------------------------------------

@dataclass(frozen=True)
class Quote:
    """The fields of a TPMS_ATTEST of type quote a verifier checks."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    selection: list[tuple[str, tuple[int, ...]]]
    pcr_digest: bytes


def parse_quote(attest: bytes) -> Quote:
    r = Reader(attest, "TPMS_ATTEST")
    magic, typ = r.u32(), r.u16()
    signer, extra = r.tpm2b(), r.tpm2b()
    r.take(8 + 4 + 4 + 1)            # clockInfo: clock, resetCount, restartCount, safe
    r.u64()                          # firmwareVersion
    if typ != ST_ATTEST_QUOTE:
        raise ValueError(f"TPMS_ATTEST: type 0x{typ:04x} is not a quote")
    selection = _read_selection(r)
    digest = r.tpm2b()
    r.end()
    return Quote(magic, typ, signer, extra, selection, digest)


def ecdsa_der(signature: bytes) -> tuple[str, bytes]:
    """TPMT_SIGNATURE (ECDSA) -> (hash name, DER signature for cryptography)."""
    r = Reader(signature, "TPMT_SIGNATURE")
    alg = r.u16()
    if alg != ALG_ECDSA:
        raise ValueError(f"TPMT_SIGNATURE: algorithm 0x{alg:04x} is not ECDSA")
    halg = r.u16()
    if halg not in ALG_NAMES:
        raise ValueError(f"TPMT_SIGNATURE: unknown hash 0x{halg:04x}")
    sig_r, sig_s = r.tpm2b(), r.tpm2b()
    r.end()
    return ALG_NAMES[halg], encode_dss_signature(int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big"))


def crypto_hash(name: str) -> hashes.HashAlgorithm:
    return _CRYPTO_HASH[name]()


# ---- objects for TPM2_Create / TPM2_Import ----------------------------------

@dataclass(frozen=True)
class EccStorageKey:
    """A parent's TPMT_PUBLIC as far as duplication needs it."""

    public_area: bytes       # marshalled TPMT_PUBLIC (for its name)
    name_alg: str
    attributes: int
    sym_bits: int
    point: ec.EllipticCurvePublicKey

    @property
    def name(self) -> bytes:
        return struct.pack(">H", ALG_IDS[self.name_alg]) + hashlib.new(self.name_alg, self.public_area).digest()


def parse_storage_key(public_area: bytes) -> EccStorageKey:
    """Parse a marshalled TPMT_PUBLIC that must be a restricted ECC P-256 decrypt key with AES-CFB."""
    r = Reader(public_area, "storage key TPMT_PUBLIC")
    typ, name_alg, attrs = r.u16(), r.u16(), r.u32()
    r.tpm2b()                                            # authPolicy
    if typ != ALG_ECC or name_alg not in ALG_NAMES:
        raise ValueError("storage key: not an ECC key with a known name algorithm")
    sym, bits, mode = r.u16(), r.u16(), r.u16()
    scheme, curve, kdf = r.u16(), r.u16(), r.u16()
    x, y = r.tpm2b(), r.tpm2b()
    r.end()
    need = RESTRICTED | DECRYPT
    if attrs & need != need or (sym, mode) != (ALG_AES, ALG_CFB) or curve != ECC_NIST_P256 \
            or scheme != ALG_NULL or kdf != ALG_NULL:
        raise ValueError("storage key: not a restricted P-256 decryption key with AES-CFB")
    point = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                          ec.SECP256R1()).public_key()
    return EccStorageKey(bytes(public_area), ALG_NAMES[name_alg], attrs, bits, point)


def sealed_object(data: bytes, auth_policy: bytes) -> tuple[bytes, bytes]:
    """(TPMT_PUBLIC, TPMT_SENSITIVE) of a policy-only keyedhash data object to duplicate.

    fixedTPM/fixedParent stay clear (TPM2_Import requires it) and
    userWithAuth too: only the policy can authorise its use.
    """
    seed = os.urandom(32)
    public = (struct.pack(">HHI", ALG_KEYEDHASH, ALG_IDS["sha256"], NO_DA) + tpm2b(auth_policy)
              + struct.pack(">H", ALG_NULL) + tpm2b(hashlib.sha256(seed + data).digest()))
    sensitive = struct.pack(">H", ALG_KEYEDHASH) + tpm2b(b"") + tpm2b(seed) + tpm2b(data)
    return public, sensitive


def object_name(public_area: bytes) -> bytes:
    return struct.pack(">H", ALG_IDS["sha256"]) + hashlib.sha256(public_area).digest()


def kdfa(alg: str, key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    return KBKDFHMAC(algorithm=crypto_hash(alg), mode=Mode.CounterMode, length=bits // 8, rlen=4,
                     llen=4, location=CounterLocation.BeforeFixed, label=label, context=context,
                     fixed=None).derive(key)


def duplicate(parent: EccStorageKey, public_area: bytes, sensitive: bytes) -> tuple[bytes, bytes]:
    """TPM2 duplication (Part 1, 23.3) without inner wrapper.

    Returns (duplicate, inSymSeed) as the buffers of TPM2B_PRIVATE and
    TPM2B_ENCRYPTED_SECRET: an ephemeral ECDH with the parent gives the
    seed (KDFe, label DUPLICATE), which keys the AES-CFB outer wrap
    (KDFa STORAGE) and its HMAC (KDFa INTEGRITY).
    """
    eph = ec.generate_private_key(ec.SECP256R1())
    size = 32
    en, pn = eph.public_key().public_numbers(), parent.point.public_numbers()
    ex, ey, px = en.x.to_bytes(size, "big"), en.y.to_bytes(size, "big"), pn.x.to_bytes(size, "big")
    z = eph.exchange(ec.ECDH(), parent.point)
    digest_bits = hashlib.new(parent.name_alg).digest_size * 8
    seed = ConcatKDFHash(algorithm=crypto_hash(parent.name_alg), length=digest_bits // 8,
                         otherinfo=b"DUPLICATE\0" + ex + px).derive(z)
    name = object_name(public_area)
    sym_key = kdfa(parent.name_alg, seed, b"STORAGE", name, parent.sym_bits)
    enc = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    dup_sensitive = enc.update(tpm2b(sensitive)) + enc.finalize()
    hmac_key = kdfa(parent.name_alg, seed, b"INTEGRITY", b"", digest_bits)
    outer = hmac.new(hmac_key, dup_sensitive + name, parent.name_alg).digest()
    return tpm2b(outer) + dup_sensitive, tpm2b(ex) + tpm2b(ey)
