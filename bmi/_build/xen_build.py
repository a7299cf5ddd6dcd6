"""cffi build of bmi._xen: the flat libxl/libxenstore shim (csrc/xen/xen.c).

Built only where libxen-dev is installed (`pkg-config xenlight xenstore`);
elsewhere `ffibuilder` is None, setup.py skips it and the Xen driver raises
DriverUnavailable saying what is missing.
"""
import os
import subprocess

from cffi import FFI

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc")
_CSRC = os.path.relpath(os.path.normpath(os.path.join(_CSRC, "xen")))
_PACKAGES = ["xenlight", "xenstore", "xentoollog"]


def _pkg_config(*args: str) -> list[str] | None:
    try:
        done = subprocess.run(["pkg-config", *args, *_PACKAGES], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return done.stdout.split() if done.returncode == 0 else None


_CFLAGS, _LIBS = _pkg_config("--cflags"), _pkg_config("--libs")

if _CFLAGS is None or _LIBS is None:
    ffibuilder = None
else:
    with open(os.path.join(_CSRC, "xen.h")) as f:
        # the header is the cdef, minus its #include lines
        _CDEF = "".join(line for line in f if not line.startswith("#include"))
    ffibuilder = FFI()
    ffibuilder.cdef(_CDEF)
    ffibuilder.set_source(
        "bmi._xen",
        '#include "xen.h"',
        sources=[os.path.join(_CSRC, "xen.c")],
        include_dirs=[_CSRC],
        extra_compile_args=["-O2", "-Wall", "-Wextra", *_CFLAGS],
        extra_link_args=_LIBS,
    )
