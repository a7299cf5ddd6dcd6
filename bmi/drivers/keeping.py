"""What bmid needs of a driver beyond bmi.drivers.base.Driver (Keeping), and the pieces every
keeping driver shares: the keeper's copy of a measured image, found again only with its measurement.

bmid's PDs outlive bmid: a driver serving bmid stores what identifies each
PD's run, hands the fds that must survive a bmid crash to the fd keeper
(bmi/server/keeper.py), and adopts the PDs again after a restart.  Each
driver's own variant lives in its package: bmi/drivers/linux/system.py,
bmi/drivers/xen/system.py.
"""
from __future__ import annotations

import abc
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ..types import PDDescription, PDStatus
from .base import ExitInfo

if TYPE_CHECKING:
    from ..server.keeper import Keeper

HASH_CHUNK = 1 << 20
log = logging.getLogger("bmi.bmid")


def image_key(pd_id: int, measurement: Mapping[str, bytes]) -> str:
    """The keeper key of a PD's image: names the measured content, so a half-done setup_pd is visible."""
    bank = sorted(measurement)[0]
    return f"pd{pd_id}.image.{bank}-{measurement[bank].hex()}"


def kept_image(keeper: Keeper, pd_id: int, measurement: Mapping[str, bytes]) -> int | None:
    """The kept memfd whose content has exactly the stored measurement, else None (the PD is adopted
    without an image: it has to be set up again); other kept images are dropped."""
    key = image_key(pd_id, measurement)
    fd = keeper.get(key)
    for stale in [k for k in keeper.keys() if k.startswith(f"pd{pd_id}.image.") and k != key]:
        keeper.drop(stale)
    if fd is None:
        return None
    bank = sorted(measurement)[0]
    digest = hashlib.new(bank)
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    if digest.digest() != measurement[bank]:
        log.warning("adopt PD %d: the kept image no longer has its measurement; dropping it", pd_id)
        os.close(fd)
        keeper.drop(key)
        return None
    return fd


def stored_measurement(record: Mapping[str, Any]) -> dict[str, bytes]:
    return {b: bytes.fromhex(h) for b, h in record.get("measurement", {}).items()}


@dataclass(frozen=True)
class Adopted:
    """A stored PD back under a restarted bmid, as its driver found it."""

    handle: Any
    live: PDStatus | None           # RUNNING or PAUSED: the recorded run is still there, its identity checked
    ended: ExitInfo | None          # how the recorded run ended while bmid was away
    kept: bool                      # what a later start needs (the measured image, a saved state) is back
    #: keeper keys to drop once the adoption is stored (not before: a crash in between must leave the next
    #: start everything it needs to say how the run ended)
    release: tuple[str, ...] = ()


class Keeping(abc.ABC):
    """The mechanisms bmid needs of a driver beyond bmi.drivers.base.Driver: PDs that outlive bmid.

    Such a driver never ends its PDs when bmid stops or dies, hands the fds
    they need to the keeper, and calls on_exit(pd_id) when it sees a PD end.
    """

    @abc.abstractmethod
    def record(self, handle: Any) -> dict[str, Any]:
        """The driver's part of the PD's stored record; "run" identifies its current run (None: none)."""

    @abc.abstractmethod
    def adopt(self, pd_id: int, desc: PDDescription, record: dict[str, Any]) -> Adopted:
        """A stored PD back under this bmid; its run only if it is exactly the recorded one."""

    @abc.abstractmethod
    def allocation_intent(self, pd_id: int) -> dict[str, Any]:
        """What an allocation creates outside bmid, stored before it so a crash can roll it back."""

    @abc.abstractmethod
    def roll_back_allocation(self, pd_id: int, intent: Mapping[str, Any]) -> None:
        """Undo an allocation bmid never acknowledged (it died in between)."""
