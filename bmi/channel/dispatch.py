"""Requests arriving on a PD's channel -> calls on the caller-scoped API (bmi.api.CallerScope).

Only translation lives here: JSON params to Python values and results back.
Who may do what is decided in bmi/api.py, as for every other caller.
"""
from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, Iterator

from ..errors import InvalidArgument
from ..image import FdImage
from ..integrity.measure import SUPPORTED_BANKS
from ..params import normalize
from ..types import PDDescription
from . import protocol as p
from .methods import METHODS, RETURNS_FD, Method

MAX_BANKS = len(SUPPORTED_BANKS)     # a request names each measured bank at most once
#: Bytes of one reply left for a result (the rest is jsonrpc, id and the braces).
RESULT_ROOM = p.MAX_MESSAGE - 512


def _check_names(params: dict, method: Method) -> None:
    """Exactly the names the method table gives (controller methods also take "pd", default: the caller)."""
    missing = [n for n in method.required if n not in params]
    extra = sorted(set(params) - method.names)
    if missing or extra:
        raise p.ProtocolError(p.INVALID_PARAMS, f"missing {missing}, unexpected {extra}"[:300])


#: Where the request this thread serves reports its progress: set by bmid for a client that asked for it.
#: A PD over its channel gets none (its requests run on the channel server's threads, which never set it).
_progress = threading.local()


@contextlib.contextmanager
def reporting_progress(report: Callable[[int, int], None]) -> Iterator[None]:
    """Progress of the request served on this thread goes to `report` (bmid: records to the caller)."""
    _progress.report = report
    try:
        yield
    finally:
        _progress.report = None


class Dispatcher:
    """The server's handler: (caller, method, params, fd) -> (result, fd or None)."""

    #: The methods that answer with (result, fd): the fd goes back with the reply.
    returns_fd = RETURNS_FD

    def __init__(self, scope_of: Callable[[int], Any]):
        self._scope_of = scope_of

    def __call__(self, caller: int, method: str, params: dict, fd: int | None) -> tuple[Any, int | None]:
        spec = METHODS.get(method)
        call = getattr(self, "m_" + method, None) if spec is not None else None
        if call is None:
            raise p.ProtocolError(p.METHOD_NOT_FOUND, f"no method {method[:64]!r} on the PD channel")
        if fd is not None and not spec.fd_in:
            raise p.ProtocolError(p.INVALID_PARAMS, f"{method} takes no fd")
        _check_names(params, spec)
        value = call(self._scope_of(caller), params, fd)
        return value if method in self.returns_fd else (value, None)

    @staticmethod
    def _ctl(scope: Any, params: dict) -> Any:
        return scope.get_controller(params.get("pd"))

    # -- the manager --------------------------------------------------------------------------
    def m_get_version(self, scope: Any, params: dict, fd: None) -> int:
        return scope.get_version()

    def m_list_pd(self, scope: Any, params: dict, fd: None) -> list[int]:
        return scope.list_pd()

    def m_get_controller(self, scope: Any, params: dict, fd: None) -> int:
        return self._ctl(scope, params).get_pd_id()

    def m_get_attestation_key(self, scope: Any, params: dict, fd: None) -> dict:
        return scope.get_attestation_key().to_wire()

    def m_allocate_pd(self, scope: Any, params: dict, fd: None) -> int:
        desc = PDDescription(params["mem"], params.get("cpu", 1), params.get("performance", 100))
        return scope.allocate_pd(desc).get_pd_id()

    def m_connect(self, scope: Any, params: dict, fd: None) -> tuple[dict, int]:
        """The one call that passes an fd back: the source's end of the new connection."""
        return scope.connect(params["tid"], p.con_type(params["con_type"]), params["mode"], params.get("size", 0))

    # -- a controller -------------------------------------------------------------------------
    def m_get_priority(self, scope: Any, params: dict, fd: None) -> int:
        return self._ctl(scope, params).get_priority()

    def m_set_priority(self, scope: Any, params: dict, fd: None) -> None:
        self._ctl(scope, params).set_priority(params["priority"])

    def m_get_current_status(self, scope: Any, params: dict, fd: None) -> str:
        return self._ctl(scope, params).get_current_status().name

    def m_request_status_change(self, scope: Any, params: dict, fd: None) -> None:
        if not isinstance(params["status"], str):
            raise p.ProtocolError(p.INVALID_PARAMS, "status is a PDStatus name, e.g. \"RUNNING\"")
        if not isinstance(params.get("progress", False), bool):
            raise p.ProtocolError(p.INVALID_PARAMS, "progress is true or false")
        report = getattr(_progress, "report", None) if params.get("progress") else None
        self._ctl(scope, params).request_status_change(params["status"], progress=report)

    def m_destroy(self, scope: Any, params: dict, fd: None) -> None:
        self._ctl(scope, params).destroy()

    def m_setup_pd(self, scope: Any, params: dict, fd: int | None) -> None:
        if fd is None:
            raise p.ProtocolError(p.INVALID_PARAMS, "setup_pd needs the image as one fd (SCM_RIGHTS)")
        banks = params.get("banks", ["sha256"])
        if not isinstance(banks, list) or not 1 <= len(banks) <= MAX_BANKS:
            raise InvalidArgument(f"setup_pd: banks must be a list of 1..{MAX_BANKS} names")
        self._ctl(scope, params).setup_pd(FdImage(fd), banks=banks)

    def m_set_allowed_connections(self, scope: Any, params: dict, fd: None) -> None:
        if not isinstance(params["policies"], list):
            raise p.ProtocolError(p.INVALID_PARAMS, "policies must be a list")
        policies = [p.policy_from_wire(x) for x in params["policies"]]
        self._ctl(scope, params).set_allowed_connections(params["tid"], policies,
                                                         params.get("disable_existing", False))

    def m_get_allowed_connections(self, scope: Any, params: dict, fd: None) -> list[dict]:
        return [p.policy_to_wire(x) for x in self._ctl(scope, params).get_allowed_connections(params["tid"])]

    def m_set_config_param(self, scope: Any, params: dict, fd: None) -> None:
        self._ctl(scope, params).set_config_param(params["name"], params["value"])

    def m_get_config_param(self, scope: Any, params: dict, fd: None) -> str:
        return self._ctl(scope, params).get_config_param(params["name"])

    def m_set_runtime_param(self, scope: Any, params: dict, fd: None) -> None:
        self._ctl(scope, params).set_runtime_param(params["name"], params["value"])

    def m_get_runtime_param(self, scope: Any, params: dict, fd: None) -> str:
        value = self._ctl(scope, params).get_runtime_param(params["name"])
        name = normalize(params["name"], what="get_runtime_param", pd_id=None)
        if name == "/console/log" and getattr(scope, "one_frame_replies", False):
            return _tail_that_fits(value)       # a PD's channel has one frame per reply (bmid's clients more)
        return value

    def m_list_runtime_params(self, scope: Any, params: dict, fd: None) -> list[dict]:
        caps = self._ctl(scope, params).list_runtime_params(params.get("root", "/"))
        return [p.capability_to_wire(c) for c in caps]

    def m_get_integrity_link(self, scope: Any, params: dict, fd: None) -> dict:
        report = self._ctl(scope, params).get_integrity_link(p.hex_bytes(params["nonce"], "nonce"))
        return p.report_to_wire(report)

    def m_get_protected_credentials(self, scope: Any, params: dict, fd: None) -> str:
        policy = p.integrity_policy_from_wire(params["policy"])
        blob = p.hex_bytes(params["protected_credentials"], "protected_credentials")
        return self._ctl(scope, params).get_protected_credentials(policy, blob).hex()


def _tail_that_fits(text: str) -> str:
    """The most recent part of a log whose JSON fits one reply (a character takes 1 to 12 bytes there)."""
    excess = len(json.dumps(text)) - RESULT_ROOM
    return text[excess:] if excess > 0 else text
