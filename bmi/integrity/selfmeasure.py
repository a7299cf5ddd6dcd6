"""The TVL measures itself: bmi's own installed code and its configuration.

Byte stream hashed with SHA-256 (the digest is what the event log and the
TVL PCR record):
    b"bmi.tvl.v1\\0"
    for each file under the bmi package directory whose name ends in .py
    or is a compiled shim (.so), sorted by relative POSIX path, skipping
    __pycache__:  u32 len(path) | path (UTF-8) | u64 len(content) | content
    b"config\\0" | u32 len | the configuration as JSON (sorted keys, no spaces)
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TVLMeasurement:
    digest: bytes          # SHA-256 over the stream above
    files: int
    config: str            # the canonical JSON that was hashed


def package_files(root: Path = PACKAGE_DIR) -> list[tuple[str, Path]]:
    """(relative path, path) of every measured file, in measurement order."""
    found = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*")
             if p.is_file() and (p.suffix == ".py" or p.suffix == ".so" or ".so." in p.name)
             and "__pycache__" not in p.parts]
    return sorted(found)


def measure_tvl(config: Mapping[str, str], root: Path = PACKAGE_DIR) -> TVLMeasurement:
    h = hashlib.sha256(b"bmi.tvl.v1\0")
    files = package_files(root)
    for rel, path in files:
        name = rel.encode()
        data = path.read_bytes()
        h.update(struct.pack(">I", len(name)) + name + struct.pack(">Q", len(data)))
        h.update(data)
    conf = json.dumps(dict(config), sort_keys=True, separators=(",", ":"))
    h.update(b"config\0" + struct.pack(">I", len(conf.encode())) + conf.encode())
    return TVLMeasurement(h.digest(), len(files), conf)
