"""Connection URIs, libvirt's model: the URI picks the driver and the mode."""
from __future__ import annotations

import os
from urllib.parse import SplitResult, parse_qs, urlsplit

from .api import PDManagement
from .drivers import DRIVERS
from .errors import DriverUnavailable, InvalidArgument
from .remote.ssh import OPTIONS as SSH_OPTIONS, SUFFIX as SSH_SUFFIX, is_remote

DEFAULT_URI = "linux:///session"
KNOWN = {
    **{key: text for d in DRIVERS.values()
       for key, text in (((d.scheme, "/session"), d.session_help), ((d.scheme, "/system"), d.system_help))},
    **{(d.remote_scheme, "/system"): f"{d.scheme}:///system on another host, over ssh" for d in DRIVERS.values()},
    ("pd", "/"): "inside a PD: the channel named by BMI_CHANNEL_FD",
}
#: The query options (?name=value) each URI understands.
OPTIONS = {**{(d.scheme, "/system"): ("socket",) for d in DRIVERS.values()},
           **{(d.remote_scheme, "/system"): SSH_OPTIONS for d in DRIVERS.values()}}


def resolve(uri: str | None) -> str:
    """The URI a manager opens: `uri`, else $BMI_URI, else linux:///session."""
    return uri or os.environ.get("BMI_URI") or DEFAULT_URI


def split(uri: str, what: str = "open") -> SplitResult:
    """urlsplit(), whose ValueError (an unclosed IPv6 bracket: linux+ssh://[::1/system) is an InvalidArgument."""
    try:
        return urlsplit(uri)
    except ValueError as e:
        raise InvalidArgument(f"{what} {uri!r}: {e}") from None


def is_session(uri: str) -> bool:
    """Whether the URI's PDs live only as long as the process that opened it (linux/xen:///session)."""
    return split(uri).path == "/session"


def open(uri: str | None = None, *, integrity: bool = True) -> PDManagement:  # noqa: A001 (spec name)
    """Open a manager; None means $BMI_URI or linux:///session.

    integrity=False skips the TPM link (integrity calls then raise NotSupported).
    """
    if uri is None:
        uri = resolve(None)
    if not isinstance(uri, str):
        raise InvalidArgument(f"open: the URI must be a str, got {type(uri).__name__}")
    parts = split(uri)
    key = (parts.scheme, parts.path or "/")
    if bool(parts.netloc) != is_remote(uri) or key not in KNOWN:
        known = ", ".join(f"{s}://{'[user@]host[:port]' if s.endswith(SSH_SUFFIX) else ''}{p}" for s, p in KNOWN)
        raise InvalidArgument(f"open: unknown URI {uri!r}; known: {known}")
    understood = OPTIONS.get(key, ())
    for option in parse_qs(parts.query, keep_blank_values=True):
        if option not in understood:
            offered = ", ".join(understood) or "none"
            raise InvalidArgument(f"open {uri!r}: unknown query option {option!r}; {parts.scheme}://{key[1]} "
                                  f"understands: {offered}")
    if parts.query and not parse_qs(parts.query, keep_blank_values=True):
        raise InvalidArgument(f"open {uri!r}: the query {parts.query!r} is not name=value options")
    if key[1] == "/session":
        factory = _integrity_factory() if integrity else None
        return PDManagement(DRIVERS[parts.scheme].session_driver(), uri, integrity=factory)
    if key[1] == "/system":
        from .system import SystemClient
        return SystemClient(uri)  # type: ignore[return-value]  (PDManagement-compatible, through bmid)
    from .pd import PDClient        # pd:///
    return PDClient()  # type: ignore[return-value]  (PDManagement-compatible, over the channel)


def _integrity_factory():
    def factory():
        try:
            from .integrity.service import IntegrityService
        except ImportError as e:
            raise DriverUnavailable(f"the integrity module cannot be loaded: {e}") from e
        try:
            return IntegrityService.open()
        except OSError as e:     # no TPM device and no writable state dir (a user without a home, say)
            raise DriverUnavailable(f"the TPM link cannot start: {e.strerror}: {e.filename}") from e
    return factory
