"""cffi build of bmi._devices: device nodes into and out of a running PD's /dev (csrc/devices.c) and
its cgroup v2 BPF device program (csrc/devcg.c)."""
import os

from cffi import FFI

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc")
_CSRC = os.path.relpath(os.path.normpath(_CSRC))

with open(os.path.join(_CSRC, "devices.h")) as f:
    # the header is the cdef, minus its #include lines
    _CDEF = "".join(line for line in f if not line.startswith("#include"))

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "bmi._devices",
    '#include "devices.h"',
    sources=[os.path.join(_CSRC, "devices.c"), os.path.join(_CSRC, "devcg.c")],
    include_dirs=[_CSRC],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)
