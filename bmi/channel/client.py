"""Client methods built from their rows of the method table (bmi/channel/methods.py).

    class RemoteController:
        set_priority = remote("set_priority")     # def set_priority(self, priority: int) -> None

`remote(name)` writes the method from its row: the parameters (names,
defaults, type hints) and the docstring, the request it sends (`pd` from the
controller, the one given by the caller for a device call), and the
conversions of its arguments and result named by the row's types (TO_WIRE,
FROM_WIRE below).  The function is compiled from source, as dataclasses
does, so help() shows the real signature and a call costs no more than a
hand-written one.  A row with an fd, or answered by the server itself, needs a
hand-written method (the fd is the caller's to close).

The object it is put on has `_channel` (bmi.pd.Channel) and, for a
controller, `_id`.
"""
from __future__ import annotations

import __future__
from typing import Any, Callable

from ..checks import check_bytes, check_integrity_policy, check_policies
from ..types import ConnectionPolicy, IntegrityPolicy, IntegrityReport, PDStatus, RuntimeCapability
from . import protocol as p
from .methods import CONTROLLER, METHODS, Method

Convert = Callable[[Any, str, str, Any], Any]        # (value, method, parameter, pd) -> wire value


def _of(method: str, pd: Any) -> str:
    """What session mode's messages name: `method of PD n` (the PD the call is on, when it has one)."""
    return f"{method} of PD {pd}" if isinstance(pd, int) else method


def _hex(value: Any, method: str, param: str, pd: Any) -> str:
    return check_bytes(value, f"{_of(method, pd)}: {param}", pd if isinstance(pd, int) else None).hex()


def _policies(value: Any, method: str, param: str, pd: Any) -> list[dict[str, Any]]:
    return [p.policy_to_wire(x) for x in check_policies(value, method, pd)]


def _integrity_policy(value: Any, method: str, param: str, pd: Any) -> dict[str, Any]:
    policy = check_integrity_policy(value, _of(method, pd), pd if isinstance(pd, int) else None)
    return p.integrity_policy_to_wire(policy)


def _status(value: Any, method: str, param: str, pd: Any) -> Any:
    return p.status_to_wire(value)       # the layer checks it (bmi/api.py), as in session mode


def _attestation_key(value: Any) -> Any:
    from ..integrity.keys import AttestationKey
    return AttestationKey.from_wire(value)


#: Wire type -> (the Python annotation of an argument, its conversion to the wire or None: as it is).
TO_WIRE: dict[str, tuple[str, Convert | None]] = {
    "int": ("int", None),
    "str": ("str", None),
    "bool": ("bool", None),
    "number|null": ("float | None", None),
    "hex": ("bytes", _hex),
    "status": ("PDStatus | str | int", _status),
    "[policy]": ("list[ConnectionPolicy]", _policies),
    "integrity_policy": ("IntegrityPolicy", _integrity_policy),
}

#: Wire type -> (the Python annotation of a result, its conversion from the wire or None: as it is).
FROM_WIRE: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "null": ("None", None),
    "int": ("int", None),
    "str": ("str", None),
    "[int]": ("list[int]", None),
    "[str]": ("list[str]", None),
    "records": ("list[dict[str, Any]]", None),
    "facts": ("dict[str, Any]", None),
    "status": ("PDStatus", lambda value: PDStatus[value]),
    "hex": ("bytes", bytes.fromhex),
    "digests": ("dict[str, bytes]", lambda value: {bank: bytes.fromhex(d) for bank, d in value.items()}),
    "[policy]": ("list[ConnectionPolicy]", lambda value: [p.policy_from_wire(x) for x in value]),
    "[capability]": ("list[RuntimeCapability]",
                     lambda value: [RuntimeCapability(c["name"], c["read"], c["write"]) for c in value]),
    "report": ("IntegrityReport", p.report_from_wire),
    "key": ("AttestationKey", _attestation_key),
}


#: What the annotations name, for typing.get_type_hints (AttestationKey is imported only when used).
_HINTS = {"Any": Any, "PDStatus": PDStatus, "ConnectionPolicy": ConnectionPolicy, "IntegrityPolicy": IntegrityPolicy,
          "IntegrityReport": IntegrityReport, "RuntimeCapability": RuntimeCapability}


def python_name(wire_name: str) -> str:
    """The client method's name for a wire parameter: `pd` is `pd_id`, as everywhere in the API."""
    return "pd_id" if wire_name == "pd" else wire_name


class remote:
    """The client method of table row `name` (see the module docstring); it puts itself on the class as a
    plain function under that name."""

    def __init__(self, name: str):
        self.function = _build(METHODS[name])

    def __set_name__(self, owner: type, attribute: str) -> None:
        if attribute != self.function.__name__:
            raise TypeError(f"{owner.__name__}.{attribute} = remote({self.function.__name__!r}): the names differ")
        self.function.__module__ = owner.__module__
        self.function.__qualname__ = f"{owner.__qualname__}.{attribute}"
        setattr(owner, attribute, self.function)


def _build(row: Method) -> Callable[..., Any]:
    name = row.name
    if row.fd_in or row.fd_out or row.server:
        raise TypeError(f"{name}: a method that passes an fd or is answered by the server is written by hand")
    env: dict[str, Any] = {"NAME": name, **_HINTS}
    args, sent = ["self"], []
    pd = "self._id" if row.target == CONTROLLER else "pd_id" if "pd" in row.required else "None"
    if row.target == CONTROLLER:
        sent.append("pd=self._id")
    for i, spec in enumerate(row.specs):
        if spec.optional and not spec.has_default:
            continue        # "name?:type": sent only by a hand-written override (bmid's progress records)
        py = python_name(spec.name)
        annotation, convert = TO_WIRE[spec.kind]
        args.append(f"{py}: {annotation}" + (f" = {spec.default!r}" if spec.has_default else ""))
        if convert is None:
            sent.append(f"{spec.name}={py}")
        else:
            env[f"to{i}"] = convert
            sent.append(f"{spec.name}=to{i}({py}, NAME, {spec.name!r}, {pd})")
    annotation, decode = FROM_WIRE[row.result]
    env["decode"] = decode
    call = f"self._channel.value(NAME, {', '.join(sent)})"
    body = call if decode is None else f"decode({call})"
    source = f"def {name}({', '.join(args)}) -> {annotation}:\n    return {body}\n"
    # annotations stay strings, as in a module with `from __future__ import annotations`
    code = compile(source, f"<bmi.channel.methods: {name}>", "exec", flags=__future__.annotations.compiler_flag,
                   dont_inherit=True)
    exec(code, env)
    function = env[name]
    function.__doc__ = row.doc + ("\n\nRead-only: bmid's read-only group may call it." if row.read_only else "")
    function.row = row
    return function
