"""Only the cffi shims and the wheel's tag live here; everything else is in pyproject.toml.

Each bmi/_build/<name>_build.py defines `ffibuilder` for one native
surface.  A build script may set `ffibuilder = None` when the system lacks
what it needs (e.g. libxen-dev); that shim is then skipped and its driver
reports DriverUnavailable.
"""
import glob
import os
import runpy

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel

# The oldest CPython the stable-ABI shims are for (requires-python in pyproject.toml).
LIMITED_API = "cp311"


def _cffi_modules():
    here = os.path.dirname(os.path.abspath(__file__))
    modules = []
    for script in sorted(glob.glob(os.path.join(here, "bmi", "_build", "*_build.py"))):
        if runpy.run_path(script).get("ffibuilder") is not None:
            modules.append(os.path.relpath(script, here) + ":ffibuilder")
    return modules


class TaggedWheel(bdist_wheel):
    """Tag the wheel cp311-abi3 when every extension module in it is built for the stable ABI.

    cffi builds its modules with Py_LIMITED_API (they are named *.abi3.so),
    but setuptools tags a wheel abi3 only when told; an extension module
    outside the stable ABI keeps the wheel tagged for this one CPython.
    """

    def finalize_options(self):
        modules = self.distribution.ext_modules or []
        if not self.py_limited_api and modules and all(m.py_limited_api for m in modules):
            self.py_limited_api = LIMITED_API
        super().finalize_options()


setup(cffi_modules=_cffi_modules(), cmdclass={"bdist_wheel": TaggedWheel})
