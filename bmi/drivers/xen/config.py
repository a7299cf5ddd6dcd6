"""Pure mappings from BMI terms to libxl: the domain JSON, priority -> credit2 weight, xenstore names.

Kept free of the shim so the host suite can test them without Xen.
"""
from __future__ import annotations

import json
import re

DEFAULT_WEIGHT = 256            # credit2's default
MIN_WEIGHT, MAX_WEIGHT = 1, 65535
DEFAULT_CMDLINE = "console=hvc0"
GUEST_TYPES = ("pv", "pvh")
MAX_XS_VALUE = 2048
_XS_COMPONENT = re.compile(r"[A-Za-z0-9_@-]+\Z")


def priority_weight(priority: int) -> int:
    """Credit2 weight for a BMI priority: 256 * 2**(priority/5), rounded.

    Each 5 steps double (or halve) the CPU share against a busy neighbour:
    -10 -> 64, -5 -> 128, 0 -> 256 (Xen's default), +5 -> 512, +10 -> 1024.
    """
    return round(DEFAULT_WEIGHT * 2 ** (priority / 5))


def performance_cap(percent: int, vcpus: int) -> int:
    """Credit2 cap (percent of one physical CPU) for `percent` of the PD's vCPUs; 0 is no cap."""
    return 0 if percent >= 100 else max(1, percent * vcpus)


def cmdline(bundle: str | None, config: str | None) -> str:
    """The bundle's (measured) command line, then the /boot/cmdline config parameter appended."""
    parts = [p for p in (bundle, config) if p]
    return " ".join(parts) if parts else DEFAULT_CMDLINE


def domain_json(*, name: str, guest_type: str, memory: int, max_memory: int, vcpus: int, max_vcpus: int,
                weight: int, cap: int, kernel: str, ramdisk: str | None, cmdline: str, uuid: str | None = None,
                bridges: tuple[str, ...] = ()) -> str:
    """libxl_domain_config as libxl's own JSON (libxl_domain_config_from_json).

    bridges: one vif per dom0 bridge, devid in order (libxl picks the MAC; its
    hotplug script vif-bridge puts the backend vif<domid>.<devid> in the bridge).
    """
    if guest_type not in GUEST_TYPES:
        raise ValueError(f"guest type {guest_type!r} is not one of {GUEST_TYPES}")
    b_info: dict[str, object] = {
        "max_vcpus": max_vcpus,
        "avail_vcpus": list(range(vcpus)),
        "max_memkb": max_memory // 1024,
        "target_memkb": memory // 1024,
        "sched_params": {"weight": weight, "cap": cap},
        "kernel": kernel,
        "cmdline": cmdline,
        f"type.{guest_type}": {},
    }
    if ramdisk:
        b_info["ramdisk"] = ramdisk
    c_info = {"type": guest_type, "name": name}
    if uuid:
        c_info["uuid"] = uuid           # the layer's own name for the domain: a recycled domid has another
    nics = [{"devid": devid, "bridge": bridge} for devid, bridge in enumerate(bridges)]
    return json.dumps({"c_info": c_info, "b_info": b_info, **({"nics": nics} if nics else {}),
                       "on_poweroff": "destroy", "on_reboot": "destroy", "on_crash": "destroy"})


def xenstore_name(param: str) -> str | None:
    """The xenstore path suffix for a config parameter ('/app/mode' -> 'app/mode'), None if unusable."""
    parts = param.strip("/").split("/")
    if not all(_XS_COMPONENT.match(p) for p in parts):
        return None
    return "/".join(parts)
