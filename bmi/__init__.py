"""bmi: the OpenTC Basic Management Interface (BMI v0.1) over real isolation.

    import bmi
    with bmi.open() as mgr:                      # linux:///session by default
        pd = mgr.allocate_pd(bmi.PDDescription(mem=64 << 20))
        pd.setup_pd(bmi.FileImage("/bin/busybox"))
        pd.set_config_param("/boot/cmdline", "busybox echo hello")
        pd.request_status_change(bmi.PDStatus.RUNNING)
"""
from __future__ import annotations

from typing import Any

from .api import DeviceManager, PDController, PDManagement
from .errors import (BMIError, DriverUnavailable, ImageError, IntegrityError, InvalidArgument, InvalidState,
                     NoSuchDomain, NotSupported, PermissionDenied, ResourceError)
from .image import BytesImage, FileImage, PDImage
from .types import (READ, RW, WRITE, ConnectionIntegrityPolicy, ConnectionPolicy, ConnectionType,
                    IntegrityPolicy, IntegrityReport, PDDescription, PDStatus, ProtectedCredentials,
                    RuntimeCapability)
from .uri import open

__version__ = "0.1.0"


def verify_report(report: IntegrityReport, *, nonce: bytes, pd_integrity: bytes,
                  pcrs: dict[int, bytes] | None = None, ak: Any = None, trust_report_key: bool = False) -> None:
    """Check an IntegrityReport offline against the attestation key `ak` pinned beforehand
    (PEM, cryptography public key or "sha256:<hex>" fingerprint of mgr.get_attestation_key());
    raises IntegrityError naming the failed check, or saying how to pin when `ak` is missing.
    trust_report_key=True accepts the key the report carries and warns: anyone can forge that."""
    from .integrity.verify import verify_report as verify
    verify(report, nonce=nonce, pd_integrity=pd_integrity, pcrs=pcrs, ak=ak, trust_report_key=trust_report_key)


def wrap_credentials(policy: IntegrityPolicy, secret: bytes, storage_public: bytes) -> bytes:
    """Make a protected-credentials blob offline for a machine's TPM storage key."""
    from .integrity.verify import wrap_credentials as wrap
    return wrap(policy, secret, storage_public)


__all__ = [
    "open", "PDManagement", "PDController", "DeviceManager", "PDImage", "FileImage", "BytesImage",
    "PDDescription", "PDStatus", "ConnectionType", "ConnectionPolicy", "ConnectionIntegrityPolicy",
    "IntegrityPolicy", "IntegrityReport", "ProtectedCredentials", "RuntimeCapability", "READ", "WRITE", "RW",
    "verify_report", "wrap_credentials", "BMIError", "InvalidArgument", "InvalidState", "NoSuchDomain",
    "PermissionDenied", "NotSupported", "ResourceError", "ImageError", "IntegrityError", "DriverUnavailable",
]
