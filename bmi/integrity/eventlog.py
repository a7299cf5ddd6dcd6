"""The measurement event log: CEL-JSON records, exportable as IMA-ng lines.

Each event is an IMA-ng template (d-ng = "sha256:" + the measurement,
n-ng = the event name); the digest extended into a PCR for bank B is
B(template data), exactly as IMA does, so the IMA-style export replays
with standard tools.  Records of PD measurements that were not extended
have "pcr": null.  One log per TPM boot: when the TPM's reset count (or
its AK) changes, the old log is kept as eventlog.prev.jsonl and a new one
starts.  Writers hold the TPM's exclusive lock; each record is one
O_APPEND write, so readers never see half a record.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Iterable, Mapping


def template_data(measurement: bytes, name: str) -> bytes:
    """IMA-ng template data: u32le len | b"sha256:\\0" + digest | u32le len | name + NUL."""
    d = b"sha256:\0" + measurement
    n = name.encode() + b"\0"
    return struct.pack("<I", len(d)) + d + struct.pack("<I", len(n)) + n


def event_digests(measurement: bytes, name: str, banks: Iterable[str]) -> dict[str, bytes]:
    data = template_data(measurement, name)
    return {bank: hashlib.new(bank, data).digest() for bank in banks}


def new_boot(marker: Path, boot: str, log: Path, previous: str) -> bool:
    """True (and `log` moved aside as `previous`) when `marker` names another TPM boot than `boot`."""
    try:
        if marker.read_text() == boot:
            return False
    except FileNotFoundError:
        pass
    if log.exists():
        os.replace(log, log.with_name(previous))
    marker.write_text(boot)
    return True


class EventLog:
    def __init__(self, directory: Path):
        self.path = directory / "eventlog.jsonl"
        self._boot = directory / "eventlog.boot"

    def sync_boot(self, boot: str) -> None:
        """Start a fresh log when the TPM was reset since the last record."""
        if new_boot(self._boot, boot, self.path, "eventlog.prev.jsonl"):
            self.path.touch()

    def records(self) -> list[dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line]

    def append(self, *, pcr: int | None, name: str, measurement: bytes, digests: Mapping[str, bytes],
               event: str, details: Mapping[str, object]) -> dict:
        record = {
            "recnum": len(self.records()),
            "pcr": pcr,
            "digests": [{"hashAlg": bank, "digest": d.hex()} for bank, d in digests.items()],
            "content_type": "ima_template",
            "content": {"template_name": "ima-ng",
                        "template_data": base64.b64encode(template_data(measurement, name)).decode()},
            "bmi": {"event": event, "name": name, "measurement": measurement.hex(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details},
        }
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
        return record


def replay(records: Iterable[dict], pcr: int, bank: str = "sha256") -> bytes:
    """The value `pcr` must hold if these records are all that extended it since reset."""
    value = bytes(hashlib.new(bank).digest_size)
    for r in records:
        if r.get("pcr") == pcr:
            d = next(x["digest"] for x in r["digests"] if x["hashAlg"] == bank)
            value = hashlib.new(bank, value + bytes.fromhex(d)).digest()
    return value


def ima_lines(records: Iterable[dict]) -> list[str]:
    """IMA ascii_runtime_measurements_sha256 style: PCR template-hash ima-ng sha256:digest name.

    Only records that went into a PCR: an IMA list is a PCR's history.
    """
    out = []
    for r in records:
        if r.get("pcr") is None:
            continue
        th = next(x["digest"] for x in r["digests"] if x["hashAlg"] == "sha256")
        out.append(f"{r['pcr']} {th} ima-ng sha256:{r['bmi']['measurement']} {r['bmi']['name']}")
    return out
