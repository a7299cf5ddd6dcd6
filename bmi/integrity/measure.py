"""Copy a PDImage into a PD's memfd and measure it in the same pass (spec 6.5).

The bytes that run are exactly the bytes hashed.  The work happens in
csrc/measure/measure.c with the GIL released: C reads a FileImage or an FdImage itself (pread),
with no Python call per chunk; any other PDImage is double-buffered - Python
pulls chunk n+1 through get_data while C threads hash and write chunk n.
Each chunk goes to one hashing thread per bank (one thread for all banks
when only one CPU is ours) and to a writer thread that fills the memfd.

A failing progress callback aborts the load with InvalidArgument (the
callback is the caller's argument; the original exception is chained), so
every failure of measure_into is a BMIError; KeyboardInterrupt and other
BaseExceptions pass through untouched.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from collections import deque
from typing import Any, Callable, Sequence

from .._measure import ffi, lib
from ..errors import ImageError, InvalidArgument, ResourceError
from ..image import FdImage, is_plain_file_image, open_file_image

DEFAULT_MAX_IMAGE = 4 << 30
CHUNK_SIZE: int = lib.BMI_MEAS_CHUNK
FILE_STEP = 16 * CHUNK_SIZE          # a FileImage reports progress this often
_ZERO_READ_RETRIES = 3
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# The banks are what csrc/measure/measure.h names, read from its cdef: the fields of struct
# bmi_meas_digests (where bmi_meas_finish writes each digest) and their BMI_BANK_* bits.
_DIGESTS = ffi.typeof("struct bmi_meas_digests").fields
SUPPORTED_BANKS: tuple[str, ...] = tuple(bank for bank, _ in _DIGESTS)
_BANK_BIT = {bank: getattr(lib, f"BMI_BANK_{bank.upper()}") for bank in SUPPORTED_BANKS}
# (start, end) of each bank's digest in what bmi_meas_finish writes
_DIGEST_AT = {bank: (field.offset, field.offset + ffi.sizeof(field.type)) for bank, field in _DIGESTS}
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT, errno.EAGAIN, errno.EMFILE}

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
    try:
        banks = list(banks)
    except TypeError:
        raise InvalidArgument(f"measure image{_of(pd_id)}: banks must be a sequence of bank names, "
                              f"got {banks!r}", pd_id=pd_id) from None
    wanted = ["sha256"]
    for b in banks:
        if not isinstance(b, str) or b.lower() not in SUPPORTED_BANKS:
            raise InvalidArgument(
                f"measure image{_of(pd_id)}: unknown PCR bank {b!r} "
                f"(supported: {', '.join(SUPPORTED_BANKS)})", pd_id=pd_id)
        if b.lower() not in wanted:
            wanted.append(b.lower())
    return tuple(wanted)


def _limit(max_size: int | None, pd_id: int | None) -> int:
    if max_size is None:
        return max_image_size()
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
        raise InvalidArgument(f"measure image{_of(pd_id)}: max_size must be a positive int, "
                              f"got {max_size!r}", pd_id=pd_id)
    return max_size


def _check_fd(fd: int, pd_id: int | None) -> None:
    """The memfd must be empty and open for writing: bytes beyond the image would run unmeasured."""
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise InvalidArgument(f"measure image{_of(pd_id)}: fd must be an int, got {fd!r}", pd_id=pd_id)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise InvalidArgument(f"measure image{_of(pd_id)}: fd {fd} is not open ({e.strerror})",
                              pd_id=pd_id) from e
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise InvalidArgument(f"measure image{_of(pd_id)}: fd {fd} is not open for writing", pd_id=pd_id)
    held = os.fstat(fd).st_size
    if held:
        raise InvalidArgument(f"measure image{_of(pd_id)}: fd {fd} already holds {held} bytes; "
                              f"the image must go into an empty file", pd_id=pd_id)


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
    """One get_data call with every misbehaviour turned into ImageError.

    Anything but exact bytes is copied into bytes: a buffer the image could
    still mutate would let the hashed and the written bytes differ."""
    for _ in range(_ZERO_READ_RETRIES + 1):
        try:
            data = image.get_data(offset, length)
        except Exception as e:
            raise ImageError(f"measure image{_of(pd_id)}: get_data({offset}, {length}) raised {e!r}",
                             pd_id=pd_id) from e
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageError(f"measure image{_of(pd_id)}: get_data({offset}, {length}) returned "
                             f"{type(data).__name__}, not bytes", pd_id=pd_id)
        if type(data) is not bytes:
            data = bytes(data)
        if len(data) > length:
            raise ImageError(f"measure image{_of(pd_id)}: get_data({offset}, {length}) returned "
                             f"{len(data)} bytes, more than asked", pd_id=pd_id)
        if data:
            return data
    raise ImageError(f"measure image{_of(pd_id)}: get_data returned no data at offset {offset} "
                     f"({_ZERO_READ_RETRIES + 1} tries; the image claims {length} more bytes)", pd_id=pd_id)


def _report(progress: Progress | None, done: int, total: int, pd_id: int | None) -> None:
    if progress is None:
        return
    try:
        progress(done, total)
    except Exception as e:
        raise InvalidArgument(f"measure image{_of(pd_id)}: progress callback raised {e!r} "
                              f"at {done}/{total} bytes; load aborted", pd_id=pd_id) from e


def _raise_c(rc: int, what: str, pd_id: int | None) -> None:
    """Turn a negative errno from csrc/measure/measure.c into the bmi error it means."""
    code = -rc
    if code == errno.ENODATA:
        raise ImageError(f"measure image{_of(pd_id)}: {what}: the file ended before its announced "
                         f"size (it shrank while being loaded)", pd_id=pd_id)
    msg = f"measure image{_of(pd_id)}: {what}: {os.strerror(code)}"
    if code in _RESOURCE_ERRNOS:
        raise ResourceError(msg, pd_id=pd_id)
    if code in (errno.EBADF, errno.EPERM, errno.EINVAL, errno.ESPIPE, errno.EACCES, errno.ENODEV):
        raise InvalidArgument(msg + " (the target fd does not take the image)", pd_id=pd_id)
    raise ImageError(msg, pd_id=pd_id)


class _Pipeline:
    """One run of the C copy-and-hash pipeline; its threads live from start to finish/abort."""

    def __init__(self, fd: int, banks: tuple[str, ...], mode: int, pd_id: int | None):
        self.banks, self.pd_id = banks, pd_id
        mask = sum(_BANK_BIT[b] for b in banks)     # 0: copy only
        serial = lib.BMI_MEAS_SERIAL_BANKS if len(os.sched_getaffinity(0)) < 2 else 0
        handle = ffi.new("bmi_meas **")
        rc = lib.bmi_meas_new(fd, mask, mode, serial, handle)
        if rc:
            _raise_c(rc, "starting the copy-and-hash threads", pd_id)
        self.h = handle[0]
        # C may still read the last BMI_MEAS_DEPTH fed chunks: they live until it says otherwise
        self.inflight: deque[Any] = deque(maxlen=lib.BMI_MEAS_DEPTH)

    def feed(self, data: bytes, offset: int) -> None:
        buf = ffi.from_buffer("unsigned char[]", data)
        rc = lib.bmi_meas_feed(self.h, buf, len(data))
        self.inflight.append(buf)
        self.check(rc, f"writing at {offset}")

    def check(self, rc: int, what: str) -> None:
        if rc:
            _raise_c(rc, what, self.pd_id)

    def finish(self) -> dict[str, bytes]:
        out = ffi.new("unsigned char[]", ffi.sizeof("struct bmi_meas_digests"))
        h, self.h = self.h, None
        rc = lib.bmi_meas_finish(h, out)
        self.inflight.clear()
        self.check(rc, "finishing the measurement")
        raw = ffi.buffer(out)[:]
        return {b: raw[slice(*_DIGEST_AT[b])] for b in self.banks}

    def abort(self) -> None:
        if self.h is not None:
            h, self.h = self.h, None
            lib.bmi_meas_abort(h)
            self.inflight.clear()


def _load_file(pipe: _Pipeline, src: int, name: str, total: int, progress: Progress | None,
               pd_id: int | None) -> None:
    """C reads the file itself (pread into the pipeline's buffers): the one copy, hashed as it is written."""
    st = os.fstat(src)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"measure image{_of(pd_id)}: {name} is not a regular file (pass a file or a memfd)",
                         pd_id=pd_id)
    if fcntl.fcntl(src, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        raise ImageError(f"measure image{_of(pd_id)}: {name} is not open for reading", pd_id=pd_id)
    if st.st_size != total:
        raise ImageError(f"measure image{_of(pd_id)}: {name} is {st.st_size} bytes, "
                         f"but get_image_size() said {total} (it changed)", pd_id=pd_id)
    step = total if progress is None else FILE_STEP
    for off in range(0, total, step):
        n = min(step, total - off)
        pipe.check(lib.bmi_meas_file(pipe.h, src, off, n), f"copying {name} at {off}")
        if off + n < total:
            _report(progress, off + n, total, pd_id)
    if os.fstat(src).st_size != total:
        raise ImageError(f"measure image{_of(pd_id)}: {name} changed size while being "
                         f"loaded ({total} -> {os.fstat(src).st_size} bytes)", pd_id=pd_id)


def _load_generic(pipe: _Pipeline, image: Any, total: int, progress: Progress | None,
                  pd_id: int | None) -> None:
    done = 0
    while done < total:
        data = _pull(image, done, min(CHUNK_SIZE, total - done), pd_id)
        pipe.feed(data, done)
        done += len(data)
        if done < total:
            _report(progress, done, total, pd_id)


def measure_into(image: Any, fd: int, *, banks: Sequence[str] = ("sha256",),
                 progress: Progress | None = None, max_size: int | None = None,
                 pd_id: int | None = None) -> dict[str, bytes]:
    """Copy every byte of `image` to `fd` (from offset 0) and return {bank: digest}.

    sha256 is always measured.  The size bound (max_size, else BMI_MAX_IMAGE)
    is checked before a byte is copied.  On any error no digest is returned
    and no thread or buffer is left; the caller discards the memfd.  The fd's
    file position is left unspecified.  A plain FileImage or an FdImage is
    read by C itself; any other PDImage is pulled through get_data.
    """
    wanted = _check_banks(banks, pd_id)
    if progress is not None and not callable(progress):
        raise InvalidArgument(f"measure image{_of(pd_id)}: progress must be callable, "
                              f"got {progress!r}", pd_id=pd_id)
    return _copy(image, fd, wanted, progress, max_size, pd_id)


def copy_into(image: Any, fd: int, *, progress: Progress | None = None, max_size: int | None = None,
              pd_id: int | None = None) -> None:
    """measure_into without a hash: for a client whose layer measures the copy itself (it trusts no digest of
    ours), so each image is hashed once."""
    _copy(image, fd, (), progress, max_size, pd_id)


def _copy(image: Any, fd: int, wanted: tuple[str, ...], progress: Progress | None, max_size: int | None,
          pd_id: int | None) -> dict[str, bytes]:
    limit = _limit(max_size, pd_id)
    _check_fd(fd, pd_id)
    total = _image_size(image, limit, pd_id)
    if is_plain_file_image(image):
        src, name, owned = open_file_image(image, f"measure image{_of(pd_id)}", pd_id), repr(image.path), True
    elif type(image) is FdImage:
        src, name, owned = image.fd, "the image fd", False
    else:
        src, name, owned = -1, "", False
    try:
        pipe = _Pipeline(fd, wanted, lib.BMI_MEAS_FEED if src < 0 else lib.BMI_MEAS_FILE, pd_id)
        try:
            if src < 0:
                _load_generic(pipe, image, total, progress, pd_id)
            else:
                _load_file(pipe, src, name, total, progress, pd_id)
            digests = pipe.finish()
        finally:
            pipe.abort()
    finally:
        if owned:
            os.close(src)
    _report(progress, total, total, pd_id)
    return digests


def handover_fd(image: Any, *, progress: Progress | None = None, pd_id: int | None = None) -> int:
    """An fd that hands `image` to a layer that copies and measures it itself (bmid); the caller closes it.

    A plain FileImage goes as its own file, read-only: no copy and no hash
    here; the layer's one pipelined copy and hash reads it into its own
    sealed memfd, so the file may change afterwards without changing what
    was measured.  Any other PDImage is pulled (with measure_into's checks)
    into a memfd, unhashed.  progress is called as for measure_into; for a
    FileImage once, when its fd is handed over.
    """
    what = f"setup_pd{_of(pd_id)}"
    if progress is not None and not callable(progress):
        raise InvalidArgument(f"{what}: progress must be callable, got {progress!r}", pd_id=pd_id)
    if is_plain_file_image(image):
        fd = open_file_image(image, what, pd_id)
        try:
            size = _image_size(FdImage(fd), _limit(None, pd_id), pd_id)
            _report(progress, size, size, pd_id)
        except BaseException:
            os.close(fd)
            raise
        return fd
    fd = os.memfd_create(f"bmi-image-pd{pd_id}", os.MFD_CLOEXEC)
    try:
        copy_into(image, fd, progress=progress, pd_id=pd_id)
    except BaseException:
        os.close(fd)
        raise
    return fd


def hash_file(path: str, bank: str = "sha256") -> bytes:
    """EVP digest of a file's pages with no copy at all: the ceiling bench/measure.py compares against."""
    if bank not in _BANK_BIT:
        raise InvalidArgument(f"hash_file({path!r}): unknown bank {bank!r}")
    out = ffi.new("unsigned char[64]")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"hash_file({path!r}): {e.strerror}") from e
    try:
        rc = lib.bmi_hash_fd(fd, _BANK_BIT[bank], os.fstat(fd).st_size, out)
    finally:
        os.close(fd)
    if rc:
        _raise_c(rc, f"hash_file({path!r})", None)
    start, end = _DIGEST_AT[bank]
    return ffi.buffer(out)[:end - start]


__all__ = ["SUPPORTED_BANKS", "DEFAULT_MAX_IMAGE", "CHUNK_SIZE", "max_image_size", "measure_into", "copy_into",
           "handover_fd", "hash_file"]
