"""Every request of the PD channel and of bmid, written once (like libvirt's remote_protocol.x).

Each row says the method's parameters (wire types; `?` marks an optional
one), what it answers, whether it only reads (bmid's read-only group may
call it), whether only a client of bmid may call it (not a PD over its
channel), and whether an fd travels with the request or the reply.  The
dispatcher checks parameter names against it, bmid takes its read-only set
and its fd replies from it, and tests hold the clients (bmi/pd.py,
bmi/system.py), the dispatchers and docs/protocol.md's method list to it.
Who may do what with whom stays in bmi/api.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

MANAGER = "manager"             # a call on the manager: no `pd` parameter
CONTROLLER = "controller"       # a call on one PD: `pd`? (default: the caller itself)


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[str, ...]         # "name:type", "name?:type" when optional
    result: str
    target: str = CONTROLLER
    read_only: bool = False
    bmid_only: bool = False         # only a client of bmid (a PD over its channel gets PermissionDenied)
    fd_in: bool = False             # the request carries one fd (SCM_RIGHTS)
    fd_out: bool = False            # the reply may carry one fd
    server: bool = False            # answered by the server itself, not the dispatcher (accept, subscribe)

    @cached_property
    def required(self) -> tuple[str, ...]:
        return tuple(n for n, _ in map(_split, self.params) if not n.endswith("?"))

    @cached_property
    def optional(self) -> tuple[str, ...]:
        return tuple(n[:-1] for n, _ in map(_split, self.params) if n.endswith("?"))

    @cached_property
    def names(self) -> frozenset[str]:
        """Every parameter name the method takes (controller methods also `pd`)."""
        return frozenset(self.required + self.optional + (("pd",) if self.target == CONTROLLER else ()))


def _split(param: str) -> tuple[str, str]:
    name, _, kind = param.partition(":")
    return name, kind


_ROWS = (
    # -- the manager (spec 7.1) ------------------------------------------------------------------
    Method("get_version", (), "int", MANAGER, read_only=True),
    Method("list_pd", (), "[int]", MANAGER, read_only=True),
    Method("get_controller", (), "int (checks access)", read_only=True),
    Method("allocate_pd", ("mem:int", "cpu?:int", "performance?:int"), "int (the new PD's id)", MANAGER),
    Method("get_attestation_key", (), "{pem, fingerprint, public_area, ek_pem, ...}", MANAGER, read_only=True),
    Method("connect", ("tid:int", "con_type:str", "mode:int", "size?:int"), "connection", MANAGER, fd_out=True),
    Method("accept", ("timeout?:number|null",), "connection or null", MANAGER, fd_out=True, server=True),
    # -- a controller (spec 7.2) ----------------------------------------------------------------
    Method("get_priority", (), "int", read_only=True),
    Method("set_priority", ("priority:int",), "null"),
    Method("get_current_status", (), "status name", read_only=True),
    Method("request_status_change", ("status:str",), "null"),
    Method("destroy", (), "null"),
    Method("setup_pd", ("banks?:[str]",), "null", fd_in=True),
    Method("set_allowed_connections", ("tid:int", "policies:[{con_type, mode}]", "disable_existing?:bool"), "null"),
    Method("get_allowed_connections", ("tid:int",), "[{con_type, mode}]", read_only=True),
    Method("set_config_param", ("name:str", "value:str"), "null"),
    Method("get_config_param", ("name:str",), "str", read_only=True),
    Method("set_runtime_param", ("name:str", "value:str"), "null"),
    Method("get_runtime_param", ("name:str",), "str", read_only=True),
    Method("list_runtime_params", ("root?:str",), "[{name, read, write}]", read_only=True),
    Method("get_integrity_link", ("nonce:hex",), "IntegrityReport fields", read_only=True),
    Method("get_protected_credentials", ("policy:{pd_integrity, pd_connections}", "protected_credentials:hex"),
           "hex (\"\" when refused)"),
    # -- bmid's clients only (bmi/server/daemon.py SystemDispatcher) -----------------------------
    Method("describe", (), "[{pd, name, status, parent, mem, cpu, priority, sha256}]", MANAGER, read_only=True,
           bmid_only=True),
    Method("layer_info", (), "{driver facts}", MANAGER, read_only=True, bmid_only=True),
    Method("measurement", (), "{bank: hex}", read_only=True, bmid_only=True),
    Method("read_console", ("since?:int", "timeout?:number"), "{offset, data}", read_only=True, bmid_only=True),
    Method("wait", ("timeout?:number|null",), "status name", read_only=True, bmid_only=True),
    Method("seal_credentials", ("policy:{pd_integrity, pd_connections}", "secret:hex"), "hex", MANAGER,
           bmid_only=True),
    Method("get_storage_public", (), "hex", MANAGER, read_only=True, bmid_only=True),
    Method("list_devices", (), "[str]", MANAGER, read_only=True, bmid_only=True),
    Method("assigned", (), "[str]", read_only=True, bmid_only=True),
    Method("assign", ("device:str", "mode?:int", "shared?:bool"), "null", bmid_only=True),
    Method("unassign", ("device:str",), "null", bmid_only=True),
    Method("create_network", ("name:str", "subnet:str", "nat?:bool"), "null", MANAGER, bmid_only=True),
    Method("list_networks", (), "[{name, subnet, nat, bridge}]", MANAGER, read_only=True, bmid_only=True),
    Method("destroy_network", ("name:str",), "null", MANAGER, bmid_only=True),
    Method("status_board", (), "{} + an O_RDONLY fd of the status memfd", MANAGER, read_only=True,
           bmid_only=True, fd_out=True),
    Method("subscribe", ("since?:int",), "{last}, then events", MANAGER, read_only=True, bmid_only=True,
           server=True),
)

METHODS: dict[str, Method] = {m.name: m for m in _ROWS}

#: What bmid's read-only group may call.
READ_ONLY = frozenset(m.name for m in _ROWS if m.read_only)
#: Methods whose reply may pass an fd back.
RETURNS_FD = frozenset(m.name for m in _ROWS if m.fd_out)
#: Methods a PD's channel answers (the rest only bmid's clients).
PD_CHANNEL = frozenset(m.name for m in _ROWS if not m.bmid_only)
