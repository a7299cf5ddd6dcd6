"""Only the cffi shims, libbmi and the wheel's tag live here; everything else is in pyproject.toml.

Each bmi/_build/<name>_build.py defines `ffibuilder` for one native
surface.  A build script may set `ffibuilder = None` when the system lacks
what it needs (e.g. libxen-dev); that shim is then skipped and its driver
reports DriverUnavailable.

libbmi.so (bmi/embed/build.py) is no extension module but a shared library
for C programs; build_ext makes it after the shims, next to bmi.h.
"""
import glob
import os
import runpy
import sysconfig

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

# The oldest CPython the stable-ABI shims are for (requires-python in pyproject.toml).
LIMITED_API = "cp311"


def _cffi_modules():
    here = os.path.dirname(os.path.abspath(__file__))
    modules = []
    for script in sorted(glob.glob(os.path.join(here, "bmi", "_build", "*_build.py"))):
        if runpy.run_path(script).get("ffibuilder") is not None:
            modules.append(os.path.relpath(script, here) + ":ffibuilder")
    return modules


def _libbmi_buildable() -> bool:
    """libbmi embeds this interpreter: only one built with a shared libpython can link it."""
    return bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))


class BuildExtAndLibbmi(build_ext):
    """The cffi shims, then libbmi.so into bmi/embed/ (of the build tree, or of the checkout in place)."""

    def run(self):
        super().run()
        if _libbmi_buildable():
            here = os.path.dirname(os.path.abspath(__file__))
            out = os.path.join(here if self.inplace else self.build_lib, "bmi", "embed")
            runpy.run_path(os.path.join(here, "bmi", "embed", "build.py"))["build"](out)


class TaggedWheel(bdist_wheel):
    """Tag the wheel cp311-abi3 when everything native in it is built for the stable ABI.

    cffi builds its modules with Py_LIMITED_API (they are named *.abi3.so),
    but setuptools tags a wheel abi3 only when told.  libbmi.so links this
    interpreter's libpython, so a wheel carrying it is tagged for this one
    CPython (cp311-cp311 for 3.11): that is the wheel built wherever a
    shared libpython exists.
    """

    def finalize_options(self):
        modules = self.distribution.ext_modules or []
        if (not self.py_limited_api and modules and all(m.py_limited_api for m in modules)
                and not _libbmi_buildable()):
            self.py_limited_api = LIMITED_API
        super().finalize_options()


setup(cffi_modules=_cffi_modules(), cmdclass={"bdist_wheel": TaggedWheel, "build_ext": BuildExtAndLibbmi})
