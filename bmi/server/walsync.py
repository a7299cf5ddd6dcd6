"""The sync of bmid's state database off the GIL (csrc/walsync/walsync.c), for its client loop (clients.py).

One thread runs the C loop with the GIL released: asked, it fdatasyncs the
WAL and answers on an eventfd the client loop waits on in its epoll.  Only
this module sees cffi objects.
"""
from __future__ import annotations

import logging
import os
import threading

from .._walsync import ffi, lib

log = logging.getLogger("bmi.bmid")


class WalSyncer:
    """fdatasync of one file, asked for with ask() and answered through fileno(); one sync asked at a time."""

    def __init__(self, path: str):
        self._path = ffi.new("char[]", os.fsencode(path))
        self._result = ffi.new("int *")
        self._asked = os.eventfd(0, os.EFD_CLOEXEC)
        self._done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, name="bmid-walsync", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        failed = lib.bmi_walsync_serve(self._asked, self._done, self._path, self._result)
        if failed < 0:          # an eventfd failed: say so as the answer of the sync asked (if it can be)
            log.critical("the state database's sync thread stopped: %s", os.strerror(-failed))
            self._result[0] = -failed
            try:
                os.eventfd_write(self._done, 1)
            except OSError:
                pass

    def fileno(self) -> int:
        """Readable once the sync asked for is done."""
        return self._done

    def ask(self) -> None:
        """Sync the file now (everything written to it before this call is on disk once answered)."""
        os.eventfd_write(self._asked, 1)

    def answer(self) -> OSError | None:
        """Once fileno() is readable: None when the sync succeeded, else what it failed with."""
        os.eventfd_read(self._done)
        code = self._result[0]
        return OSError(code, f"fdatasync: {os.strerror(code)}") if code else None

    def close(self) -> None:
        os.eventfd_write(self._asked, lib.BMI_WALSYNC_STOP)
        self._thread.join()
        os.close(self._asked)
        os.close(self._done)



