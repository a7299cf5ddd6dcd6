"""The '/'-hierarchical runtime parameter tree (spec 7.2.12-7.2.14, 7.6).

A tree is a flat map of full names to leaves, each with an optional getter
and setter, or the text of a read-only constant; directories are implied
by the names.  The tree is rebuilt from the PD's state on each call, so a
parameter exists exactly while its mechanism does (e.g.
`/system/exit-status` only after the PD ended); what costs more than a
string to know is a getter, run only when that parameter is read.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

from .errors import InvalidArgument, PermissionDenied
from .types import RuntimeCapability
from .units import parse_size

Getter = Callable[[], str]
Setter = Callable[[str], None]

MAX_NAME = 4096


def normalize(name: object, *, what: str, pd_id: int | None, allow_root: bool = False) -> str:
    """Return the canonical form of a parameter path ('/a/b'), or raise."""
    if not isinstance(name, str):
        raise InvalidArgument(f"{what} of PD {pd_id}: name must be a str, got {type(name).__name__}",
                              pd_id=pd_id)
    if len(name) > MAX_NAME or "\0" in name:
        raise InvalidArgument(f"{what} of PD {pd_id}: name too long or contains NUL", pd_id=pd_id)
    parts = [p for p in name.strip().split("/")]
    # A leading '/' is the root; a trailing '/' is ignored (spec 7.2.14).
    if parts and parts[0] == "":
        parts = parts[1:]
    while parts and parts[-1] == "":
        parts.pop()
    if not parts:
        if allow_root:
            return "/"
        raise InvalidArgument(f"{what} of PD {pd_id}: empty parameter name", pd_id=pd_id)
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"{what} of PD {pd_id}: malformed parameter name {name!r}", pd_id=pd_id)
    return "/" + "/".join(parts)


class Leaf(NamedTuple):
    """One parameter: readable when it has a getter, writable with a setter.

    A tuple, not a frozen dataclass: a PD's tree (~40 leaves) is rebuilt on
    every parameter call, and a frozen dataclass's __init__ cost most of it.
    """

    get: Getter | None = None
    set: Setter | None = None


#: A parameter: a Leaf, or a read-only constant as its text (no closure and no tuple: a PD's tree is rebuilt on
#: every parameter call, and making a const Leaf for each of its ~30 constants was most of a get's time).
Param = Leaf | str


def read(param: Param | None) -> str | None:
    """A parameter's value; None when there is no such parameter or it has no getter."""
    if param is None or isinstance(param, str):
        return param
    return param.get() if param.get is not None else None


class ParamTree:
    """A PD's runtime parameters at one moment."""

    def __init__(self, pd_id: int, leaves: dict[str, Param]):
        self.pd_id = pd_id
        self.leaves = leaves

    def _leaf(self, name: str, what: str) -> tuple[str, Param]:
        path = normalize(name, what=what, pd_id=self.pd_id)
        leaf = self.leaves.get(path)
        if leaf is None:
            if any(k.startswith(path + "/") for k in self.leaves):
                raise InvalidArgument(
                    f"{what} {path!r} of PD {self.pd_id}: it is a directory; list it with "
                    f"list_runtime_params({path!r})", pd_id=self.pd_id)
            raise InvalidArgument(
                f"{what} {path!r} of PD {self.pd_id}: no such parameter "
                f"(list_runtime_params() shows what exists)", pd_id=self.pd_id)
        return path, leaf

    def get(self, name: str) -> str:
        path, leaf = self._leaf(name, "get_runtime_param")
        value = read(leaf)
        if value is None:
            raise PermissionDenied(f"get_runtime_param {path!r} of PD {self.pd_id}: write-only parameter",
                                   pd_id=self.pd_id)
        return value

    def set(self, name: str, value: str) -> None:
        path, leaf = self._leaf(name, "set_runtime_param")
        if not isinstance(value, str):      # PDController.set_runtime_param has turned an int into its text
            raise InvalidArgument(f"set_runtime_param {path!r} of PD {self.pd_id}: value must be a str or int, "
                                  f"got {type(value).__name__}", pd_id=self.pd_id)
        if isinstance(leaf, str) or leaf.set is None:
            raise PermissionDenied(f"set_runtime_param {path!r} of PD {self.pd_id}: read-only parameter",
                                   pd_id=self.pd_id)
        leaf.set(value)

    def list(self, root: str = "/") -> list[RuntimeCapability]:
        base = normalize(root, what="list_runtime_params", pd_id=self.pd_id, allow_root=True)
        prefix = "/" if base == "/" else base + "/"
        if base != "/" and base not in self.leaves and not any(k.startswith(prefix) for k in self.leaves):
            raise InvalidArgument(f"list_runtime_params {base!r} of PD {self.pd_id}: no such parameter",
                                  pd_id=self.pd_id)
        children: dict[str, RuntimeCapability] = {}
        for name, leaf in self.leaves.items():
            if not name.startswith(prefix):
                continue
            child = prefix + name[len(prefix):].split("/", 1)[0]
            if child == name:
                constant = isinstance(leaf, str)
                children[child] = RuntimeCapability(child, constant or leaf.get is not None,
                                                    not constant and leaf.set is not None)
            else:
                children.setdefault(child, RuntimeCapability(child, False, False))
        return [children[k] for k in sorted(children)]


def parse_int(value: str, *, what: str, pd_id: int, lo: int, hi: int, unit_suffixes: bool = False) -> int:
    """Parse a decimal parameter value (a size with K/M/G when unit_suffixes) within [lo, hi]."""
    if unit_suffixes:
        number = parse_size(value, what=what, pd_id=pd_id)
    else:
        try:
            number = int(value.strip(), 10)
        except ValueError:
            raise InvalidArgument(f"{what} of PD {pd_id}: {value!r} is not a whole number", pd_id=pd_id) from None
    if not lo <= number <= hi:
        raise InvalidArgument(f"{what} of PD {pd_id}: {number} is outside [{lo}, {hi}]", pd_id=pd_id)
    return number


#: What the config parameter /boot/allow may list: kernel surface a PD is refused unless its config allows it.
ALLOWABLE = {
    "io_uring": "the io_uring syscalls (io_uring_setup, io_uring_enter, io_uring_register): kernel attack surface "
                "Docker's default profile blocks too, and its socket commands bypass the seccomp filter",
}


def parse_allow(value: str, *, what: str, pd_id: int | None) -> frozenset[str]:
    """The names in a /boot/allow value ("io_uring", space or comma separated); unknown names are refused."""
    names = frozenset(value.replace(",", " ").split())
    unknown = sorted(names - ALLOWABLE.keys())
    if unknown:
        raise InvalidArgument(f"{what} of PD {pd_id}: {', '.join(map(repr, unknown))} cannot be allowed "
                              f"(known: {', '.join(sorted(ALLOWABLE))})", pd_id=pd_id)
    return names

