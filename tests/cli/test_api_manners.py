"""The API's manners: statuses print as names, sizes and ints are taken where strings were, URIs say what they
understand, and a typo under /boot/ is refused by the API itself (so bmid and the PD channel refuse it too)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import bmi
from bmi.testing import wait_status
from tests.helpers import busybox_path, output, start
from tests.images import newc


@pytest.fixture(params=["session", "system"])
def mgr(request, tmp_path):
    if request.param == "session":
        with bmi.open("linux:///session", integrity=False) as m:
            yield m
        return
    from tests.server.bmid import running_bmid
    with running_bmid(tmp_path) as daemon, daemon.open() as m:
        yield m


def test_statuses_print_as_their_names(mgr):
    assert str(bmi.PDStatus.PAUSED) == "PAUSED" and f"{bmi.PDStatus.RUNNING}" == "RUNNING"
    assert str(bmi.ConnectionType.SHM) == "SHM"
    assert bmi.PDStatus.PAUSED == 4                     # still the spec's numbers
    pd = start(mgr, ["busybox", "sleep", "30"])
    pd.request_status_change(bmi.PDStatus.PAUSED)
    printed = subprocess.run([sys.executable, "-c", "import bmi; print(bmi.PDStatus(4))"], capture_output=True,
                             text=True, timeout=60).stdout
    assert printed == "PAUSED\n" and str(pd.get_current_status()) == "PAUSED"
    pd.destroy()


def test_runtime_params_take_ints(mgr):
    pd = start(mgr, ["busybox", "sleep", "30"], mem=64 << 20)
    pd.set_runtime_param("/system/memory/current", 32 << 20)
    assert pd.get_runtime_param("/system/memory/current") == str(32 << 20)
    pd.set_runtime_param("/system/cpu/performance", 50)
    assert pd.get_runtime_param("/system/cpu/performance") == "50"
    with pytest.raises(bmi.InvalidArgument, match="str or int"):
        pd.set_runtime_param("/system/cpu/performance", True)
    with pytest.raises(bmi.InvalidArgument, match="str or int"):
        pd.set_runtime_param("/system/cpu/performance", 5.0)
    pd.destroy()


def test_description_takes_sizes_and_holds_bytes(mgr):
    desc = bmi.PDDescription(mem="64M")
    assert desc.mem == 64 << 20 and isinstance(desc.mem, int)
    assert bmi.PDDescription(mem="1.5G").mem == 3 << 29 and bmi.PDDescription(mem="2GiB").mem == 2 << 30
    assert bmi.PDDescription(mem="4096").mem == 4096
    for bad in ("lots", "-1M", "1.5", ""):
        with pytest.raises(bmi.InvalidArgument, match="PDDescription.mem"):
            bmi.PDDescription(mem=bad)
    pd = mgr.allocate_pd(bmi.PDDescription(mem="48M"))
    assert pd.get_runtime_param("/system/memory/max") == str(48 << 20)
    pd.destroy()


def test_boot_typos_are_refused_by_the_api(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem="32M"))
    with pytest.raises(bmi.InvalidArgument, match=r"'/boot/cmdlin'.*known: /boot/cmdline, /boot/capabilities, "
                                                   r"/boot/allow, /boot/env/NAME"):
        pd.set_config_param("/boot/cmdlin", "busybox true")
    for bad in ("/boot", "/boot/env", "/boot/env/"):
        with pytest.raises(bmi.InvalidArgument, match="not a boot parameter"):
            pd.set_config_param(bad, "x")
    pd.set_config_param("/boot/env/MODE", "fast")
    pd.set_config_param("/bootloader", "kept: not under /boot/")
    pd.destroy()


def test_uris_refuse_options_they_do_not_understand():
    with pytest.raises(bmi.InvalidArgument, match=r"unknown query option 'socket'; linux:///session understands: "
                                                  r"none"):
        bmi.open("linux:///session?socket=x")
    with pytest.raises(bmi.InvalidArgument, match=r"unknown query option 'sock'; linux:///system understands: "
                                                  r"socket"):
        bmi.open("linux:///system?sock=/tmp/x")


@pytest.fixture
def root_archive(tmp_path):
    """A newc root of about 12 MiB: busybox as /init, four 1 MiB files and one of 6 MiB (reported in 1 MiB steps
    too: about 12 reports in all)."""
    with open(busybox_path(), "rb") as f:
        busybox = f.read()
    entries = [("bin", 0o40755), ("bin/busybox", 0o100755, busybox), ("init", 0o120777, b"bin/busybox")]
    entries += [(f"blob{i}", 0o100644, os.urandom(1 << 20)) for i in range(4)]
    entries.append(("blob9", 0o100644, os.urandom(6 << 20)))
    path = tmp_path / "root.cpio"
    path.write_bytes(newc(entries))
    return str(path)


def _ready(mgr, image: str) -> bmi.PDController:
    pd = mgr.allocate_pd(bmi.PDDescription(mem="64M"))
    pd.setup_pd(bmi.FileImage(image))
    pd.set_config_param("/boot/cmdline", "busybox sh -c 'busybox ls /blob9'")
    return pd


def test_unpacking_a_root_reports_progress(mgr, root_archive):
    """request_status_change(RUNNING, progress=) as a start unpacks a root archive: the bytes of the archive done,
    increasing, up to its size; in system mode bmid unpacks it and sends the reports before its reply."""
    size = os.path.getsize(root_archive)
    calls: list[tuple[int, int]] = []
    pd = _ready(mgr, root_archive)
    pd.request_status_change(bmi.PDStatus.RUNNING, progress=lambda done, total: calls.append((done, total)))
    assert output(pd) == "/blob9\n"
    assert len(calls) >= 10 and calls[-1] == (size, size) and {total for _, total in calls} == {size}
    assert all(0 < a[0] < b[0] for a, b in zip(calls, calls[1:])), calls
    calls.clear()
    elf = start(mgr, ["busybox", "true"])            # an ELF image is not unpacked: no report
    elf.request_status_change(bmi.PDStatus.RESTARTING, progress=lambda done, total: calls.append((done, total)))
    assert calls == []
    for each in (pd, elf):
        each.destroy()


def test_an_unpack_callback_that_is_not_callable_is_refused(mgr, root_archive):
    pd = _ready(mgr, root_archive)
    with pytest.raises(bmi.InvalidArgument, match="progress must be callable"):
        pd.request_status_change(bmi.PDStatus.RUNNING, progress="not callable")
    assert pd.get_current_status() is bmi.PDStatus.READY
    pd.destroy()


def test_a_failing_unpack_callback_stops_the_start_and_leaves_nothing(mgr, root_archive):
    pd = _ready(mgr, root_archive)

    def fail(done: int, total: int) -> None:
        raise ValueError("disk full")
    with pytest.raises(bmi.InvalidArgument, match=r"stopped by the progress callback.*ValueError\('disk full'\)"):
        pd.request_status_change(bmi.PDStatus.RUNNING, progress=fail)
    wait_status(pd, bmi.PDStatus.READY)             # bmid stops the start at its next report

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):            # passed through untouched, as setup_pd's progress does
        pd.request_status_change(bmi.PDStatus.RUNNING, progress=interrupt)
    wait_status(pd, bmi.PDStatus.READY)             # bmid stops the start at its next report
    pd.request_status_change(bmi.PDStatus.RUNNING)     # and it still starts
    assert output(pd) == "/blob9\n"
    pd.destroy()
