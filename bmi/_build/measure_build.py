"""cffi build of bmi._measure: the copy-and-hash hot path (csrc/measure/measure.c, OpenSSL EVP)."""
import os

from cffi import FFI

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc")
_CSRC = os.path.relpath(os.path.normpath(os.path.join(_CSRC, "measure")))

with open(os.path.join(_CSRC, "measure.h")) as f:
    # the header is the cdef, minus its #include lines
    _CDEF = "".join(line for line in f if not line.startswith("#include"))

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "bmi._measure",
    '#include "measure.h"',
    sources=[os.path.join(_CSRC, "measure.c")],
    include_dirs=[_CSRC],
    libraries=["crypto"],
    extra_compile_args=["-O2", "-pthread", "-Wall"],
    extra_link_args=["-pthread"],
)
