"""Copy a PDImage into a PD's memfd and measure it in the same pass (spec 6.5).

The bytes that run are exactly the bytes hashed: every chunk pulled from the
image is fed to each requested digest and written to the memfd before the
next one is pulled.  (Pure-Python version; the C hot path replaces the loop.)
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Callable, Sequence

from ..errors import ImageError, InvalidArgument

SUPPORTED_BANKS = ("sha256", "sha384", "sha512")
DEFAULT_MAX_IMAGE = 4 << 30
CHUNK_SIZE = 1 << 20
_ZERO_READ_RETRIES = 3
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

Progress = Callable[[int, int], None]


def _of(pd_id: int | None) -> str:
    return f" of PD {pd_id}" if pd_id is not None else ""


def max_image_size() -> int:
    """The image size bound: BMI_MAX_IMAGE (bytes, or with a K/M/G/T suffix), else 4 GiB."""
    raw = os.environ.get("BMI_MAX_IMAGE")
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_IMAGE
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", raw, re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise InvalidArgument(
            f"BMI_MAX_IMAGE={raw!r}: not a positive size (bytes, or a number with K/M/G/T)")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


def _check_banks(banks: Sequence[str], pd_id: int | None) -> tuple[str, ...]:
    if isinstance(banks, str):
        banks = (banks,)
    wanted = ["sha256"]
    for b in banks:
        if not isinstance(b, str) or b.lower() not in SUPPORTED_BANKS:
            raise InvalidArgument(
                f"measure image{_of(pd_id)}: unknown PCR bank {b!r} "
                f"(supported: {', '.join(SUPPORTED_BANKS)})", pd_id=pd_id)
        if b.lower() not in wanted:
            wanted.append(b.lower())
    return tuple(wanted)


def _image_size(image: Any, limit: int, pd_id: int | None) -> int:
    try:
        size = image.get_image_size()
    except Exception as e:
        raise ImageError(f"measure image{_of(pd_id)}: get_image_size() raised {e!r}", pd_id=pd_id) from e
    if isinstance(size, bool) or not isinstance(size, int):
        raise ImageError(f"measure image{_of(pd_id)}: get_image_size() returned "
                         f"{type(size).__name__}, not int", pd_id=pd_id)
    if size < 0:
        raise ImageError(f"measure image{_of(pd_id)}: get_image_size() returned {size} < 0", pd_id=pd_id)
    if size == 0:
        raise ImageError(f"measure image{_of(pd_id)}: empty image (size 0)", pd_id=pd_id)
    if size > limit:
        raise ImageError(f"measure image{_of(pd_id)}: image is {size} bytes, over the bound of "
                         f"{limit} bytes (BMI_MAX_IMAGE / max_size)", pd_id=pd_id)
    return size


def _pull(image: Any, offset: int, length: int, pd_id: int | None) -> bytes:
    """One get_data call with every misbehaviour turned into ImageError."""
    for _ in range(_ZERO_READ_RETRIES + 1):
        try:
            data = image.get_data(offset, length)
        except Exception as e:
            raise ImageError(f"measure image{_of(pd_id)}: get_data({offset}, {length}) raised {e!r}",
                             pd_id=pd_id) from e
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageError(f"measure image{_of(pd_id)}: get_data({offset}, {length}) returned "
                             f"{type(data).__name__}, not bytes", pd_id=pd_id)
        if len(data) > length:
            raise ImageError(f"measure image{_of(pd_id)}: get_data({offset}, {length}) returned "
                             f"{len(data)} bytes, more than asked", pd_id=pd_id)
        if len(data):
            return bytes(data)
    raise ImageError(f"measure image{_of(pd_id)}: get_data returned no data at offset {offset} "
                     f"(image claims {length} more bytes)", pd_id=pd_id)


def _report(progress: Progress | None, done: int, total: int, pd_id: int | None) -> None:
    """Call progress; a failing callback aborts the load as InvalidArgument (it is the caller's
    argument that broke), with the original exception chained; BaseExceptions pass untouched."""
    if progress is None:
        return
    try:
        progress(done, total)
    except Exception as e:
        raise InvalidArgument(f"measure image{_of(pd_id)}: progress callback raised {e!r} "
                              f"at {done}/{total} bytes; load aborted", pd_id=pd_id) from e


def measure_into(image: Any, fd: int, *, banks: Sequence[str] = ("sha256",),
                 progress: Progress | None = None, max_size: int | None = None,
                 pd_id: int | None = None) -> dict[str, bytes]:
    """Copy every byte of `image` to `fd` (from offset 0) and return {bank: digest}.

    sha256 is always measured.  On any error nothing is returned and the caller
    discards the memfd; the size bound is checked before a byte is copied.
    """
    wanted = _check_banks(banks, pd_id)
    if progress is not None and not callable(progress):
        raise InvalidArgument(f"measure image{_of(pd_id)}: progress must be callable", pd_id=pd_id)
    limit = max_image_size() if max_size is None else max_size
    total = _image_size(image, limit, pd_id)
    hashes = {b: hashlib.new(b) for b in wanted}
    done = 0
    while done < total:
        data = _pull(image, done, min(CHUNK_SIZE, total - done), pd_id)
        for h in hashes.values():
            h.update(data)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, done)
            view = view[n:]
            done += n
        _report(progress, done, total, pd_id)
    return {b: h.digest() for b, h in hashes.items()}
