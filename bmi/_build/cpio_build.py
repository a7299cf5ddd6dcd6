"""cffi build of bmi._cpio: the one newc parser (csrc/cpio/cpio.c), the same C bmi-init unpacks with.

bmi/drivers/cpio.py checks an image with it at setup_pd (both drivers), and
bmi-init (bmi/_build/spawn_build.py) links the same file, so what is
checked is what is unpacked.
"""
import os

from cffi import FFI

_CPIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc", "cpio")
_CPIO = os.path.relpath(os.path.normpath(_CPIO))

with open(os.path.join(_CPIO, "cpio.h")) as f:
    # the header is the cdef, minus its #include lines
    _CDEF = "".join(line for line in f if not line.startswith("#include"))

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "bmi._cpio",
    '#include "cpio.h"',
    sources=[os.path.join(_CPIO, "cpio.c")],
    include_dirs=[_CPIO],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)
