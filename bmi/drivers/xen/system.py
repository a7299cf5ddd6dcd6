"""The Xen driver as bmid runs it (xen:///system): domains outlive bmid and are adopted after a restart.

Differences from xen:///session's XenDriver, all mechanisms:
- bmid stopping or dying destroys no domain (close() leaves them running);
- each domain gets a UUID that bmid stores: after a restart a domain is
  adopted only if the recorded domid still names a domain with that UUID
  (a recycled domid has another), and only while it has not shut down;
- the measured image memfd and a suspended PD's save stream are handed to
  the fd keeper, so a restarted bmid can still (re)start or resume the PD;
  the image is re-hashed against the stored measurement and prepared
  again, the save stream restored with the new image's paths;
- the console pty is opened again (xenconsoled kept it while bmid was
  away), and the rendezvous of stored connection policies are re-synced by
  bmid replaying them through connections_changed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from ...server.keeper import Keeper
from ...types import PDDescription, PDStatus
from ..base import ExitInfo
from ..keeping import Adopted, Keeping, image_key, kept_image, stored_measurement
from . import config as xcfg
from . import image as ximage
from .driver import _REASONS, XenDriver, XenPD


class XenSystemDriver(XenDriver, Keeping):
    """XenDriver whose domains, images and save streams survive bmid."""

    def __init__(self, keeper: Keeper, on_exit: Callable[[int], None]):
        super().__init__()
        self._keeper = keeper
        self._exit_hook = on_exit

    # -- keeping ----------------------------------------------------------------------------
    def _boot_from(self, pd: XenPD, fd: int, digests: Mapping[str, bytes], what: str) -> None:
        kept = os.dup(fd)               # prepare() takes fd over; the keeper gets the measured memfd itself
        try:
            super()._boot_from(pd, fd, digests, what)
            self._keeper.put(image_key(pd.pd_id, digests), kept)
        finally:
            os.close(kept)

    def suspend(self, pd: XenPD) -> None:
        super().suspend(pd)
        assert pd.saved_fd is not None
        self._keeper.put(f"pd{pd.pd_id}.saved", pd.saved_fd)

    def _drop_saved(self, pd: XenPD) -> None:
        if pd.saved_fd is not None:
            self._keeper.drop(f"pd{pd.pd_id}.saved")
        super()._drop_saved(pd)

    def _end(self, pd: XenPD, ended: ExitInfo) -> None:
        super()._end(pd, ended)
        self._exit_hook(pd.pd_id)

    def destroy(self, pd: XenPD) -> None:
        super().destroy(pd)
        self._keeper.drop(f"pd{pd.pd_id}.")

    def close(self) -> None:
        """Stop watching; every domain keeps running for the next bmid to adopt."""
        with self._lock:
            self._pds.clear()
        super().close()

    def record(self, pd: XenPD) -> dict[str, Any]:
        return {"name": pd.name, "uuid": pd.uuid, "json": pd.json, "memory": pd.memory, "vcpus": pd.vcpus,
                "run": None if pd.domid is None else {"domid": pd.domid}}

    @staticmethod
    def allocation_intent(pd_id: int) -> dict[str, Any]:
        return {}                       # allocate_pd builds no domain: nothing outside bmid to roll back

    @staticmethod
    def roll_back_allocation(pd_id: int, intent: Mapping[str, Any]) -> None:
        """Nothing to undo (see allocation_intent)."""

    # -- adoption ---------------------------------------------------------------------------
    def adopt(self, pd_id: int, desc: PDDescription, record: dict[str, Any]) -> Adopted:
        what = f"adopt PD {pd_id}"
        pd = XenPD(pd_id, desc, record["name"], memory=record["memory"], vcpus=record["vcpus"],
                   performance=record["performance"], weight=xcfg.priority_weight(record["priority"]),
                   uuid=record["uuid"])
        measurement = stored_measurement(record)
        fd = kept_image(self._keeper, pd_id, measurement) if measurement else None
        if fd is not None:
            pd.boot = ximage.prepare(fd, what=what, pd_id=pd_id)
            if record["json"]:
                pd.json = _with_boot(record["json"], pd.boot)
        pd.saved_fd = self._keeper.get(f"pd{pd_id}.saved")
        with self._lock:
            self._pds[pd_id] = pd
        kept = pd.boot is not None and (pd.saved_fd is not None or record["status"] != PDStatus.SUSPENDED.name)
        run = record.get("run")
        if run is None:
            return Adopted(pd, None, None, kept)
        live, ended = self._reclaim(pd, run["domid"], what)
        if ended is not None:
            pd.ended = ended
            pd.exited.set()
        return Adopted(pd, live, ended, kept)

    def _reclaim(self, pd: XenPD, domid: int, what: str) -> tuple[PDStatus | None, ExitInfo | None]:
        """The recorded domain back under this driver if it is the same one and still up; else how it ended."""
        found = self._xen.uuid(domid, what=what, pd_id=pd.pd_id)
        info = self._xen.info(domid, what=what, pd_id=pd.pd_id) if found == pd.uuid else None
        if info is None:
            whose = "no domain has it now" if found is None or found == pd.uuid else f"it is domain {found}'s now"
            return None, ExitInfo(PDStatus.CRASHED, None, f"its domain {domid} ended while bmid was down ({whose})")
        if info.state in ("shutdown", "dying"):
            status, how = _REASONS.get(info.shutdown_reason or "", (PDStatus.CRASHED, "the domain died"))
            pd.domid = domid
            self._discard_domain(pd, what)      # nobody cleaned it up while bmid was away
            return None, ExitInfo(status, None, f"{how} while bmid was down")
        pd.domid = domid
        self._attach_console(pd, domid, what)
        return (PDStatus.PAUSED if info.state == "paused" else PDStatus.RUNNING), None


def _with_boot(config_json: str, boot: ximage.Boot) -> str:
    """The stored domain config with this process's paths of the (re-prepared) image, for a restore."""
    config = json.loads(config_json)
    config["b_info"]["kernel"] = boot.kernel_path
    if boot.ramdisk_path:
        config["b_info"]["ramdisk"] = boot.ramdisk_path
    return json.dumps(config)
