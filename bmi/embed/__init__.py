"""libbmi: bmi's calls as a C library (bmi.h, libbmi.so, bmi.pc) made with cffi's embedding mode.

`python -m bmi.embed --cflags --libs` prints what a C compiler needs;
`--pc` prints the pkg-config file (`make demo` installs it).  build.py
makes the library; capi.py is its implementation.
"""
from __future__ import annotations

import os
import sysconfig

from ..errors import NotSupported

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "bmi.h")
LIBRARY = os.path.join(HERE, "libbmi.so")


def _python_libdir() -> str:
    return sysconfig.get_config_var("LIBDIR")


def cflags() -> str:
    return f"-I{HERE}"


def libs() -> str:
    """Link flags with run paths for libbmi and the libpython it links: no LD_LIBRARY_PATH needed."""
    if not os.path.exists(LIBRARY):
        raise NotSupported(f"libbmi is not built ({LIBRARY} is missing): run python -m bmi.embed.build")
    return f"-L{HERE} -Wl,-rpath,{HERE} -Wl,-rpath,{_python_libdir()} -lbmi"


def pkg_config() -> str:
    """bmi.pc for this installation."""
    from .. import __version__
    return (f"Name: bmi\nDescription: OpenTC Basic Management Interface (libbmi, embedded bmi {__version__})\n"
            f"Version: {__version__}\nCflags: {cflags()}\nLibs: {libs()}\n")
