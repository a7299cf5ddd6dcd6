"""The small interface every virtualization-layer driver implements.

Drivers do mechanisms only (build, start, freeze, resize, kill); what is
allowed in which state, argument ranges and error wording live once in
bmi/api.py.  A driver that lacks a mechanism says so through
`capabilities` and raises NotSupported with the reason.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..errors import NotSupported
from ..image import PDImage
from ..types import PDDescription, PDStatus

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ExitInfo:
    """How a PD's program ended: status is SHUTDOWN or CRASHED."""

    status: PDStatus
    exit_status: int | None
    reason: str


@dataclass(frozen=True)
class HostResources:
    """What the layer can hand out: the ceiling for PDDescription checks."""

    cpus: int
    memory: int
    #: How many processes the host can run (Linux: kernel.pid_max); None where the driver has no such limit.
    pids: int | None = None


class Driver(abc.ABC):
    """Mechanisms for one virtualization layer; `handle` is the driver's own PD object."""

    name: str = ""
    #: Status changes beyond RUNNING/SHUTDOWN the driver can carry out.
    capabilities: frozenset[PDStatus] = frozenset()
    #: Why SUSPENDED (etc.) is missing, for the NotSupported message.
    unsupported_reasons: Mapping[PDStatus, str] = {}
    #: Whether start() can hand the PD a channel fd (an AF_UNIX socket) to the layer.
    channels: bool = False
    #: The config parameters under /boot/ the driver reads; one ending in '/' names a family (/boot/env/NAME).
    boot_params: tuple[str, ...] = ("/boot/cmdline",)

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Facts about the layer for `bmi info`."""

    @abc.abstractmethod
    def host_resources(self) -> HostResources: ...

    @abc.abstractmethod
    def allocate(self, pd_id: int, desc: PDDescription) -> Any:
        """Reserve resources for a PD; nothing runs yet."""

    @abc.abstractmethod
    def check_config(self, handle: Any, name: str, value: str) -> None:
        """Raise InvalidArgument if the driver cannot use this config value."""

    @abc.abstractmethod
    def load(self, handle: Any, image: PDImage, banks: Sequence[str],
             progress: Progress | None) -> dict[str, bytes]:
        """Copy the image into the PD's memory, measuring it in the same pass."""

    @abc.abstractmethod
    def start(self, handle: Any, config: Mapping[str, str], priority: int, *, progress: Progress | None = None,
              **channel: int) -> None:
        """Run exactly the measured image; drivers with `channels` take channel_fd=, the PD's end of its channel.
        progress(done, total) is called while a root archive is unpacked (never where nothing is unpacked)."""

    @abc.abstractmethod
    def stop(self, handle: Any, grace: float) -> ExitInfo:
        """Ask the PD to end, force it after `grace` seconds; return how it ended."""

    @abc.abstractmethod
    def exit_info(self, handle: Any) -> ExitInfo | None:
        """How the current run ended, or None while it runs."""

    @abc.abstractmethod
    def wait(self, handle: Any, timeout: float | None) -> ExitInfo | None: ...

    @abc.abstractmethod
    def destroy(self, handle: Any) -> None:
        """Kill everything and release every resource; idempotent."""

    def pause(self, handle: Any) -> None:
        raise NotSupported(self.unsupported_reasons.get(PDStatus.PAUSED, "pause not supported"))

    def resume(self, handle: Any) -> None:
        raise NotSupported(self.unsupported_reasons.get(PDStatus.PAUSED, "pause not supported"))

    def suspend(self, handle: Any) -> None:
        raise NotSupported(self.unsupported_reasons.get(PDStatus.SUSPENDED, "suspend not supported"))

    @abc.abstractmethod
    def set_priority(self, handle: Any, priority: int) -> None: ...

    @abc.abstractmethod
    def set_memory(self, handle: Any, nbytes: int) -> None: ...

    @abc.abstractmethod
    def memory_limit(self, handle: Any) -> int: ...

    @abc.abstractmethod
    def memory_used(self, handle: Any) -> int: ...

    @abc.abstractmethod
    def set_cpus(self, handle: Any, count: int) -> int: ...

    @abc.abstractmethod
    def cpus(self, handle: Any) -> int: ...

    @abc.abstractmethod
    def set_performance(self, handle: Any, percent: int) -> None: ...

    @abc.abstractmethod
    def read_console(self, handle: Any, since: int, timeout: float | None) -> tuple[int, bytes]:
        """Console bytes after offset `since` (waiting up to timeout for some), and the new offset."""

    @abc.abstractmethod
    def console_log(self, handle: Any) -> bytes:
        """The PD's recent console output (bounded)."""

    def connections_changed(self, handle: Any, peer: Any, policies: Sequence[Any]) -> None:
        """The policy from handle's PD towards peer's (None: PD 0) is now `policies`.

        Drivers whose layer enforces connections at set-up time (e.g. a
        rendezvous the hypervisor guards) act here; on Linux the channel
        server checks the policy at each connect, so nothing is to be done.
        """

    def config_grants(self, name: str, value: str) -> int | None:
        """The powers a config value grants as a bit set (Linux: /boot/capabilities), so the layer can keep
        a child's within its parent's; None for a parameter that grants nothing."""
        return None

    def extra_params(self, handle: Any, config: Mapping[str, str]) -> dict[str, Any]:
        """Driver-specific runtime parameters (name -> params.Param: a Leaf, or a constant's text); config is the
        PD's (some depend on it)."""
        return {}

    def list_devices(self) -> list[str]:
        """Host devices this driver can hand to a PD."""
        return []

    def assigned_devices(self, handle: Any) -> list[str]:
        return []

    def assign_device(self, handle: Any, device: str, mode: int = 3, own: bool = True) -> None:
        """Give the PD `device` with access `mode` (bmi.READ/WRITE/RW); own: it alone, owned by its host uid."""
        raise NotSupported(f"{self.name} driver cannot pass host devices to a PD")

    def unassign_device(self, handle: Any, device: str) -> None:
        raise NotSupported(f"{self.name} driver cannot pass host devices to a PD")

    def create_network(self, name: str, subnet: str, nat: bool) -> None:
        """A host network PDs' interfaces can join (Linux: a bridge with the subnet's first address)."""
        raise NotSupported(f"{self.name} driver cannot make host networks")

    def destroy_network(self, name: str, subnet: str, nat: bool) -> None:
        raise NotSupported(f"{self.name} driver cannot make host networks")

    def restore_network(self, name: str, subnet: str, nat: bool) -> None:
        """A network a restarted daemon had: kept when it is still there, else made again."""
        self.create_network(name, subnet, nat)

    def close(self) -> None:
        """Release driver-wide resources (threads, fds)."""
