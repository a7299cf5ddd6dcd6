"""Keylime runtime policies from bmi: which PD images may run under which names on a host."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from ..errors import InvalidArgument
from ..files import sha256_of
from .launches import NAME_PATTERN


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not NAME_PATTERN.fullmatch(name) or not value:
        raise InvalidArgument(f"keylime-policy: {what} {text!r} is not NAME=VALUE with NAME in [A-Za-z0-9._-]")
    return name, value


def _file_digest(path: str, what: str) -> str:
    return sha256_of(path, f"keylime-policy: {what}").hex()


def runtime_policy(images: Iterable[str] = (), digests: Iterable[str] = (), any_name: Iterable[str] = ()) -> dict:
    """The JSON `keylime-policy create runtime` makes, allowing exactly the given PD launches.

    images: NAME=FILE (that image under /bmi/pd/NAME); digests: NAME=HEX (a
    sha256 measurement under /bmi/pd/NAME); any_name: FILE (the image run
    unnamed, /bmi/image/<sha256>).
    """
    allowed: dict[str, list[str]] = {}
    for text in images:
        name, path = _pair(text, "--image")
        allowed.setdefault(f"/bmi/pd/{name}", []).append(_file_digest(path, "--image"))
    for text in digests:
        name, hexdigest = _pair(text, "--digest")
        hexdigest = hexdigest.lower().removeprefix("sha256:")
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise InvalidArgument(f"keylime-policy: --digest {text!r}: expected 64 hex digits (sha256)")
        allowed.setdefault(f"/bmi/pd/{name}", []).append(hexdigest)
    for path in any_name:
        d = _file_digest(path, "--any-name")
        allowed.setdefault(f"/bmi/image/{d}", []).append(d)
    return {
        "meta": {"version": 1, "generator": 0,          # 0: Unknown (Keylime numbers its own tools)
                 "timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())},
        "release": 0,
        "digests": {path: sorted(set(v)) for path, v in sorted(allowed.items())},
        "excludes": [], "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {}, "verification-keys": "",
    }


def write(policy: dict, out: str | None) -> None:
    text = json.dumps(policy, indent=2) + "\n"
    if out in (None, "-"):
        print(text, end="")
    else:
        Path(out).write_text(text)
