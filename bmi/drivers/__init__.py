"""The driver registry: one row per URI scheme, read by bmi.uri, the bmid client (bmi/system.py),
bmid (bmi/server/main.py, daemon.py) and the CLI.

A row names where its drivers live ("module:Class", imported only when
that URI is opened: Xen's needs the libxl shim) and what bmid for it uses.
Adding a driver is one package under bmi/drivers/ plus one row here
(docs/drivers.md).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DriverEntry:
    scheme: str
    session: str            # "module:Class" of the in-process driver (SCHEME:///session)
    bmid: str               # "module:Class" of bmid's keeping driver (SCHEME:///system)
    socket: str             # bmid's default socket
    socket_variable: str    # the environment variable that overrides it
    unit: str               # bmid's systemd unit
    state_subdir: str       # bmid's state under $BMID_STATE_DIR ("": that directory itself)
    session_help: str
    system_help: str

    @property
    def system_uri(self) -> str:
        return f"{self.scheme}:///system"

    @property
    def remote_scheme(self) -> str:
        """SCHEME+ssh: the same bmid on another host, over ssh (bmi/remote/)."""
        return f"{self.scheme}+ssh"

    @property
    def session_uri(self) -> str:
        return f"{self.scheme}:///session"

    def session_driver(self) -> Any:
        return _load(self.session)()

    def bmid_driver(self, keeper: Any, on_exit: Any) -> Any:
        return _load(self.bmid)(keeper, on_exit)

    def default_socket(self) -> str:
        return os.environ.get(self.socket_variable) or self.socket


def _load(where: str) -> Any:
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


DRIVERS: dict[str, DriverEntry] = {entry.scheme: entry for entry in (
    DriverEntry("linux", "bmi.drivers.linux.driver:LinuxDriver", "bmi.drivers.linux.system:SystemDriver",
                "/run/bmi/bmid.sock", "BMID_SOCKET", "bmid.service", "",
                "the embedded Linux driver, PDs live while this process lives",
                "PDs owned by bmid over /run/bmi/bmid.sock"),
    DriverEntry("xen", "bmi.drivers.xen.driver:XenDriver", "bmi.drivers.xen.system:XenSystemDriver",
                "/run/bmi/bmid-xen.sock", "BMID_XEN_SOCKET", "bmid-xen.service", "xen",
                "Xen domains through libxl in this process; they live while it lives",
                "Xen domains owned by bmid --uri xen:///system over /run/bmi/bmid-xen.sock"),
)}

#: bmid's URIs, one per driver, keyed by URI.
BMIDS: dict[str, DriverEntry] = {entry.system_uri: entry for entry in DRIVERS.values()}
