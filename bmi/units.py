"""Sizes as people write them ('64M'): below bmi.types, which takes PDDescription(mem="64M")."""
from __future__ import annotations

import re
from decimal import Decimal

from .errors import InvalidArgument

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(value: object, *, what: str, pd_id: int | None = None) -> int:
    """A size in bytes: '4096', '64M', '1.5G', '2GiB' (K, M, G, T are powers of 1024)."""
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or ("." in match[1] and not match[2]):
        raise InvalidArgument(f"{what}{'' if pd_id is None else f' of PD {pd_id}'}: {value!r} is not a size "
                              f"like 4096, 64M or 1G", pd_id=pd_id)
    return int(Decimal(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))
