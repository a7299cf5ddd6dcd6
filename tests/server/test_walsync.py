"""The WAL's sync off the GIL (bmi/server/walsync.py over csrc/walsync/walsync.c), with real files."""
from __future__ import annotations

import errno
import select
import threading

from bmi.server.walsync import WalSyncer


def _synced(syncer: WalSyncer) -> OSError | None:
    syncer.ask()
    assert select.select([syncer.fileno()], [], [], 10)[0], "the sync was never answered"
    return syncer.answer()


def test_a_file_is_synced_each_time_it_is_asked(tmp_path):
    path = tmp_path / "state-wal"
    path.write_bytes(b"frames")
    syncer = WalSyncer(str(path))
    try:
        assert [_synced(syncer) for _ in range(3)] == [None, None, None]
    finally:
        syncer.close()
    assert not any(t.name == "bmid-walsync" for t in threading.enumerate())


def test_a_missing_file_has_nothing_to_sync(tmp_path):
    syncer = WalSyncer(str(tmp_path / "no-wal-yet"))
    try:
        assert _synced(syncer) is None
    finally:
        syncer.close()


def test_a_sync_that_fails_says_why():
    """/dev/null cannot be synced (EINVAL): the answer carries the errno, and the syncer goes on."""
    syncer = WalSyncer("/dev/null")
    try:
        for _ in range(2):
            failure = _synced(syncer)
            assert isinstance(failure, OSError) and failure.errno == errno.EINVAL, failure
            assert "fdatasync" in str(failure)
    finally:
        syncer.close()
