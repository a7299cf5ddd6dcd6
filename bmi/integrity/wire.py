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
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFHMAC, Mode

try:        # AES-CFB is what TPM duplication uses; newer cryptography files it under "decrepit"
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography < 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB

#: The TPM's hash algorithms (TPM_ALG_ID) by name: the one list of them in Python; the banks bmi measures
#: with (bmi.integrity.measure.SUPPORTED_BANKS, from csrc/measure/measure.h) are among them.
ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
ALG_NAMES = {v: k for k, v in ALG_IDS.items()}
ALG_KEYEDHASH = 0x0008
ALG_NULL = 0x0010
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023
ALG_RSA = 0x0001
ALG_AES = 0x0006
ALG_CFB = 0x0043
ECC_NIST_P256 = 0x0003
TPM_GENERATED = 0xFF544347
ST_ATTEST_QUOTE = 0x8018
CC_POLICY_PCR = 0x0000017F

# TPMA_OBJECT bits
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
NO_DA = 1 << 10
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18

_CRYPTO_HASH = {name: getattr(hashes, name.upper()) for name in ALG_IDS}


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
    reset_count: int = 0        # obfuscated by the TPM unless the signer is in the endorsement hierarchy
    restart_count: int = 0


def parse_quote(attest: bytes) -> Quote:
    r = Reader(attest, "TPMS_ATTEST")
    magic, typ = r.u32(), r.u16()
    signer, extra = r.tpm2b(), r.tpm2b()
    r.u64()                          # clockInfo: clock, resetCount, restartCount, safe
    resets, restarts = r.u32(), r.u32()
    r.u8()
    r.u64()                          # firmwareVersion
    if typ != ST_ATTEST_QUOTE:
        raise ValueError(f"TPMS_ATTEST: type 0x{typ:04x} is not a quote")
    selection = _read_selection(r)
    digest = r.tpm2b()
    r.end()
    return Quote(magic, typ, signer, extra, selection, digest, resets, restarts)


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
class PublicKey:
    """A key's TPMT_PUBLIC as far as verifiers, MakeCredential and duplication need it."""

    public_area: bytes       # marshalled TPMT_PUBLIC (for its name)
    type: int                # ALG_ECC or ALG_RSA
    name_alg: str
    attributes: int
    sym_alg: int             # ALG_NULL for signing keys
    sym_bits: int
    sym_mode: int
    scheme: int              # ALG_NULL, ALG_ECDSA, ...
    scheme_hash: int
    curve: int               # 0 for RSA
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey

    @property
    def name(self) -> bytes:
        return struct.pack(">H", ALG_IDS[self.name_alg]) + hashlib.new(self.name_alg, self.public_area).digest()

    @property
    def point(self) -> ec.EllipticCurvePublicKey:
        if not isinstance(self.key, ec.EllipticCurvePublicKey):
            raise ValueError("TPMT_PUBLIC: not an ECC key")
        return self.key


_CURVES = {ECC_NIST_P256: ec.SECP256R1, 0x0004: ec.SECP384R1, 0x0005: ec.SECP521R1}


def parse_public(public_area: bytes, what: str = "TPMT_PUBLIC") -> PublicKey:
    """Parse a marshalled TPMT_PUBLIC of an ECC or RSA key (Part 2, 12.2.4)."""
    r = Reader(public_area, what)
    typ, name_alg, attrs = r.u16(), r.u16(), r.u32()
    r.tpm2b()                                            # authPolicy
    if typ not in (ALG_ECC, ALG_RSA) or name_alg not in ALG_NAMES:
        raise ValueError(f"{what}: not an ECC or RSA key with a known name algorithm")
    sym, bits, mode = r.u16(), 0, 0
    if sym != ALG_NULL:
        bits, mode = r.u16(), r.u16()
    scheme, scheme_hash = r.u16(), 0
    if scheme != ALG_NULL:
        scheme_hash = r.u16()
        if scheme == 0x001A:                             # ECDAA carries a count too
            r.u16()
    if typ == ALG_RSA:
        key_bits, exponent = r.u16(), r.u32() or 65537
        modulus, curve = int.from_bytes(r.tpm2b(), "big"), 0
    else:
        curve, kdf = r.u16(), r.u16()
        if kdf != ALG_NULL:
            r.u16()
        x, y = r.tpm2b(), r.tpm2b()
    r.end()
    try:
        if typ == ALG_RSA:
            if modulus.bit_length() != key_bits:
                raise ValueError(f"the RSA modulus is not {key_bits} bits")
            key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey = \
                rsa.RSAPublicNumbers(exponent, modulus).public_key()
        else:
            if curve not in _CURVES:
                raise ValueError(f"unsupported ECC curve 0x{curve:04x}")
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                _CURVES[curve]()).public_key()
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return PublicKey(bytes(public_area), typ, ALG_NAMES[name_alg], attrs, sym, bits, mode, scheme, scheme_hash,
                     curve, key)


def parse_storage_key(public_area: bytes) -> PublicKey:
    """Parse a marshalled TPMT_PUBLIC that must be a restricted ECC P-256 decrypt key with AES-CFB."""
    key = parse_public(public_area, "storage key TPMT_PUBLIC")
    need = RESTRICTED | DECRYPT
    if key.type != ALG_ECC or key.attributes & need != need or (key.sym_alg, key.sym_mode) != (ALG_AES, ALG_CFB) \
            or key.curve != ECC_NIST_P256 or key.scheme != ALG_NULL:
        raise ValueError("storage key: not a restricted P-256 decryption key with AES-CFB")
    return key


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


def _seed(parent: PublicKey, label: bytes) -> tuple[bytes, bytes]:
    """A fresh seed only `parent`'s TPM can recover: (seed, TPM2B_ENCRYPTED_SECRET buffer).

    ECC: ephemeral ECDH and KDFe (Part 1, 11.4.10.3), the buffer is the
    ephemeral TPMS_ECC_POINT; RSA: the OAEP ciphertext with the parent's
    name algorithm and `label` (Part 1, B.10.3).
    """
    digest_size = hashlib.new(parent.name_alg).digest_size
    if parent.type == ALG_RSA:
        seed = os.urandom(digest_size)
        halg = crypto_hash(parent.name_alg)
        return seed, parent.key.encrypt(seed, padding.OAEP(padding.MGF1(halg), halg, label))
    point = parent.point
    eph = ec.generate_private_key(point.curve)
    size = (point.curve.key_size + 7) // 8
    en, pn = eph.public_key().public_numbers(), point.public_numbers()
    ex, ey, px = en.x.to_bytes(size, "big"), en.y.to_bytes(size, "big"), pn.x.to_bytes(size, "big")
    z = eph.exchange(ec.ECDH(), point)
    seed = ConcatKDFHash(algorithm=crypto_hash(parent.name_alg), length=digest_size,
                         otherinfo=label + ex + px).derive(z)
    return seed, tpm2b(ex) + tpm2b(ey)


def _protect(parent: PublicKey, seed: bytes, name: bytes, plaintext: bytes) -> bytes:
    """Outer wrap: AES-CFB under KDFa(STORAGE, name) and its HMAC under KDFa(INTEGRITY) (Part 1, 23.3.2)."""
    if (parent.sym_alg, parent.sym_mode) != (ALG_AES, ALG_CFB):
        raise ValueError("parent key: its symmetric algorithm is not AES-CFB")
    digest_bits = hashlib.new(parent.name_alg).digest_size * 8
    sym_key = kdfa(parent.name_alg, seed, b"STORAGE", name, parent.sym_bits)
    enc = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    wrapped = enc.update(plaintext) + enc.finalize()
    hmac_key = kdfa(parent.name_alg, seed, b"INTEGRITY", b"", digest_bits)
    return tpm2b(hmac.new(hmac_key, wrapped + name, parent.name_alg).digest()) + wrapped


def duplicate(parent: PublicKey, public_area: bytes, sensitive: bytes) -> tuple[bytes, bytes]:
    """TPM2 duplication (Part 1, 23.3) without inner wrapper.

    Returns (duplicate, inSymSeed) as the buffers of TPM2B_PRIVATE and
    TPM2B_ENCRYPTED_SECRET: a seed for the parent (label DUPLICATE) keys
    the outer wrap of the sensitive area.
    """
    seed, encrypted_seed = _seed(parent, b"DUPLICATE\0")
    return _protect(parent, seed, object_name(public_area), tpm2b(sensitive)), encrypted_seed


def make_credential(ek: PublicKey, object_name: bytes, credential: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software (Part 1, 24): what a verifier sends a TPM to prove key residency.

    Returns (credentialBlob, secret) as the buffers of TPM2B_ID_OBJECT and
    TPM2B_ENCRYPTED_SECRET.  Only the TPM holding `ek`'s private key, with
    the object named `object_name` loaded, recovers `credential`
    (TPM2_ActivateCredential).
    """
    if not 0 < len(credential) <= hashlib.new(ek.name_alg).digest_size:
        raise ValueError("MakeCredential: the credential must be 1..digest-size bytes")
    seed, encrypted_seed = _seed(ek, b"IDENTITY\0")
    return _protect(ek, seed, object_name, tpm2b(credential)), encrypted_seed
