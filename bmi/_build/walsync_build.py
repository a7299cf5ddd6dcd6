"""cffi build of bmi._walsync: the sync of bmid's state database off the GIL (csrc/walsync/walsync.c)."""
import os

from cffi import FFI

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc")
_CSRC = os.path.relpath(os.path.normpath(os.path.join(_CSRC, "walsync")))

with open(os.path.join(_CSRC, "walsync.h")) as f:
    _CDEF = f.read()

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "bmi._walsync",
    '#include "walsync.h"',
    sources=[os.path.join(_CSRC, "walsync.c")],
    include_dirs=[_CSRC],
    extra_compile_args=["-O2", "-Wall"],
)
