"""bmid's status board: what clients read without a request must be what bmid would answer."""
from __future__ import annotations

import errno
import mmap
import os
import time

import pytest

import bmi
from bmi.channel.board import BoardReader, BoardWriter
from tests.helpers import busybox_path


def _asked(mgr, pd_id: int) -> str:
    """The status as a request to bmid answers it (the board is not consulted)."""
    return mgr._channel.value("get_current_status", pd=pd_id)


def _board_fd(mgr) -> int:
    _, fd = mgr._channel.call("status_board", {})
    return fd


def test_board_agrees_with_bmid_through_a_life_cycle(daemon):
    with daemon.open() as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        pd_id = pd.get_pd_id()
        seen = []

        def check() -> None:
            status = mgr.get_controller(pd_id).get_current_status()
            assert status.name == _asked(mgr, pd_id)
            assert mgr.list_pd() == mgr._channel.value("list_pd")
            seen.append(status)

        check()
        pd.setup_pd(bmi.FileImage(busybox_path()))
        check()
        pd.set_config_param("/boot/cmdline", "busybox sleep 100")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        check()
        pd.request_status_change(bmi.PDStatus.PAUSED)
        check()
        pd.request_status_change(bmi.PDStatus.RUNNING)
        check()
        pd.request_status_change(bmi.PDStatus.SHUTDOWN)
        check()
        assert seen == [bmi.PDStatus.ALLOCATED, bmi.PDStatus.READY, bmi.PDStatus.RUNNING, bmi.PDStatus.PAUSED,
                        bmi.PDStatus.RUNNING, bmi.PDStatus.SHUTDOWN]
        pd.destroy()
        assert pd_id not in mgr.list_pd()
        assert pd.get_current_status() is bmi.PDStatus.DESTROYED       # asked: it left the board
        with pytest.raises(bmi.NoSuchDomain, match="destroyed"):
            mgr.get_controller(pd_id)


def test_an_exit_is_on_the_board_once_wait_returns_and_without_any_request(daemon):
    with daemon.open() as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        pd.setup_pd(bmi.FileImage(busybox_path()))
        pd.set_config_param("/boot/cmdline", "busybox true")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        assert pd.wait(20) is bmi.PDStatus.SHUTDOWN
        assert pd.get_current_status() is bmi.PDStatus.SHUTDOWN     # the board, straight after wait

        other = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        other.setup_pd(bmi.FileImage(busybox_path()))
        other.set_config_param("/boot/cmdline", "busybox sleep 0.3")
        other.request_status_change(bmi.PDStatus.RUNNING)
        board = BoardReader(_board_fd(mgr))
        try:
            deadline = time.monotonic() + 20
            while board.status(other.get_pd_id()) is bmi.PDStatus.RUNNING and time.monotonic() < deadline:
                time.sleep(0.02)
            assert board.status(other.get_pd_id()) is bmi.PDStatus.SHUTDOWN
        finally:
            board.close()
        for x in (pd, other):
            x.destroy()


def test_clients_cannot_write_the_board(daemon):
    with daemon.open() as mgr:
        fd = _board_fd(mgr)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, b"\0" * 8)
            assert e.value.errno == errno.EBADF
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # even root reopening it for writing finds it sealed against writes
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with pytest.raises(PermissionError):
                    os.pwrite(rw, b"\1" * 8, 64)
                with pytest.raises(PermissionError):
                    mmap.mmap(rw, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                with pytest.raises(PermissionError):
                    os.ftruncate(rw, 0)
            finally:
                os.close(rw)
        finally:
            os.close(fd)
        assert mgr.list_pd() == [0]


def test_a_dead_bmid_is_an_error_not_a_stale_board(daemon):
    with daemon.open() as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        assert pd.get_current_status() is bmi.PDStatus.ALLOCATED
        daemon.kill()
        for read in (mgr.list_pd, pd.get_current_status, lambda: mgr.get_controller(pd.get_pd_id())):
            with pytest.raises(bmi.ResourceError, match="bmid closed the connection"):
                read()
    daemon.start()
    with daemon.open() as mgr:          # a new bmid, a new board with the adopted PD on it
        assert mgr.list_pd() == [0, pd.get_pd_id()]
        assert mgr.get_controller(pd.get_pd_id()).get_current_status() is bmi.PDStatus.ALLOCATED


def test_a_full_board_sends_list_pd_to_bmid():
    writer = BoardWriter(capacity=2)
    reader = BoardReader(writer.reader_fd())
    try:
        for pd_id in (0, 7, 9):
            writer.set(pd_id, bmi.PDStatus.READY)
        assert not reader.complete and reader.ids() == [0, 7]
        assert reader.status(9) is None
        writer.remove(7)
        writer.remove(9)
        assert reader.complete and reader.ids() == [0]
        writer.set(11, bmi.PDStatus.PAUSED)             # reuses 7's slot: a reader must not mistake it for 7
        assert reader.status(7) is None and reader.status(11) is bmi.PDStatus.PAUSED
        assert reader.ids() == [0, 11]
    finally:
        reader.close()
        writer.close()


def test_a_file_that_is_not_a_board_is_refused(tmp_path):
    path = tmp_path / "fake"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(bmi.ResourceError, match="not a bmid status board"):
        BoardReader(os.open(path, os.O_RDONLY))
    with pytest.raises(bmi.ResourceError, match="too small"):
        BoardReader(os.open("/dev/null", os.O_RDONLY))
