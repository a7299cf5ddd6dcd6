"""IntegrityService: the TVL's link to the TPM (what bmi/api.py calls).

Configuration keys (all strings, all measured into the TVL digest):
  tvl_pcr    PCR holding the TVL's self-measurement.  Default 13: it must
             not be resettable from software (16 and 23 are; 17-22 are
             DRTM-only), and 0-12, 14 and 15 are taken by firmware,
             boot loaders, IMA, systemd-stub and shim in the Linux TPM PCR
             registry; 13 is only used by systemd-stub for system
             extensions, which a BMI host does not boot.
  pd_pcr     PCR that record_pd(extend=True) extends (default: tvl_pcr).
  state_dir  where TPM state, locks and the event log live.
  tcti       force a TCTI (else /dev/tpmrm0, $BMI_TPM_TCTI, our swtpm).
  tpm        "swtpm" (or $BMI_TPM=swtpm): always our own swtpm, even where a
             hardware TPM exists (tests, benches).

The self-measurement is extended once per TPM boot and TVL digest: the
same TVL opened again adds nothing a verifier could use, and re-extending
would invalidate every blob sealed to the TVL PCRs.
"""
from __future__ import annotations

import hashlib
import os
from typing import Mapping

from cryptography.exceptions import InvalidTag

from ..errors import IntegrityError, InvalidArgument
from ..types import IntegrityPolicy, ProtectedCredentials
from . import credentials, eventlog, selfmeasure, wire
from .credentials import policy_digest
from .keys import AttestationKey
from ..types import IntegrityReport
from .tpm import TPM

BOOT_PCRS = tuple(range(8))
DEFAULT_TVL_PCR = 13
MAX_NONCE = 64

__all__ = ["IntegrityService", "policy_digest"]


def _pcr_index(config: Mapping[str, str], key: str, default: int) -> int:
    raw = config.get(key, str(default))
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = -1
    if not 8 <= value <= 23 or value in (16, 23):
        raise InvalidArgument(f"IntegrityService.open: config {key}={raw!r} must be a PCR in 8..22 other "
                              "than 16 (0-7 are the boot chain, 16 and 23 can be reset)")
    return value


def _of(pd_id: int | None) -> str:
    return "" if pd_id is None else f" of PD {pd_id}"


class IntegrityService:
    """One manager's use of the TPM: self-measurement, quotes, sealing, the event log."""

    def __init__(self, tpm: TPM, log: eventlog.EventLog, tvl_pcr: int, pd_pcr: int,
                 tvl: selfmeasure.TVLMeasurement):
        self._tpm, self._log = tpm, log
        self.tvl_pcr, self.pd_pcr, self.tvl = tvl_pcr, pd_pcr, tvl
        self.pcrs = BOOT_PCRS + (tvl_pcr,)
        self.selection = wire.format_selection("sha256", self.pcrs)
        self._pcr_cache: dict[int, bytes] = {}
        self._banks = tpm.banks()

    @classmethod
    def open(cls, *, config: Mapping[str, str] | None = None) -> "IntegrityService":
        config = dict(config or {})
        tvl_pcr = _pcr_index(config, "tvl_pcr", DEFAULT_TVL_PCR)
        pd_pcr = _pcr_index(config, "pd_pcr", tvl_pcr)
        tpm = TPM.open(config)
        try:
            measured = {**config, "tvl_pcr": str(tvl_pcr), "pd_pcr": str(pd_pcr)}
            self = cls(tpm, eventlog.EventLog(tpm.dir), tvl_pcr, pd_pcr, selfmeasure.measure_tvl(measured))
            self._measure_self()
        except BaseException:
            tpm.close()
            raise
        return self

    def __enter__(self) -> "IntegrityService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tpm_kind(self) -> str:
        """'hardware' or 'software'."""
        return self._tpm.kind

    def _measure_self(self) -> None:
        with self._tpm.exclusive():
            boot = f"{self._tpm.reset_count()}:{hashlib.sha256(self._tpm.ak_pem).hexdigest()[:16]}"
            self._log.sync_boot(boot)
            done = any(r["pcr"] == self.tvl_pcr and r["bmi"]["event"] == "tvl"
                       and r["bmi"]["measurement"] == self.tvl.digest.hex() for r in self._log.records())
            if not done:
                self._extend_and_log(self.tvl_pcr, "bmi-tvl", self.tvl.digest, "tvl",
                                     {"files": self.tvl.files, "config": self.tvl.config})

    def _extend_and_log(self, pcr: int | None, name: str, measurement: bytes, event: str,
                        details: Mapping[str, object]) -> None:
        digests = eventlog.event_digests(measurement, name, self._banks)
        if pcr is not None:
            self._tpm.extend(pcr, digests)
        self._log.append(pcr=pcr, name=name, measurement=measurement, digests=digests, event=event,
                         details={**details, "pid": os.getpid()})

    def describe(self) -> dict:
        """What `bmi tpm` and `bmi info` show."""
        values = self._tpm.pcr_read("sha256", self.pcrs)
        records = self._log.records()
        ak = self.attestation_key()
        return {
            "kind": self.tpm_kind, "tcti": self._tpm.tcti, "pcr_banks": self._banks,
            "pcr_selection": self.selection, "tvl_pcr": self.tvl_pcr,
            "tvl_pcr_value": values[self.tvl_pcr].hex(), "pd_pcr": self.pd_pcr,
            "tvl_measurement": self.tvl.digest.hex(), "tvl_files": self.tvl.files,
            "eventlog_path": str(self._log.path), "eventlog_records": len(records),
            "eventlog_replays": eventlog.replay(records, self.tvl_pcr) == values[self.tvl_pcr],
            "ak_fingerprint": ak.fingerprint, "ak_public_pem": ak.pem, "ak_public_area": ak.public_area.hex(),
            "ek_public_pem": ak.ek_pem, "ek_public_area": ak.ek_public_area.hex(),
            "ek_certificate": ak.ek_certificate,
        }

    def attestation_key(self) -> AttestationKey:
        """The AK a verifier pins, with the EK it was created under (mgr.get_attestation_key)."""
        ek_area, ek_cert = self._tpm.endorsement()
        return AttestationKey.from_public_areas(self._tpm.ak_public_area, ek_area, ek_cert, self.tpm_kind)

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """The secret of a credential made with bmi.integrity.verify.make_credential for this TPM's EK and AK."""
        if not isinstance(credential_blob, bytes) or not isinstance(encrypted_secret, bytes):
            raise InvalidArgument("activate_credential: the credential blob and secret must be bytes")
        return self._tpm.activate_credential(credential_blob, encrypted_secret)

    def record_pd(self, pd_id: int, name: str, digests: Mapping[str, bytes], *, extend: bool = False) -> None:
        """Log a PD's measurement; extend it into pd_pcr only when asked (spec 6.2: PDs independent)."""
        if not isinstance(digests.get("sha256"), bytes) or len(digests["sha256"]) != 32:
            raise InvalidArgument(f"record_pd: PD {pd_id} needs a 32-byte 'sha256' digest, got {sorted(digests)}",
                                  pd_id=pd_id)
        with self._tpm.exclusive():
            self._extend_and_log(self.pd_pcr if extend else None, str(name), digests["sha256"], "pd",
                                 {"pd_id": pd_id, "extended": bool(extend),
                                  "digests": {k: bytes(v).hex() for k, v in digests.items()}})

    @property
    def tpm(self) -> TPM:
        """The TPM link itself (the Keylime agent quotes its own PCR selection with it)."""
        return self._tpm

    def record_launch(self, pd_name: str | None, digest: bytes | None) -> None:
        """A PD starts: in Keylime mode, add it to the launch list and PCR 10 (bmi.keylime.launches)."""
        from ..keylime.launches import LaunchList, entry_name
        launches = LaunchList(self._tpm)
        if launches.enabled():
            if digest is None:
                raise InvalidArgument(f"start of PD {pd_name or ''}: Keylime mode records a PD's sha256 "
                                      "measurement; set the PD up with the sha256 bank")
            launches.record(digest, entry_name(pd_name, digest))

    def integrity_link(self, nonce: bytes, pd_integrity: bytes, *, pd_id: int | None = None) -> IntegrityReport:
        """A quote over the TVL PCRs with qualifyingData = SHA-256(nonce || pd_integrity)."""
        if not isinstance(nonce, bytes) or not 0 < len(nonce) <= MAX_NONCE:
            raise InvalidArgument(f"get_integrity_link{_of(pd_id)}: the nonce must be 1..{MAX_NONCE} bytes, "
                                  f"got {len(nonce) if isinstance(nonce, bytes) else type(nonce).__name__}",
                                  pd_id=pd_id)
        if not isinstance(pd_integrity, bytes) or not 0 < len(pd_integrity) <= 64:
            raise InvalidArgument(f"get_integrity_link{_of(pd_id)}: pd_integrity must be a digest of 1..64 bytes",
                                  pd_id=pd_id)
        qualifying = hashlib.sha256(nonce + pd_integrity).digest()
        for _ in range(3):     # the PCR values we report must be the quoted ones
            attest, sig = self._tpm.quote(self.selection, qualifying)
            quoted = wire.parse_quote(attest).pcr_digest
            values = self._pcr_cache
            if len(values) != len(self.pcrs) or \
                    wire.pcr_composite("sha256", [values[i] for i in self.pcrs]) != quoted:
                values = self._pcr_cache = self._tpm.pcr_read("sha256", self.pcrs)
                if wire.pcr_composite("sha256", [values[i] for i in self.pcrs]) != quoted:
                    continue       # a PCR changed between quote and read: quote again
            return IntegrityReport(pd_integrity=pd_integrity, pubkey=self._tpm.ak_pem, signature=sig,
                                   attestation=attest, pcr_selection=self.selection, pcr_values=dict(values),
                                   hash_alg="sha256", tpm=self.tpm_kind, pd_id=pd_id, tvl_pcr=self.tvl_pcr)
        raise IntegrityError(f"get_integrity_link{_of(pd_id)}: the TVL PCRs kept changing during the quote",
                             pd_id=pd_id)

    def seal(self, policy: IntegrityPolicy, secret: bytes) -> bytes:
        """A blob only this TPM, with the TVL PCRs as they are now, can unseal (mgr.seal_credentials)."""
        policy_digest(policy)
        credentials.check_secret(secret, "seal_credentials")
        values = self._tpm.pcr_read("sha256", self.pcrs)
        key = os.urandom(32)
        auth = wire.policy_pcr_digest("sha256", self.pcrs, [values[i] for i in self.pcrs])
        public, private = self._tpm.create_sealed(key, auth)
        blob = credentials.new_blob(credentials.KIND_CREATED, self.selection, public, private, b"")
        return credentials.seal_payload(blob, key, policy, secret)

    def storage_public(self) -> bytes:
        """The storage key and current TVL PCR values, for wrap_credentials (mgr.get_storage_public)."""
        return credentials.encode_storage_public(self._tpm.storage_public_area, self.selection,
                                                 self._tpm.pcr_read("sha256", self.pcrs))

    def unseal(self, blob: bytes, *, pd_id: int | None = None) -> ProtectedCredentials:
        """The ProtectedCredentials in `blob`; IntegrityError saying why the TPM or the blob refused."""
        try:
            parsed = credentials.parse_blob(blob)
        except ValueError as e:
            raise IntegrityError(f"get_protected_credentials{_of(pd_id)}: malformed blob: {e}",
                                 pd_id=pd_id) from None
        if parsed.selection != self.selection:
            raise IntegrityError(f"get_protected_credentials{_of(pd_id)}: the blob is sealed to "
                                 f"{parsed.selection}, not to this TVL's PCRs {self.selection}", pd_id=pd_id)
        seed = parsed.seed if parsed.kind == credentials.KIND_DUPLICATED else None
        try:
            key = self._tpm.unseal(parsed.selection, parsed.public, parsed.private, seed)
            return credentials.open_payload(parsed, key)
        except IntegrityError as e:
            raise IntegrityError(f"get_protected_credentials{_of(pd_id)}: {e}", pd_id=pd_id) from None
        except (InvalidTag, ValueError) as e:
            raise IntegrityError(f"get_protected_credentials{_of(pd_id)}: the blob's encrypted part was "
                                 f"altered or does not belong to its sealed key ({type(e).__name__})",
                                 pd_id=pd_id) from None

    def eventlog(self) -> list[dict]:
        """CEL-JSON records of this TPM boot."""
        return self._log.records()

    def ima_lines(self) -> list[str]:
        return eventlog.ima_lines(self._log.records())

    def close(self) -> None:
        """Idempotent: flush and disconnect; the last user stops our swtpm."""
        self._tpm.close()
