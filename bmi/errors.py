"""The bmi exception tree.

Every message says what was asked, of which PD, and why it failed; the
spec's NULL returns become these exceptions.  Where a builtin category
fits, the error also inherits it so callers can catch either.
"""
from __future__ import annotations


class BMIError(Exception):
    """Base of every error bmi raises on purpose."""

    def __init__(self, message: str, *, pd_id: int | None = None):
        super().__init__(message)
        self.pd_id = pd_id


class InvalidArgument(BMIError, ValueError):
    """An argument is out of range, of the wrong type, or malformed."""


class InvalidState(BMIError):
    """The PD is not in a state where the call makes sense."""


class NoSuchDomain(BMIError, LookupError):
    """No PD has that id (any more)."""


class PermissionDenied(BMIError):
    """The caller may not do this to that PD."""


class NotSupported(BMIError):
    """The driver cannot do this; the message says why."""


class ResourceError(BMIError):
    """The layer could not obtain a resource (memory, CPUs, a kernel object)."""


class ImageError(BMIError):
    """The PDImage misbehaved or its bytes are not a format the driver runs."""


class IntegrityError(BMIError):
    """A measurement, quote, or sealed blob failed a check."""


class DriverUnavailable(BMIError):
    """The driver named by the URI cannot work on this machine."""


__all__ = [
    "BMIError", "InvalidArgument", "InvalidState", "NoSuchDomain",
    "PermissionDenied", "NotSupported", "ResourceError", "ImageError",
    "IntegrityError", "DriverUnavailable",
]
