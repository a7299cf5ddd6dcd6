"""The API's manners: statuses print as names, sizes and ints are taken where strings were, URIs say what they
understand, and a typo under /boot/ is refused by the API itself (so bmid and the PD channel refuse it too)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import bmi
from tests.helpers import busybox_path, start


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
