"""What of this host skews the benches: PD cgroups that earlier runs left behind.

A cgroup's creation costs more the more groups its hierarchy holds.  On
this project's 2-vCPU VM, 6,200 empty PD groups left by killed bmids (a
bmid's groups outlive it by design: a restarted bmid adopts them) made
allocate_pd's cgroup creation take 5.3 ms instead of 0.66 ms, a PD start
2.05x bwrap's instead of 0.87x, and an allocation among 1000 PDs 11 ms
instead of 3.  So each bench prints this line first: a figure taken on
such a host is the host's, not the code's.
"""
from __future__ import annotations

import os

from bmi.drivers.linux import cgroups

#: Leftover PD groups from this many on, the line says the figures are skewed.
SKEWING = 500


def leftover_groups() -> tuple[int, int]:
    """(PD groups next to this process's own, those of them with no process): bmi's session (bmi-*) and
    bmid's (bmid-*) groups, counted once per name across the hierarchies."""
    names: dict[str, bool] = {}
    for path in cgroups.groups_of_this_process("bmi-") | cgroups.groups_of_this_process("bmid-"):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                busy = bool(f.read().strip())
        except OSError:
            continue        # removed meanwhile
        name = os.path.basename(path)
        names[name] = names.get(name, False) or busy
    return len(names), sum(1 for busy in names.values() if not busy)


def cgroups_line() -> str:
    """One line for a bench's head: how many PD groups exist here, and whether that skews its figures."""
    try:
        total, empty = leftover_groups()
    except Exception as e:      # noqa: BLE001 - a host without cgroups still gets its other figures
        return f"host: PD cgroups not counted ({e})"
    line = f"host: {total} PD cgroups exist ({empty} with no process)"
    if empty >= SKEWING:
        line += (": SKEWED - so many groups slow every cgroup creation (allocate, start, destroy); find the "
                 "leftovers (a live bmid's READY PDs have empty groups too) and rmdir them")
    return line
