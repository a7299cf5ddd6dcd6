"""Argument checks every mode shares: session mode's PDManagement (bmi/api.py) and the clients of a
layer elsewhere (bmi/pd.py, bmi/system.py) refuse a bad argument with the same typed error and wording,
the clients before anything is sent."""
from __future__ import annotations

import unicodedata

from .errors import InvalidArgument
from .types import ConnectionIntegrityPolicy, ConnectionPolicy, ConnectionType, IntegrityPolicy


def check_int(value: object, what: str, pd_id: int | None) -> int:
    # bool is an int subclass; True as a priority or size is a bug, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{what}: expected an int, got {type(value).__name__}", pd_id=pd_id)
    return value


def check_bytes(value: object, what: str, pd_id: int | None) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{what}: expected bytes, got {type(value).__name__}", pd_id=pd_id)
    return bytes(value)


MAX_PD_NAME = 255       # characters of a PD's /name (a file name's NAME_MAX)


def check_pd_name(name: str, what: str, pd_id: int) -> None:
    """A PD's /name is shown in `bmi list`, `show` and `events` and in logs: a control character (an ANSI escape
    a PD gave its child repaints the admin's terminal) or a bidi override would make it lie there."""
    if len(name) > MAX_PD_NAME:
        raise InvalidArgument(f"{what}: a name is at most {MAX_PD_NAME} characters, this one has {len(name)}",
                              pd_id=pd_id)
    for i, char in enumerate(name):
        if unicodedata.category(char)[0] == "C" or char in "\u2028\u2029":
            raise InvalidArgument(f"{what}: {name!r} has the control or format character U+{ord(char):04X} at "
                                  f"{i}; a name is printable text", pd_id=pd_id)


def check_policies(policies: object, what: str, pd_id: int) -> list[ConnectionPolicy]:
    """A list of ConnectionPolicy with real types and modes (READ, WRITE, RW)."""
    if not isinstance(policies, (list, tuple)):
        raise InvalidArgument(f"{what} of PD {pd_id}: policies must be a list of ConnectionPolicy", pd_id=pd_id)
    checked = []
    for policy in policies:
        if not isinstance(policy, ConnectionPolicy):
            raise InvalidArgument(f"{what} of PD {pd_id}: {policy!r} is not a ConnectionPolicy", pd_id=pd_id)
        if not isinstance(policy.con_type, ConnectionType):
            raise InvalidArgument(f"{what} of PD {pd_id}: con_type {policy.con_type!r} is not a ConnectionType",
                                  pd_id=pd_id)
        if isinstance(policy.mode, bool) or policy.mode not in (1, 2, 3):
            raise InvalidArgument(f"{what} of PD {pd_id}: mode {policy.mode!r} is not READ (1), WRITE (2) "
                                  f"or RW (3)", pd_id=pd_id)
        checked.append(policy)
    return checked


def check_integrity_policy(policy: object, what: str, pd_id: int | None) -> IntegrityPolicy:
    """An IntegrityPolicy whose measurement and connection policies are bytes and real policies."""
    if not isinstance(policy, IntegrityPolicy):
        raise InvalidArgument(f"{what}: expected an IntegrityPolicy, got {type(policy).__name__}", pd_id=pd_id)
    check_bytes(policy.pd_integrity, f"{what}: policy.pd_integrity", pd_id)
    for cip in policy.pd_connections:
        if not isinstance(cip, ConnectionIntegrityPolicy):
            raise InvalidArgument(f"{what}: {cip!r} is not a ConnectionIntegrityPolicy", pd_id=pd_id)
        check_policies([cip], what, pd_id if pd_id is not None else -1)
        check_bytes(cip.dest, f"{what}: ConnectionIntegrityPolicy.dest", pd_id)
    return policy


def check_setup(image: object, banks: object, progress: object, what: str, pd_id: int) -> None:
    """setup_pd's arguments, checked the same way in every mode before any byte is pulled."""
    for method in ("get_image_size", "get_data"):
        if not callable(getattr(image, method, None)):
            raise InvalidArgument(f"{what}: {type(image).__name__} is not a PDImage (no {method}())", pd_id=pd_id)
    if isinstance(banks, str) or not all(isinstance(b, str) for b in banks):  # type: ignore[union-attr]
        raise InvalidArgument(f"{what}: banks must be a sequence of names like ('sha256', 'sha384')", pd_id=pd_id)
    check_progress(progress, what, pd_id)


def check_progress(progress: object, what: str, pd_id: int) -> None:
    """A progress argument (setup_pd, request_status_change) is None or callable(done, total), in every mode."""
    if progress is not None and not callable(progress):
        raise InvalidArgument(f"{what}: progress must be callable(done, total)", pd_id=pd_id)
