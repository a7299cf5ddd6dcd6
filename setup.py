"""Only the cffi shims live here; everything else is in pyproject.toml.

Each bmi/_build/<name>_build.py defines `ffibuilder` for one native
surface.  A build script may set `ffibuilder = None` when the system lacks
what it needs (e.g. libxen-dev); that shim is then skipped and its driver
reports DriverUnavailable.
"""
import glob
import os
import runpy

from setuptools import setup


def _cffi_modules():
    here = os.path.dirname(os.path.abspath(__file__))
    modules = []
    for script in sorted(glob.glob(os.path.join(here, "bmi", "_build", "*_build.py"))):
        if runpy.run_path(script).get("ffibuilder") is not None:
            modules.append(os.path.relpath(script, here) + ":ffibuilder")
    return modules


setup(cffi_modules=_cffi_modules())
