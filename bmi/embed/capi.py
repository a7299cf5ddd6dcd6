"""bmi.h's calls, written against bmi's public Python API (run inside libbmi.so).

One translation for every call: `_c_call` turns an exception into the
call's failure value (-1, NULL or 0) and the per-thread error that
bmi_last_error_code() / bmi_last_error() read; nothing above it sees a
cffi object, nothing below it sees a C error convention.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Callable

import bmi
from bmi.channel.protocol import ERROR_CODES, INTERNAL_ERROR
from bmi.errors import BMIError, ImageError, InvalidArgument

_managers: dict[Any, "_Open"] = {}                # bmi_manager pointer -> what it stands for
_managers_lock = threading.Lock()
_tokens = itertools.count(1)
_ffi: Any = None
_lib: Any = None
_exports: dict[str, tuple[Callable[..., Any], Any]] = {}
_NULL = object()         # the failure value of a call returning a pointer


def error_code(exc: BaseException) -> int:
    """The BMI_E_* of an exception: the protocol's code of its most specific bmi class, else BMI_E_INTERNAL."""
    if isinstance(exc, BMIError):
        return ERROR_CODES[next(c for c in type(exc).__mro__ if c in ERROR_CODES)]
    return INTERNAL_ERROR


def _c_call(failure: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Export a function under its own name: an exception becomes `failure` (NULL for _NULL) and this
    thread's last error (cffi's onerror: no wrapper frame on the way in)."""
    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        _exports[func.__name__] = (func, failure)
        return func
    return register


def _record_error(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """cffi calls this when an exported function raised; nothing may unwind into C."""
    message = str(exc) if isinstance(exc, BMIError) else f"internal error: {exc_type.__name__}: {exc}"
    _lib.bmi__set_error(error_code(exc), message.encode("utf-8", "replace"))


def install(ffi: Any, lib: Any) -> None:
    """Bind every exported call to libbmi's cffi module (its embedding_init_code calls this once)."""
    global _ffi, _lib
    _ffi, _lib = ffi, lib
    for name, (func, failure) in _exports.items():
        on_error = {} if failure is _NULL or failure is None else {"error": failure}
        ffi.def_extern(name=name, onerror=_record_error, **on_error)(func)


# -- conversions ------------------------------------------------------------------------------------
def _text(p: Any, what: str) -> str:
    if p == _ffi.NULL:
        raise InvalidArgument(f"{what}: NULL")
    raw = _ffi.string(p)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{what}: not UTF-8 ({e.reason} at byte {e.start} of {raw[:60]!r})") from None


def _bytes(p: Any, n: int, what: str) -> bytes:
    if p == _ffi.NULL and n:
        raise InvalidArgument(f"{what}: NULL with a length of {n}")
    return bytes(_ffi.buffer(p, n)) if n else b""


def _c_string(value: str) -> Any:
    """A malloc'ed copy of value for the caller to bmi_free."""
    data = value.encode("utf-8")
    p = _lib.bmi__strdup(data, len(data))
    if p == _ffi.NULL:
        raise MemoryError("malloc failed")
    return p


class _Open:
    """An open manager and the controllers handed out so far (each of its calls checks its PD still exists)."""

    def __init__(self, mgr: Any):
        self.mgr = mgr
        self.controllers: dict[int, Any] = {}


def _open(p: Any, what: str) -> _Open:
    found = _managers.get(p)       # cffi pointers hash by address; one dict read is atomic under the GIL
    if found is None:
        raise InvalidArgument(f"{what}: {'NULL' if p == _ffi.NULL else 'not an open bmi_manager'}")
    return found


def _manager(p: Any, what: str) -> Any:
    return _open(p, what).mgr


def _pd(p: Any, pd_id: int, what: str) -> Any:
    found = _open(p, what)
    pd = found.controllers.get(pd_id)
    if pd is None:
        try:
            pd = found.controllers[pd_id] = found.mgr.get_controller(pd_id)
        except BMIError as e:       # say which C call asked
            raise type(e)(str(e).replace("get_controller", what, 1), pd_id=e.pd_id) from None
    return pd


def _store_hex(out: Any, digest: bytes | None) -> None:
    if out != _ffi.NULL and digest is not None:
        _ffi.memmove(out, digest.hex().encode() + b"\0", 65)


# -- spec 7.1 ---------------------------------------------------------------------------------------
@_c_call(_NULL)
def bmi_open(uri: Any) -> Any:
    mgr = bmi.open(None if uri == _ffi.NULL else _text(uri, "bmi_open: uri"))
    token = next(_tokens) * 16          # never reused, never dereferenced: a stale pointer is refused
    with _managers_lock:
        pointer = _ffi.cast("bmi_manager *", token)
        _managers[pointer] = _Open(mgr)
    return pointer


@_c_call(None)
def bmi_close(p: Any) -> None:
    if p == _ffi.NULL:
        return
    with _managers_lock:
        found = _managers.pop(p, None)
    if found is None:
        raise InvalidArgument("bmi_close: not an open bmi_manager")
    found.mgr.close()


@_c_call(0)
def bmi_get_version(p: Any) -> int:
    return _manager(p, "bmi_get_version").get_version()


@_c_call(-1)
def bmi_allocate_pd(p: Any, mem: int, cpus: int, performance: int) -> int:
    mgr = _manager(p, "bmi_allocate_pd")
    return mgr.allocate_pd(bmi.PDDescription(mem=mem, cpu=cpus, performance=performance)).get_pd_id()


@_c_call(-1)
def bmi_list_pd(p: Any, ids: Any, capacity: int) -> int:
    listed = _manager(p, "bmi_list_pd").list_pd()
    if capacity and ids == _ffi.NULL:
        raise InvalidArgument(f"bmi_list_pd: ids is NULL with a capacity of {capacity}")
    for i, pd_id in enumerate(listed[:capacity]):
        ids[i] = pd_id
    return len(listed)


# -- spec 7.2 ---------------------------------------------------------------------------------------
def _setup(p: Any, pd_id: int, image: Any, out: Any, what: str) -> int:
    pd = _pd(p, pd_id, what)
    pd.setup_pd(image)
    _store_hex(out, pd.measurement().get("sha256"))
    return 0


@_c_call(-1)
def bmi_setup_pd_file(p: Any, pd_id: int, path: Any, out: Any) -> int:
    return _setup(p, pd_id, bmi.FileImage(_text(path, f"bmi_setup_pd_file of PD {pd_id}: path")), out,
                  "bmi_setup_pd_file")


@_c_call(-1)
def bmi_setup_pd_buffer(p: Any, pd_id: int, data: Any, length: int, out: Any) -> int:
    image = bmi.BytesImage(_bytes(data, length, f"bmi_setup_pd_buffer of PD {pd_id}: data"))
    return _setup(p, pd_id, image, out, "bmi_setup_pd_buffer")


class _CallbackImage:
    """The spec's PDImage backed by the caller's two C functions."""

    def __init__(self, get_size: Any, get_data: Any, ctx: Any, pd_id: int):
        self._get_size, self._get_data, self._ctx, self._pd_id = get_size, get_data, ctx, pd_id

    def get_image_size(self) -> int:
        return int(self._get_size(self._ctx))

    def get_data(self, offset: int, length: int) -> bytes:
        buf = _ffi.new("char[]", length)
        got = self._get_data(self._ctx, offset, buf, length)
        if not 0 <= got <= length:
            raise ImageError(f"bmi_setup_pd_callback of PD {self._pd_id}: get_data at offset {offset} returned "
                             f"{got} (asked for {length} bytes)", pd_id=self._pd_id)
        return _ffi.buffer(buf, got)[:]


@_c_call(-1)
def bmi_setup_pd_callback(p: Any, pd_id: int, get_size: Any, get_data: Any, ctx: Any, out: Any) -> int:
    if get_size == _ffi.NULL or get_data == _ffi.NULL:
        raise InvalidArgument(f"bmi_setup_pd_callback of PD {pd_id}: get_size and get_data must not be NULL",
                              pd_id=pd_id)
    return _setup(p, pd_id, _CallbackImage(get_size, get_data, ctx, pd_id), out, "bmi_setup_pd_callback")


def _set_param(kind: str, p: Any, pd_id: int, name: Any, value: Any) -> int:
    """set_config_param / set_runtime_param (kind "config" / "runtime")."""
    what = f"bmi_set_{kind}_param of PD {pd_id}"
    setter = getattr(_pd(p, pd_id, what), f"set_{kind}_param")
    setter(_text(name, what + ": name"), _text(value, what + ": value"))
    return 0


def _get_param(kind: str, p: Any, pd_id: int, name: Any) -> Any:
    what = f"bmi_get_{kind}_param of PD {pd_id}"
    return _c_string(getattr(_pd(p, pd_id, what), f"get_{kind}_param")(_text(name, what + ": name")))


@_c_call(-1)
def bmi_set_config_param(p: Any, pd_id: int, name: Any, value: Any) -> int:
    return _set_param("config", p, pd_id, name, value)


@_c_call(_NULL)
def bmi_get_config_param(p: Any, pd_id: int, name: Any) -> Any:
    return _get_param("config", p, pd_id, name)


@_c_call(-1)
def bmi_set_runtime_param(p: Any, pd_id: int, name: Any, value: Any) -> int:
    return _set_param("runtime", p, pd_id, name, value)


@_c_call(_NULL)
def bmi_get_runtime_param(p: Any, pd_id: int, name: Any) -> Any:
    return _get_param("runtime", p, pd_id, name)


@_c_call(-1)
def bmi_set_priority(p: Any, pd_id: int, priority: int) -> int:
    _pd(p, pd_id, "bmi_set_priority").set_priority(priority)
    return 0


@_c_call(-1)
def bmi_get_priority(p: Any, pd_id: int, out: Any) -> int:
    if out == _ffi.NULL:
        raise InvalidArgument(f"bmi_get_priority of PD {pd_id}: priority is NULL", pd_id=pd_id)
    out[0] = _pd(p, pd_id, "bmi_get_priority").get_priority()
    return 0


@_c_call(-1)
def bmi_request_status_change(p: Any, pd_id: int, status: int) -> int:
    _pd(p, pd_id, "bmi_request_status_change").request_status_change(status)
    return 0


@_c_call(-1)
def bmi_get_current_status(p: Any, pd_id: int) -> int:
    return int(_pd(p, pd_id, "bmi_get_current_status").get_current_status())


@_c_call(-1)
def bmi_wait(p: Any, pd_id: int, timeout: float, exit_status: Any) -> int:
    pd = _pd(p, pd_id, "bmi_wait")
    status = pd.wait(None if timeout < 0 else timeout)
    if exit_status != _ffi.NULL:
        code = -1
        if status in (bmi.PDStatus.SHUTDOWN, bmi.PDStatus.CRASHED):
            try:                # absent when the program was killed
                code = int(pd.get_runtime_param("/system/exit-status"))
            except BMIError:
                pass
        exit_status[0] = code
    return int(status)


@_c_call(-1)
def bmi_destroy(p: Any, pd_id: int) -> int:
    _pd(p, pd_id, "bmi_destroy").destroy()
    _open(p, "bmi_destroy").controllers.pop(pd_id, None)
    return 0


@_c_call(-1)
def bmi_set_allowed_connections(p: Any, pd_id: int, peer: int, types: Any, modes: Any, n: int,
                                disable_existing: int) -> int:
    what = f"bmi_set_allowed_connections of PD {pd_id}"
    if n and (types == _ffi.NULL or modes == _ffi.NULL):
        raise InvalidArgument(f"{what}: types or modes is NULL with n = {n}", pd_id=pd_id)
    policies = []
    for i in range(n):
        try:
            con_type = bmi.ConnectionType(types[i])
        except ValueError:
            raise InvalidArgument(f"{what}: types[{i}] = {types[i]} is not a BMI_CONN_*", pd_id=pd_id) from None
        policies.append(bmi.ConnectionPolicy(con_type, modes[i]))
    _pd(p, pd_id, what).set_allowed_connections(peer, policies, bool(disable_existing))
    return 0


# -- spec 7.4 ---------------------------------------------------------------------------------------
@_c_call(-1)
def bmi_get_attestation_key(p: Any, pem: Any, fingerprint: Any) -> int:
    key = _manager(p, "bmi_get_attestation_key").get_attestation_key()
    pem_copy = _c_string(key.pem) if pem != _ffi.NULL else None
    if fingerprint != _ffi.NULL:
        fingerprint[0] = _c_string(key.fingerprint)
    if pem_copy is not None:
        pem[0] = pem_copy
    return 0


@_c_call(-1)
def bmi_get_integrity_link(p: Any, pd_id: int, nonce: Any, nonce_len: int, report: Any) -> int:
    what = f"bmi_get_integrity_link of PD {pd_id}"
    if report == _ffi.NULL:
        raise InvalidArgument(f"{what}: report_json is NULL", pd_id=pd_id)
    link = _pd(p, pd_id, what).get_integrity_link(_bytes(nonce, nonce_len, what + ": nonce"))
    report[0] = _c_string(link.to_json())
    return 0


@_c_call(-1)
def bmi_verify_report(report: Any, nonce: Any, nonce_len: int, pd_integrity: Any, ak: Any) -> int:
    what = "bmi_verify_report"
    parsed = bmi.IntegrityReport.from_json(_text(report, what + ": report_json"))
    digest_hex = _text(pd_integrity, what + ": pd_integrity_hex")
    try:
        digest = bytes.fromhex(digest_hex)
    except ValueError:
        raise InvalidArgument(f"{what}: pd_integrity_hex {digest_hex[:80]!r} is not hex") from None
    bmi.verify_report(parsed, nonce=_bytes(nonce, nonce_len, what + ": nonce"), pd_integrity=digest,
                      ak=_text(ak, what + ": ak_pem_or_fingerprint"))
    return 0
