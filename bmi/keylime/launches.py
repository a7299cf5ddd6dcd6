"""PD launches as an IMA measurement list (ima-ng) extended into PCR 10, for Keylime.

Only when Keylime mode is enabled for a TPM (the file keylime/enabled in
that TPM's state directory) does a manager record launches; otherwise
PCR 10 is never touched.  Every manager on the TPM appends to one list,
keylime/ima.log, under the TPM's exclusive lock: the line is written
(and fsync'ed) before PCR 10 is extended, so a crash in between leaves a
list one line longer than the PCR, which Keylime's replay accepts (a
prefix matches), never a PCR the list cannot explain.  The list lives
as long as the TPM boot: a new reset count starts a new one.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..errors import InvalidArgument, NotSupported
from ..integrity.eventlog import new_boot, template_data
from ..integrity.tpm import TPM

IMA_PCR = 10                  # Keylime hard-codes it (config.IMA_PCR)
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,255}")
KERNEL_IMA_LIST = Path("/sys/kernel/security/ima/ascii_runtime_measurements")


def entry_name(pd_name: str | None, digest: bytes) -> str:
    """/bmi/pd/<name> for a named PD, /bmi/image/<sha256> for an unnamed one."""
    if pd_name:
        if not NAME_PATTERN.fullmatch(pd_name):
            raise InvalidArgument(f"Keylime mode: PD name {pd_name!r} is not [A-Za-z0-9._-]{{1,255}}, so it "
                                  "cannot be a measurement-list path; rename the PD")
        return f"/bmi/pd/{pd_name}"
    return f"/bmi/image/{digest.hex()}"


def ima_line(digest: bytes, name: str) -> str:
    """One line of ascii_runtime_measurements: PCR, sha1 template hash, ima-ng, sha256:digest, name."""
    template_hash = hashlib.sha1(template_data(digest, name)).hexdigest()
    return f"{IMA_PCR} {template_hash} ima-ng sha256:{digest.hex()} {name}"


class LaunchList:
    """The Keylime-mode switch and the launch list of one TPM (its state directory)."""

    def __init__(self, tpm: TPM):
        self._tpm = tpm
        self.dir = tpm.dir / "keylime"
        self.flag = self.dir / "enabled"
        self.path = self.dir / "ima.log"
        self._boot = self.dir / "ima.boot"

    def enabled(self) -> bool:
        return self.flag.exists()

    def enable(self) -> None:
        """Turn Keylime mode on; refused where the kernel's IMA already extends PCR 10."""
        if self._tpm.kind == "hardware" and _kernel_ima_active():
            raise NotSupported(f"Keylime mode on the hardware TPM ({self._tpm.tcti}): the kernel's IMA extends "
                               f"PCR {IMA_PCR} ({KERNEL_IMA_LIST} has entries); bmi will not interleave PD "
                               "launches with it. Use Keylime's own IMA checks on this host")
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.flag.touch()

    def record(self, digest: bytes, name: str) -> None:
        """Append a launch and extend PCR 10 in every bank (call only when enabled)."""
        data = template_data(digest, name)
        with self._tpm.exclusive():
            self._sync_boot()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (ima_line(digest, name) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._tpm.extend(IMA_PCR, {bank: hashlib.new(bank, data).digest() for bank in self._tpm.banks()})

    def lines(self) -> list[str]:
        """The list as the TPM boot has it (call inside the TPM's exclusive lock for a consistent view)."""
        self._sync_boot()
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def _sync_boot(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        new_boot(self._boot, str(self._tpm.reset_count()), self.path, "ima.prev.log")


def _kernel_ima_active() -> bool:
    try:
        with open(KERNEL_IMA_LIST, "rb") as f:
            return bool(f.readline())
    except OSError:
        return False
