"""bmid's one way out when a change it made cannot be stored: exit at once, FAIL_STOP.

Its own module so that every part of bmid that stores changes (the daemon,
its client loop) calls the same function without importing one another.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("bmi.bmid")

FAIL_STOP = 75                  # bmid's exit status when it stops because it cannot store a change it made


def stop_unstored(what: str, e: BaseException) -> None:
    """End bmid at once: the change of `what` could not be stored, and memory must not keep a change the store
    lacks; the next start finishes or rolls it back from its stored intent (see Daemon._store_or_stop)."""
    log.critical("%s could not be stored (%s); stopping so that the next start finishes or rolls it back "
                 "from its stored intent", what, e)
    logging.shutdown()
    os._exit(FAIL_STOP)
