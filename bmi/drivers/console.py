"""A PD's console as every driver keeps it: the last 256 KiB, read by total byte offset."""
from __future__ import annotations

import threading
from typing import Callable

CONSOLE_LIMIT = 256 * 1024


class Console:
    """A bounded console buffer addressed by total byte offsets."""

    def __init__(self, limit: int = CONSOLE_LIMIT):
        self._limit = limit
        self._buf = bytearray()
        self._total = 0
        self.changed = threading.Condition()

    def append(self, data: bytes) -> None:
        with self.changed:
            self._buf += data
            self._total += len(data)
            if len(self._buf) > self._limit:
                del self._buf[:len(self._buf) - self._limit]
            self.changed.notify_all()

    def tail(self) -> bytes:
        with self.changed:
            return bytes(self._buf)

    def read(self, since: int, timeout: float | None, done: Callable[[], bool]) -> tuple[int, bytes]:
        """Bytes after offset `since`; waits up to timeout unless `done()` says no more will come."""
        with self.changed:
            self.changed.wait_for(lambda: self._total > since or done(), timeout)
            start = self._total - len(self._buf)
            since = max(since, start)
            return self._total, bytes(self._buf[since - start:])

    def poke(self) -> None:
        with self.changed:
            self.changed.notify_all()
