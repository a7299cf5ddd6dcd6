"""Every request of the PD channel and of bmid, written once (like libvirt's remote_protocol.x).

Each row says the method's parameters, what it answers, whether it only
reads (bmid's read-only group may call it), whether only a client of bmid
may call it (not a PD over its channel), and whether an fd travels with the
request or the reply.  The dispatcher checks parameter names against it,
bmid takes its read-only set and its fd replies from it, and the clients'
methods (bmi/pd.py, bmi/system.py) are built from their rows by
bmi/channel/client.py; tests hold the dispatchers and docs/protocol.md's
method list to it.  Who may do what with whom stays in bmi/api.py.

A parameter is "name:type" (required), "name:type=default" (optional; the
Python default of the client method) or "name?:type" (optional, sent only by
a hand-written client method).  Types are the names bmi/channel/client.py
converts between Python values and the wire.  A controller method also takes
`pd` (default: the caller itself); a client's Python name for `pd` is `pd_id`.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cached_property

MANAGER = "manager"             # a call on the manager: no `pd` parameter
CONTROLLER = "controller"       # a call on one PD: `pd`? (default: the caller itself)
DEVICES = "devices"             # a call on the DeviceManager: `pd` only where a row names it

_NO_DEFAULT = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                       # the wire type (bmi/channel/client.py)
    optional: bool
    default: object = _NO_DEFAULT   # the client method's default, for "name:type=default"

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[str, ...]         # "name:type", "name:type=default", "name?:type"
    result: str                     # the wire type of the result
    target: str = CONTROLLER
    read_only: bool = False
    bmid_only: bool = False         # only a client of bmid (a PD over its channel gets PermissionDenied)
    fd_in: bool = False             # the request carries one fd (SCM_RIGHTS)
    fd_out: bool = False            # the reply may carry one fd
    server: bool = False            # answered by the server itself, not the dispatcher (accept, subscribe)
    doc: str = ""                   # what the call does: the client method's docstring

    @cached_property
    def specs(self) -> tuple[Param, ...]:
        return tuple(map(_parse, self.params))

    @cached_property
    def required(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs if not s.optional)

    @cached_property
    def optional(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs if s.optional)

    @cached_property
    def names(self) -> frozenset[str]:
        """Every parameter name the method takes (controller methods also `pd`)."""
        return frozenset(self.required + self.optional + (("pd",) if self.target == CONTROLLER else ()))


def _parse(param: str) -> Param:
    name, _, kind = param.partition(":")
    kind, eq, default = kind.partition("=")
    if eq:
        return Param(name, kind, True, ast.literal_eval(default))
    return Param(name.rstrip("?"), kind, name.endswith("?"))


_ROWS = (
    # -- the manager (spec 7.1) ------------------------------------------------------------------
    Method("get_version", (), "int", MANAGER, read_only=True,
           doc="The BMI version the layer speaks (major in the high 16 bits)."),
    Method("list_pd", (), "[int]", MANAGER, read_only=True, doc="The ids of the PDs the caller may see."),
    Method("get_controller", ("pd?:int",), "int", MANAGER, read_only=True,
           doc="The id of PD `pd` (default: the caller's own) once the layer has checked access to it."),
    Method("allocate_pd", ("mem:int", "cpu?:int", "performance?:int"), "int", MANAGER,
           doc="A new PD (its id) with this memory (bytes), CPU count and performance share."),
    Method("get_attestation_key", (), "key", MANAGER, read_only=True,
           doc="The TPM attestation key that signs integrity reports (its PEM, fingerprint, public area)."),
    Method("connect", ("tid:int", "con_type:str", "mode:int", "size?:int"), "connection", MANAGER, fd_out=True,
           doc="A new connection to PD `tid`; the source's end comes back as an fd."),
    Method("accept", ("timeout?:number|null",), "connection", MANAGER, fd_out=True, server=True,
           doc="The next connection another PD opened to the caller (null after timeout seconds)."),
    # -- a controller (spec 7.2) ----------------------------------------------------------------
    Method("get_priority", (), "int", read_only=True, doc="The PD's priority (-10..+10)."),
    Method("set_priority", ("priority:int",), "null", doc="Set the PD's priority (-10..+10, higher runs more)."),
    Method("get_current_status", (), "status", read_only=True, doc="The PD's status."),
    Method("request_status_change", ("status:status", "progress?:bool"), "null",
           doc="Ask the layer to move the PD to `status` (a PDStatus, its int value or its name)."),
    Method("destroy", (), "null", doc="End the PD and free all it holds."),
    Method("setup_pd", ("banks?:[str]",), "null", fd_in=True,
           doc="Load the image (the fd) into the PD, copying and measuring it once."),
    Method("set_allowed_connections", ("tid:int", "policies:[policy]", "disable_existing:bool=False"), "null",
           doc="Which connections the PD may open to PD `tid`; disable_existing also closes those now refused."),
    Method("get_allowed_connections", ("tid:int",), "[policy]", read_only=True,
           doc="The connections the PD may open to PD `tid`."),
    Method("set_config_param", ("name:str", "value:str"), "null", doc="Set a config parameter (e.g. /boot/cmdline)."),
    Method("get_config_param", ("name:str",), "str", read_only=True, doc="A config parameter's value."),
    Method("set_runtime_param", ("name:str", "value:str"), "null", doc="Set a runtime parameter (spec 7.6)."),
    Method("get_runtime_param", ("name:str",), "str", read_only=True, doc="A runtime parameter's value."),
    Method("list_runtime_params", ("root:str='/'",), "[capability]", read_only=True,
           doc="The direct children of `root` in the runtime parameter tree, with what may be done to them."),
    Method("get_integrity_link", ("nonce:hex",), "report", read_only=True,
           doc="A TPM quote binding `nonce` and the PD's measurement to the layer's PCRs."),
    Method("get_protected_credentials", ("policy:integrity_policy", "protected_credentials:hex"), "hex",
           doc="The secret sealed in `protected_credentials` when the PD meets `policy` (b\"\" when it does not)."),
    # -- bmid's clients only (bmi/server/daemon.py SystemDispatcher) -----------------------------
    Method("describe", (), "records", MANAGER, read_only=True, bmid_only=True,
           doc="Every PD in one call: pd, name, status, parent, mem, cpu, priority, sha256."),
    Method("layer_info", (), "facts", MANAGER, read_only=True, bmid_only=True,
           doc="What the layer bmid runs is and can do (`bmi info`)."),
    Method("measurement", (), "digests", read_only=True, bmid_only=True,
           doc="The PD's image measurement, by bank."),
    Method("read_console", ("since?:int", "timeout?:number"), "console", read_only=True, bmid_only=True,
           doc="The PD's console output after offset `since`, waiting up to `timeout` seconds for some."),
    Method("wait", ("timeout:number|null=None",), "status", read_only=True, bmid_only=True,
           doc="Wait up to `timeout` seconds (None: as long as bmid allows) for the PD to stop running; "
               "its status then."),
    Method("seal_credentials", ("policy:integrity_policy", "secret:hex"), "hex", MANAGER, bmid_only=True,
           doc="`secret` sealed by the TPM to `policy`, for get_protected_credentials."),
    Method("get_storage_public", (), "hex", MANAGER, read_only=True, bmid_only=True,
           doc="The public area of the TPM storage key that credentials are wrapped for."),
    Method("list_devices", (), "[str]", DEVICES, read_only=True, bmid_only=True,
           doc="The host devices the driver can hand to a PD."),
    Method("assigned", ("pd:int",), "[str]", DEVICES, read_only=True, bmid_only=True,
           doc="The host devices assigned to the PD."),
    Method("assign", ("device:str", "pd:int", "mode:int=3", "shared:bool=False"), "null", DEVICES, bmid_only=True,
           doc="Hand host device `device` to the PD (mode: READ 1, WRITE 2, RW 3; shared: also to others)."),
    Method("unassign", ("device:str", "pd:int"), "null", DEVICES, bmid_only=True,
           doc="Take host device `device` back from the PD."),
    Method("create_network", ("name:str", "subnet:str", "nat:bool=False"), "null", DEVICES, bmid_only=True,
           doc="A named bridge network for PDs on `subnet` (nat: with masquerading to the host's uplink)."),
    Method("list_networks", (), "records", DEVICES, read_only=True, bmid_only=True,
           doc="The networks: name, subnet, nat, bridge."),
    Method("destroy_network", ("name:str",), "null", DEVICES, bmid_only=True, doc="Remove network `name`."),
    Method("status_board", (), "board", MANAGER, read_only=True, bmid_only=True, fd_out=True,
           doc="An O_RDONLY fd of bmid's status memfd (bmi/channel/board.py)."),
    Method("subscribe", ("since?:int",), "events", MANAGER, read_only=True, bmid_only=True, server=True,
           doc="{last}, then status events (after event number `since`)."),
)

METHODS: dict[str, Method] = {m.name: m for m in _ROWS}

#: What bmid's read-only group may call.
READ_ONLY = frozenset(m.name for m in _ROWS if m.read_only)
#: Methods whose reply may pass an fd back.
RETURNS_FD = frozenset(m.name for m in _ROWS if m.fd_out)
#: Methods a PD's channel answers (the rest only bmid's clients).
PD_CHANNEL = frozenset(m.name for m in _ROWS if not m.bmid_only)
