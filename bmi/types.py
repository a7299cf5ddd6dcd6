"""Spec data structures (BMI v0.1 section 7.5) and enums.

Plain dataclasses so they print, compare and serialise without ceremony.
`IntegrityReport` lives with the integrity code (it carries the verifier's
helpers) and is re-exported here.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

READ = 1
WRITE = 2
RW = READ | WRITE


class _NamedIntEnum(enum.IntEnum):
    """An IntEnum that prints as its name: `print(pd.get_current_status())` reads PAUSED, not 4."""

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


class PDStatus(_NamedIntEnum):
    """Life-cycle states of a protection domain (spec 7.2.4)."""

    ALLOCATED = 1
    READY = 2
    RUNNING = 3
    PAUSED = 4
    SUSPENDED = 5
    SHUTDOWN = 6
    CRASHED = 7
    RESTARTING = 8
    DESTROYED = 9


class ConnectionType(_NamedIntEnum):
    """Kinds of inter-PD connection (spec 4.4)."""

    IPC = 1
    STREAM = 2
    SHM = 3
    EVENT = 4


@dataclass(frozen=True)
class PDDescription:
    """Resource requirements of a new PD (spec 7.5.6).

    mem: hard memory limit in bytes, or a size as the parameters take it
    ("64M"), held as int bytes from construction on.  cpu: number of CPUs.
    performance: the share of those CPUs the PD may use, in percent (1..100).
    """

    mem: int
    cpu: int = 1
    performance: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.mem, str):
            from .params import parse_size
            object.__setattr__(self, "mem", parse_size(self.mem, what="PDDescription.mem"))


@dataclass(frozen=True)
class ConnectionPolicy:
    """An allowed connection type and direction (spec 7.5.1)."""

    con_type: ConnectionType
    mode: int = RW


@dataclass(frozen=True)
class ConnectionIntegrityPolicy(ConnectionPolicy):
    """A connection policy that also names the destination's measurement (7.5.2)."""

    dest: bytes = b""


@dataclass(frozen=True)
class IntegrityPolicy:
    """What a PD must be for its protected credentials to be released (7.5.4)."""

    pd_integrity: bytes
    pd_connections: tuple[ConnectionIntegrityPolicy, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ProtectedCredentials:
    """The plaintext inside a protected-credentials blob (7.5.5)."""

    secret: bytes
    policy_validation: bytes


@dataclass(frozen=True)
class RuntimeCapability:
    """A runtime parameter name and whether it can be read / written (7.5.7)."""

    name: str
    read: bool
    write: bool


from .integrity.report import IntegrityReport  # noqa: E402  (re-export)

__all__ = [
    "READ", "WRITE", "RW", "PDStatus", "ConnectionType", "PDDescription",
    "ConnectionPolicy", "ConnectionIntegrityPolicy", "IntegrityPolicy",
    "ProtectedCredentials", "RuntimeCapability", "IntegrityReport",
]
