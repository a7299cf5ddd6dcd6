"""Where the C PD client library (bmi_client.c, bmi_client.h) is: the one answer `bmi info`, the pytest plugin
(bmi.testing.build_pd_program) and the docs give.

An installed bmi carries it in bmi/data/ (the wheel copies the files); a
source tree without that copy has it in csrc/client/.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import NotSupported

CLIENT_FILES = ("bmi_client.c", "bmi_client.h")


def pd_client_dir() -> Path:
    """The directory holding bmi_client.c and bmi_client.h; NotSupported when bmi was installed without them."""
    shipped = Path(str(resources.files("bmi") / "data"))
    for candidate in (shipped, Path(__file__).resolve().parent.parent / "csrc" / "client"):
        if all((candidate / name).is_file() for name in CLIENT_FILES):
            return candidate
    raise NotSupported("the PD client library (bmi_client.c, bmi_client.h) is not installed with bmi")
