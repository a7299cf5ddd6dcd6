"""Print the shims this machine can build but the package lacks; exit 1 if any.

`make venv` runs it after installing: a venv made before libxen-dev was
installed has no bmi._xen, and only a rebuild brings it (pip sees nothing
changed).  A shim built by bmi/_build/<name>_build.py is bmi._<name>.
"""
import glob
import importlib.util
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def missing_shims() -> list[str]:
    missing = []
    for script in sorted(glob.glob(os.path.join(HERE, "*_build.py"))):
        if runpy.run_path(script).get("ffibuilder") is None:
            continue
        module = "bmi._" + os.path.basename(script)[: -len("_build.py")]
        if importlib.util.find_spec(module) is None:
            missing.append(module)
    return missing


if __name__ == "__main__":
    absent = missing_shims()
    if absent:
        print("buildable but not built: " + " ".join(absent))
    sys.exit(1 if absent else 0)
