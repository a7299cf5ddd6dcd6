"""Connection URIs, libvirt's model: the URI picks the driver and the mode."""
from __future__ import annotations

import os
from urllib.parse import urlsplit

from .api import PDManagement
from .errors import DriverUnavailable, InvalidArgument

DEFAULT_URI = "linux:///session"
KNOWN = {
    ("linux", "/session"): "the embedded Linux driver, PDs live while this process lives",
    ("linux", "/system"): "PDs owned by bmid over /run/bmi/bmid.sock",
    ("xen", "/session"): "Xen domains through libxl in this process; they live while it lives",
    ("xen", "/system"): "Xen domains owned by bmid --uri xen:///system over /run/bmi/bmid-xen.sock",
    ("pd", "/"): "inside a PD: the channel named by BMI_CHANNEL_FD",
}


def open(uri: str | None = None, *, integrity: bool = True) -> PDManagement:  # noqa: A001 (spec name)
    """Open a manager; None means $BMI_URI or linux:///session.

    integrity=False skips the TPM link (integrity calls then raise NotSupported).
    """
    if uri is None:
        uri = os.environ.get("BMI_URI") or DEFAULT_URI
    if not isinstance(uri, str):
        raise InvalidArgument(f"open: the URI must be a str, got {type(uri).__name__}")
    parts = urlsplit(uri)
    key = (parts.scheme, parts.path or "/")
    if parts.netloc or key not in KNOWN:
        known = ", ".join(f"{s}://{p}" for s, p in KNOWN)
        raise InvalidArgument(f"open: unknown URI {uri!r}; known: {known}")
    if key == ("linux", "/session"):
        from .drivers.linux.driver import LinuxDriver
        factory = _integrity_factory() if integrity else None
        return PDManagement(LinuxDriver(), uri, integrity=factory)
    if key in (("linux", "/system"), ("xen", "/system")):
        from .system import SystemClient
        return SystemClient(uri)  # type: ignore[return-value]  (PDManagement-compatible, through bmid)
    if key == ("xen", "/session"):
        from .drivers.xen.driver import XenDriver
        factory = _integrity_factory() if integrity else None
        return PDManagement(XenDriver(), uri, integrity=factory)
    from .pd import PDClient        # pd:///
    return PDClient()  # type: ignore[return-value]  (PDManagement-compatible, over the channel)


def _integrity_factory():
    def factory():
        try:
            from .integrity.service import IntegrityService
        except ImportError as e:
            raise DriverUnavailable(f"the integrity module cannot be loaded: {e}") from e
        return IntegrityService.open()
    return factory
