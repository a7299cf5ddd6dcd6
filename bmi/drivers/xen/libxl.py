"""The one Python module that touches bmi._xen (csrc/xen/xen.c over libxl and libxenstore).

It turns the shim's return codes into bmi exceptions that carry libxl's
own error text, and hands out plain ints, strs and tuples only.  Every
method takes `what` (the request being served, e.g. "pause of PD 3") and
`pd_id` so the error says what was asked, of which PD, and why.
"""
from __future__ import annotations

import errno
import os
import uuid
from dataclasses import dataclass
from typing import Iterable

from ...errors import (BMIError, DriverUnavailable, InvalidArgument, NoSuchDomain, NotSupported,
                       PermissionDenied, ResourceError)

try:
    from ..._xen import ffi, lib
except ImportError as e:            # built only where libxen-dev was installed
    ffi = lib = None
    _IMPORT_ERROR: str | None = str(e)
else:
    _IMPORT_ERROR = None

INVALID_DOMID = 0xFFFFFFFF
PERM_NONE, PERM_READ, PERM_WRITE, PERM_RW = 0, 1, 2, 3


def _by_value(*names: str) -> dict[int, str]:
    """{BMI_XEN_<NAME>: name} read from the shim's cdef (csrc/xen/xen.h); empty where the shim is not built."""
    return {} if lib is None else {getattr(lib, "BMI_XEN_" + n.upper()): n for n in names}


STATES = _by_value("running", "blocked", "paused", "shutdown", "dying")
SHUTDOWN_REASONS = _by_value("poweroff", "reboot", "suspend", "crash", "watchdog", "soft_reset")
_PATH_MAX = 4096

# libxl error codes (libxl_error) -> the bmi exception they mean
_LIBXL_ERRORS: dict[int, type[BMIError]] = {
    -4: NotSupported,       # ERROR_NI
    -5: ResourceError,      # ERROR_NOMEM
    -6: InvalidArgument,    # ERROR_INVAL
    -10: NotSupported,      # ERROR_NOPARAVIRT
    -13: ResourceError,     # ERROR_BUFFERFULL
    -21: NoSuchDomain,      # ERROR_DOMAIN_NOTFOUND
    -24: NoSuchDomain,      # ERROR_DOMAIN_DESTROYED
    -25: NotSupported,      # ERROR_FEATURE_REMOVED
}
_ERRNO_ERRORS: dict[int, type[BMIError]] = {
    errno.EACCES: PermissionDenied, errno.EPERM: PermissionDenied, errno.EINVAL: InvalidArgument,
    errno.ENOENT: InvalidArgument, errno.E2BIG: InvalidArgument, errno.ENOSPC: ResourceError,
    errno.ENOMEM: ResourceError, errno.EDQUOT: ResourceError,
}


def unavailable_reason() -> str | None:
    """Why the shim cannot be used here, or None when it was built."""
    if _IMPORT_ERROR is None:
        return None
    return (f"the Xen shim bmi._xen is not built ({_IMPORT_ERROR}); install libxen-dev "
            f"(apt-get install libxen-dev) and rebuild bmi")


@dataclass(frozen=True)
class PhysInfo:
    cpus: int
    total_memory: int       # bytes
    free_memory: int        # bytes
    pvh: bool               # the CPU can run PVH guests (HVM with HAP)


@dataclass(frozen=True)
class DomainInfo:
    state: str                      # one of STATES' values
    shutdown_reason: str | None     # one of SHUTDOWN_REASONS' values while shut down
    memory: int                     # bytes the domain holds now
    max_memory: int                 # bytes
    vcpus_online: int               # vCPUs the guest actually runs
    cpu_ns: int


class Xen:
    """One libxl context plus one xenstore connection; thread-safe (libxl and xenstore lock inside)."""

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise DriverUnavailable(f"open the Xen driver: {reason}")
        out = ffi.new("bmi_xen **")
        rc = lib.bmi_xen_open(out)
        if rc:
            text = ffi.string(lib.bmi_xen_last_error(ffi.NULL)).decode(errors="replace")
            raise DriverUnavailable(f"open the Xen driver: cannot reach the Xen toolstack "
                                    f"(libxl {_strerror(rc)}): {text or 'no detail'}; bmi's Xen driver "
                                    f"runs in dom0 as root with xenstored running")
        self._h = out[0]

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            lib.bmi_xen_close(h)

    # -- errors ---------------------------------------------------------------------------
    def _check(self, rc: int, call: str, what: str, pd_id: int | None) -> int:
        if rc >= 0:
            return rc
        text = ffi.string(lib.bmi_xen_last_error(self._h)).decode(errors="replace")
        kind = _LIBXL_ERRORS.get(rc, ResourceError)
        raise kind(f"{what}: libxl {call} failed ({_strerror(rc)})" + (f": {text}" if text else ""),
                   pd_id=pd_id)

    @staticmethod
    def _check_xs(rc: int, call: str, path: str, what: str, pd_id: int | None) -> int:
        if rc >= 0:
            return rc
        kind = _ERRNO_ERRORS.get(-rc, ResourceError)
        raise kind(f"{what}: xenstore {call} {path!r} failed: {os.strerror(-rc)}", pd_id=pd_id)

    # -- host -----------------------------------------------------------------------------
    def physinfo(self, *, what: str = "physinfo", pd_id: int | None = None) -> PhysInfo:
        cpus, total, free, pvh = ffi.new("int *"), ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("int *")
        self._check(lib.bmi_xen_physinfo(self._h, cpus, total, free, pvh), "get_physinfo", what, pd_id)
        return PhysInfo(cpus[0], total[0] * 1024, free[0] * 1024, bool(pvh[0]))

    def domains(self, *, what: str = "list domains") -> list[tuple[int, str]]:
        size = 64
        while True:
            domids, states = ffi.new("uint32_t[]", size), ffi.new("int[]", size)
            n = self._check(lib.bmi_xen_list(self._h, domids, states, size), "list_domain", what, None)
            if n <= size:
                return [(domids[i], STATES.get(states[i], "unknown")) for i in range(n)]
            size = n

    # -- domains --------------------------------------------------------------------------
    def create(self, config_json: str, *, what: str, pd_id: int | None) -> int:
        """Build a domain from libxl JSON; it is left paused."""
        domid = ffi.new("uint32_t *")
        self._check(lib.bmi_xen_create(self._h, config_json.encode(), domid), "domain_create_new", what, pd_id)
        return domid[0]

    def restore(self, config_json: str, fd: int, *, what: str, pd_id: int | None) -> int:
        """Rebuild a domain from a save stream at fd's offset; it is left paused."""
        domid = ffi.new("uint32_t *")
        self._check(lib.bmi_xen_restore(self._h, config_json.encode(), fd, domid), "domain_create_restore",
                    what, pd_id)
        return domid[0]

    def suspend(self, domid: int, fd: int, *, what: str, pd_id: int | None) -> None:
        """Write the domain's save stream to fd; the domain is then shut down (reason suspend)."""
        self._check(lib.bmi_xen_suspend(self._h, domid, fd), "domain_suspend", what, pd_id)

    def pause(self, domid: int, *, what: str, pd_id: int | None) -> None:
        self._check(lib.bmi_xen_pause(self._h, domid), "domain_pause", what, pd_id)

    def unpause(self, domid: int, *, what: str, pd_id: int | None) -> None:
        self._check(lib.bmi_xen_unpause(self._h, domid), "domain_unpause", what, pd_id)

    def shutdown(self, domid: int, *, what: str, pd_id: int | None) -> None:
        self._check(lib.bmi_xen_shutdown(self._h, domid), "domain_shutdown", what, pd_id)

    def reboot(self, domid: int, *, what: str, pd_id: int | None) -> None:
        self._check(lib.bmi_xen_reboot(self._h, domid), "domain_reboot", what, pd_id)

    def destroy(self, domid: int, *, what: str, pd_id: int | None) -> None:
        self._check(lib.bmi_xen_destroy(self._h, domid), "domain_destroy", what, pd_id)

    def set_memory(self, domid: int, nbytes: int, *, what: str, pd_id: int | None) -> None:
        self._check(lib.bmi_xen_set_memory(self._h, domid, nbytes // 1024), "set_memory_target", what, pd_id)

    def set_max_memory(self, domid: int, nbytes: int, *, what: str, pd_id: int | None) -> None:
        self._check(lib.bmi_xen_set_maxmem(self._h, domid, nbytes // 1024), "domain_setmaxmem", what, pd_id)

    def memory_target(self, domid: int, *, what: str, pd_id: int | None) -> int:
        out = ffi.new("uint64_t *")
        self._check(lib.bmi_xen_memory_target(self._h, domid, out), "get_memory_target", what, pd_id)
        return out[0] * 1024

    def set_vcpus(self, domid: int, online: int, max_vcpus: int, *, what: str, pd_id: int | None) -> None:
        self._check(lib.bmi_xen_set_vcpus(self._h, domid, online, max_vcpus), "set_vcpuonline", what, pd_id)

    def sched(self, domid: int, *, what: str, pd_id: int | None) -> tuple[int, int, int]:
        """(scheduler, weight, cap) of the domain; scheduler BMI_XEN_CREDIT2 is credit2."""
        sched, weight, cap = ffi.new("int *"), ffi.new("int *"), ffi.new("int *")
        self._check(lib.bmi_xen_sched_get(self._h, domid, sched, weight, cap), "domain_sched_params_get",
                    what, pd_id)
        return sched[0], weight[0], cap[0]

    def set_sched(self, domid: int, *, weight: int | None = None, cap: int | None = None, what: str,
                  pd_id: int | None) -> None:
        self._check(lib.bmi_xen_sched_set(self._h, domid, -1 if weight is None else weight,
                                          -1 if cap is None else cap), "domain_sched_params_set", what, pd_id)

    def info(self, domid: int, *, what: str, pd_id: int | None) -> DomainInfo | None:
        """The domain's state, or None when no domain has that id."""
        state, reason = ffi.new("int *"), ffi.new("int *")
        cur, mx, online, cpu = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("int *"), ffi.new("uint64_t *")
        rc = lib.bmi_xen_info(self._h, domid, state, reason, cur, mx, online, cpu)
        if rc == -21:           # ERROR_DOMAIN_NOTFOUND
            return None
        self._check(rc, "domain_info", what, pd_id)
        return DomainInfo(STATES.get(state[0], "unknown"), SHUTDOWN_REASONS.get(reason[0]), cur[0] * 1024,
                          mx[0] * 1024, online[0], cpu[0])

    def uuid(self, domid: int, *, what: str, pd_id: int | None) -> str | None:
        """The domain's UUID (as str(uuid.UUID)), or None when no domain has that id."""
        raw = ffi.new("uint8_t[16]")
        rc = lib.bmi_xen_uuid(self._h, domid, raw)
        if rc == -21:           # ERROR_DOMAIN_NOTFOUND
            return None
        self._check(rc, "domain_info", what, pd_id)
        return str(uuid.UUID(bytes=bytes(ffi.buffer(raw, 16))))

    def console_tty(self, domid: int, *, what: str, pd_id: int | None) -> str:
        buf = ffi.new("char[]", _PATH_MAX)
        self._check(lib.bmi_xen_console_tty(self._h, domid, buf, _PATH_MAX), "console_get_tty", what, pd_id)
        return ffi.string(buf).decode()

    # -- xenstore -------------------------------------------------------------------------
    def xs_read(self, path: str, *, what: str, pd_id: int | None = None) -> str | None:
        """The node's value, or None when it does not exist."""
        n, err = ffi.new("unsigned int *"), ffi.new("int *")
        raw = lib.bmi_xs_read(self._h, path.encode(), n, err)
        if raw == ffi.NULL:
            if err[0] == -errno.ENOENT:
                return None
            self._check_xs(err[0], "read", path, what, pd_id)
        try:
            return ffi.unpack(raw, n[0]).decode(errors="replace")
        finally:
            lib.bmi_xen_free(raw)

    def xs_write(self, path: str, value: str, *, what: str, pd_id: int | None = None) -> None:
        data = value.encode()
        self._check_xs(lib.bmi_xs_write(self._h, path.encode(), data, len(data)), "write", path, what, pd_id)

    def xs_directory(self, path: str, *, what: str, pd_id: int | None = None) -> list[str]:
        """The node's children, [] when it does not exist."""
        n, err = ffi.new("unsigned int *"), ffi.new("int *")
        raw = lib.bmi_xs_directory(self._h, path.encode(), n, err)
        if raw == ffi.NULL:
            if err[0] == -errno.ENOENT:
                return []
            self._check_xs(err[0], "directory", path, what, pd_id)
        try:
            blob = ffi.unpack(raw, n[0])
        finally:
            lib.bmi_xen_free(raw)
        return [name.decode(errors="replace") for name in blob.split(b"\0")[:-1]]

    def xs_mkdir(self, path: str, *, what: str, pd_id: int | None = None) -> None:
        self._check_xs(lib.bmi_xs_mkdir(self._h, path.encode()), "mkdir", path, what, pd_id)

    def xs_rm(self, path: str, *, what: str, pd_id: int | None = None) -> None:
        rc = lib.bmi_xs_rm(self._h, path.encode())
        if rc != -errno.ENOENT:
            self._check_xs(rc, "rm", path, what, pd_id)

    def xs_set_perms(self, path: str, perms: Iterable[tuple[int, int]], *, what: str,
                     pd_id: int | None = None) -> None:
        """perms[0] is (owner, what everyone else may do); the rest grant single domains."""
        perms = list(perms)
        domids = ffi.new("unsigned int[]", [d for d, _ in perms])
        modes = ffi.new("int[]", [m for _, m in perms])
        self._check_xs(lib.bmi_xs_set_perms(self._h, path.encode(), domids, modes, len(perms)),
                       "set_permissions", path, what, pd_id)

    def xs_get_perms(self, path: str, *, what: str, pd_id: int | None = None) -> list[tuple[int, int]]:
        size = 16
        while True:
            domids, modes = ffi.new("unsigned int[]", size), ffi.new("int[]", size)
            n = self._check_xs(lib.bmi_xs_get_perms(self._h, path.encode(), domids, modes, size),
                               "get_permissions", path, what, pd_id)
            if n <= size:
                return [(domids[i], modes[i]) for i in range(n)]
            size = n

    def xs_watch(self, path: str, token: str, *, what: str) -> None:
        self._check_xs(lib.bmi_xs_watch(self._h, path.encode(), token.encode()), "watch", path, what, None)

    def xs_unwatch(self, path: str, token: str, *, what: str) -> None:
        self._check_xs(lib.bmi_xs_unwatch(self._h, path.encode(), token.encode()), "unwatch", path, what, None)

    def xs_fileno(self) -> int:
        """Readable when watch events are queued (then call xs_watch_events)."""
        return lib.bmi_xs_fileno(self._h)

    def xs_watch_events(self) -> list[tuple[str, str]]:
        """Every queued (path, token) watch event, without blocking."""
        path, token = ffi.new("char[]", _PATH_MAX), ffi.new("char[]", 256)
        events = []
        while True:
            rc = self._check_xs(lib.bmi_xs_check_watch(self._h, path, _PATH_MAX, token, 256), "check_watch", "",
                                "xenstore watch", None)
            if rc == 0:
                return events
            events.append((ffi.string(path).decode(errors="replace"), ffi.string(token).decode(errors="replace")))


def _strerror(rc: int) -> str:
    return ffi.string(lib.bmi_xen_strerror(rc)).decode()
