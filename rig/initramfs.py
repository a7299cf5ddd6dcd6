"""Initramfs images for the QEMU rigs, assembled from files installed on the host.

Nothing is downloaded: the static busybox, the kernel modules of the
Debian kernel and our init scripts go into a plain (uncompressed) newc
archive.  The rig shares the host root with the guest over 9p, so
everything else the guest runs (python, gcc, the Xen tools) comes from
there; the initramfs only has to get that share mounted.
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import BinaryIO, Iterable, Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bmi.drivers.cpio import CpioWriter  # noqa: E402

BUSYBOX = "/bin/busybox"
MODULES_LIST = "etc/rig/modules"       # .ko files in load order, one a line
ENV_FILE = "etc/rig/env"               # sourced by the init scripts
DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
        "etc", "etc/rig", "lib", "lib/modules", "host", "newroot")


class RigError(Exception):
    """The host lacks something the rig needs; the message says what to install or pass."""


def _canonical(name: str) -> str:
    """modprobe treats '-' and '_' in module names alike."""
    return name.replace("-", "_")


def module_order(release: str, names: Iterable[str], *, moddir: str = "/lib/modules") -> list[str]:
    """Paths (relative to the release's module directory) of `names` and what they
    depend on, dependencies first; modules built into the kernel are left out."""
    base = os.path.join(moddir, release)
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    try:
        with open(os.path.join(base, "modules.dep")) as f:
            for line in f:
                path, _, rest = line.partition(":")
                deps[path] = rest.split()
                by_name[_canonical(os.path.basename(path).split(".ko")[0])] = path
        with open(os.path.join(base, "modules.builtin")) as f:
            builtin = {_canonical(os.path.basename(p.strip()).split(".ko")[0]) for p in f}
    except OSError as e:
        raise RigError(f"no module index for kernel {release} ({e}); install its linux-image package") from None
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        if not path.endswith(".ko"):
            raise RigError(f"module {path} of {release} is compressed; busybox insmod needs plain .ko files")
        # modules.dep lists the full closure; visiting each dependency first
        # gives a valid load order whatever order the line uses.
        for dep in deps[path]:
            visit(dep)
        order.append(path)

    for name in names:
        key = _canonical(name)
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise RigError(f"kernel {release} has no module {name!r} (neither loadable nor built in)")
    return order


def build(out: BinaryIO, *, init: str, scripts: Iterable[str] = (), env: Mapping[str, str] | None = None,
          release: str | None = None, modules: Iterable[str] = (), moddir: str = "/lib/modules") -> list[str]:
    """Write an initramfs: busybox, `init` as /init, `scripts` under /etc/rig,
    `env` as shell assignments in /etc/rig/env, and the modules in load order.
    Returns the module paths it packed."""
    if not os.path.isfile(BUSYBOX):
        raise RigError(f"{BUSYBOX} is missing; install busybox-static")
    names = list(modules)
    if names and release is None:
        raise RigError("modules asked for but no kernel release given")
    order = module_order(release, names, moddir=moddir) if names else []
    writer = CpioWriter(out)
    for d in DIRS:
        writer.directory(d)
    with open(BUSYBOX, "rb") as f:
        writer.file("bin/busybox", f.read(), 0o755)
    writer.symlink("bin/sh", "busybox")
    with open(init, "rb") as f:
        writer.file("init", f.read(), 0o755)
    for script in scripts:
        with open(script, "rb") as f:
            writer.file(f"etc/rig/{os.path.basename(script)}", f.read(), 0o755)
    lines = [f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items())]
    writer.file(ENV_FILE, "".join(line + "\n" for line in lines).encode())
    for rel in order:
        with open(os.path.join(moddir, release, rel), "rb") as f:   # type: ignore[arg-type]
            writer.file(f"lib/modules/{os.path.basename(rel)}", f.read())
    writer.file(MODULES_LIST, "".join(os.path.basename(rel) + "\n" for rel in order).encode())
    writer.close()
    return order
