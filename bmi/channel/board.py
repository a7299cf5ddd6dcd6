"""The status board: every PD's id and status, shared read-only by bmid with its clients.

Why: monitoring tools call list_pd() and then get_current_status() of each
PD in a loop; as round trips to bmid that is two requests per PD (~60 us
each), 120 ms for 1000 PDs.  bmid writes each PD's status into a sealed
memfd when it stores it -- before it answers any request that depends on
it and before it publishes the event -- and its clients map that memfd
read-only and read it without a round trip.

Layout (native byte order: bmid and its clients share one host): 64-bit
words; word 0 magic, 1 capacity (slots), 2 slots in use so far (a high
water mark), 3 PDs bmid could not place (the board is full: clients then
ask bmid), 4-7 reserved; then one word per slot: 0 = free, else
(pd_id << 16) | PRESENT | status.  A fact is one aligned word, written and
read whole (memoryview's 'Q' items are one load or store on 64-bit hosts),
so a reader needs no lock and never sees half of an update; a slot whose
id is not the one a reader expects means the PD is gone or moved.

The memfd is chmod 0444 and sealed (size, future writes), and clients get
an O_RDONLY descriptor: they can neither write through it nor reopen it
for writing; bmid keeps the only writable mapping.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import threading

from ..errors import ResourceError
from ..types import PDStatus

MAGIC = 0x424D_4942_4F41_5244         # "BMIBOARD"
CAPACITY = 1 << 16                     # slots: 512 KiB of sparse shared memory
HEADER_WORDS = 8
PRESENT = 0x8000
_F_SEAL_FUTURE_WRITE = 0x0010          # linux/fcntl.h; Python's fcntl does not name it
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | _F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
_MAGIC, _CAPACITY, _USED, _UNPLACED = range(4)


def _size(capacity: int) -> int:
    return (HEADER_WORDS + capacity) * 8


class BoardWriter:
    """bmid's side: place, update and remove PDs; hand out read-only descriptors."""

    def __init__(self, capacity: int = CAPACITY):
        fd = os.memfd_create("bmi-status-board", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, _size(capacity))
            self._map = mmap.mmap(fd, _size(capacity), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.fchmod(fd, 0o444)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._words = memoryview(self._map).cast("Q")
        self._words[_CAPACITY] = capacity
        self._words[_MAGIC] = MAGIC
        self._lock = threading.Lock()
        self._slots: dict[int, int] = {}
        self._free: list[int] = []
        self._unplaced: set[int] = set()

    def set(self, pd_id: int, status: PDStatus) -> None:
        """Show pd_id with this status (placing it on first sight)."""
        with self._lock:
            slot = self._slots.get(pd_id)
            if slot is None:
                slot = self._place(pd_id)
                if slot is None:
                    return
            self._words[HEADER_WORDS + slot] = (pd_id << 16) | PRESENT | int(status)

    def _place(self, pd_id: int) -> int | None:
        if self._free:
            slot = self._free.pop()
        elif self._words[_USED] < self._words[_CAPACITY]:
            slot = self._words[_USED]
            self._words[_USED] = slot + 1
        else:
            self._unplaced.add(pd_id)
            self._words[_UNPLACED] = len(self._unplaced)
            return None
        self._slots[pd_id] = slot
        return slot

    def remove(self, pd_id: int) -> None:
        with self._lock:
            slot = self._slots.pop(pd_id, None)
            if slot is not None:
                self._words[HEADER_WORDS + slot] = 0
                self._free.append(slot)
            elif pd_id in self._unplaced:
                self._unplaced.discard(pd_id)
                self._words[_UNPLACED] = len(self._unplaced)

    def reader_fd(self) -> int:
        """A new O_RDONLY descriptor of the board (the caller owns it)."""
        try:
            return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ResourceError(f"status board: cannot open a read-only descriptor: {e.strerror}") from None

    def close(self) -> None:
        """Unmap bmid's side; clients keep their own mappings (and see bmid gone on their socket)."""
        self._words.release()
        self._map.close()
        os.close(self._fd)


class BoardReader:
    """A client's side: list the PDs and read a status without asking bmid."""

    def __init__(self, fd: int):
        """Map the board bmid passed (fd is closed here, whatever happens)."""
        try:
            size = os.fstat(fd).st_size
            if size < _size(0):
                raise ResourceError(f"status board: {size} bytes is too small to be one")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as e:
            raise ResourceError(f"status board: cannot map it: {e.strerror}") from None
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("Q")
        if self._words[_MAGIC] != MAGIC or _size(self._words[_CAPACITY]) > size:
            self.close()
            raise ResourceError("status board: not a bmid status board (bad magic or size)")
        self._index: dict[int, int] = {}

    @property
    def complete(self) -> bool:
        """False while some PD did not fit: list_pd must then ask bmid."""
        return self._words[_UNPLACED] == 0

    def _scan(self) -> dict[int, int]:
        used = self._words[_USED]
        words = self._words[HEADER_WORDS:HEADER_WORDS + used].tolist()
        self._index = {w >> 16: slot for slot, w in enumerate(words) if w}
        return self._index

    def ids(self) -> list[int]:
        return sorted(self._scan())

    def status(self, pd_id: int) -> PDStatus | None:
        """pd_id's status, None when it is not on the board (destroyed, or never placed)."""
        for index in (self._index, None):
            slot = (index if index is not None else self._scan()).get(pd_id)
            if slot is not None:
                word = self._words[HEADER_WORDS + slot]
                if word >> 16 == pd_id and word & PRESENT:
                    return PDStatus(word & 0xFF)
        return None

    def close(self) -> None:
        self._words.release()
        self._map.close()
