"""Host-side tests of the Xen driver's pure parts: domain JSON, priority mapping, images, URI.

These need no hypervisor; tests on real domains are in test_domains.py.
"""
from __future__ import annotations

import io
import json
import os
import subprocess

import pytest

import bmi
from bmi.drivers.cpio import CpioWriter, iter_cpio
from bmi.drivers.xen import config, image
from bmi.errors import DriverUnavailable, ImageError
from tests import images

BZIMAGE_HEAD = b"\0" * 0x202 + b"HdrS" + b"\0" * 16


def bundle(**files: bytes) -> bytes:
    out = io.BytesIO()
    w = CpioWriter(out)
    for name, data in files.items():
        w.file(name, data)
    w.close()
    return out.getvalue()


def test_priority_weight_mapping_is_monotonic_and_documented():
    weights = [config.priority_weight(p) for p in range(-10, 11)]
    assert weights == sorted(weights) and len(set(weights)) == len(weights)
    assert (weights[0], config.priority_weight(-5), config.priority_weight(0), config.priority_weight(5),
            weights[-1]) == (64, 128, 256, 512, 1024)
    assert all(config.MIN_WEIGHT <= w <= config.MAX_WEIGHT for w in weights)


def test_performance_cap():
    assert config.performance_cap(100, 4) == 0            # uncapped
    assert config.performance_cap(50, 2) == 100           # half of two vCPUs = one physical CPU
    assert config.performance_cap(1, 1) == 1


def test_domain_json_has_what_libxl_reads():
    doc = json.loads(config.domain_json(name="bmi-1-pd2", guest_type="pv", memory=64 << 20, max_memory=128 << 20,
                                        vcpus=1, max_vcpus=2, weight=512, cap=0, kernel="/proc/self/fd/7",
                                        ramdisk="/proc/self/fd/8", cmdline="console=hvc0 quiet",
                                        uuid="6f1c3a52-2b0e-4c47-9a57-0d7c1c2f9b11"))
    assert doc["c_info"] == {"type": "pv", "name": "bmi-1-pd2", "uuid": "6f1c3a52-2b0e-4c47-9a57-0d7c1c2f9b11"}
    b = doc["b_info"]
    assert (b["max_memkb"], b["target_memkb"], b["max_vcpus"], b["avail_vcpus"]) == (131072, 65536, 2, [0])
    assert b["sched_params"] == {"weight": 512, "cap": 0}
    assert (b["kernel"], b["ramdisk"], b["cmdline"]) == ("/proc/self/fd/7", "/proc/self/fd/8", "console=hvc0 quiet")
    assert "type.pv" in b


def test_domain_json_without_ramdisk_and_bad_type():
    doc = json.loads(config.domain_json(name="n", guest_type="pvh", memory=1 << 26, max_memory=1 << 26, vcpus=2,
                                        max_vcpus=2, weight=256, cap=0, kernel="/k", ramdisk=None, cmdline="x"))
    assert "ramdisk" not in doc["b_info"] and doc["b_info"]["avail_vcpus"] == [0, 1]
    assert "uuid" not in doc["c_info"]                     # libxl makes one up
    with pytest.raises(ValueError):
        config.domain_json(name="n", guest_type="hvm", memory=1, max_memory=1, vcpus=1, max_vcpus=1, weight=1,
                           cap=0, kernel="/k", ramdisk=None, cmdline="")


def test_cmdline_bundle_then_config():
    assert config.cmdline(None, None) == config.DEFAULT_CMDLINE
    assert config.cmdline("console=hvc0", "quiet") == "console=hvc0 quiet"
    assert config.cmdline(None, "console=hvc0 x=1") == "console=hvc0 x=1"


def test_xenstore_names():
    assert config.xenstore_name("/app/mode") == "app/mode"
    assert config.xenstore_name("/boot/cmdline") == "boot/cmdline"
    assert config.xenstore_name("/app/a.b") is None
    assert config.xenstore_name("/app/with space") is None


@pytest.mark.parametrize("head,kind", [(b"\x7fELF" + b"\0" * 60, "elf"), (BZIMAGE_HEAD, "bzimage"),
                                       (b"\x1f\x8b\x08\0", "compressed"), (b"#!/bin/sh\n", None),
                                       (b"070701", None)])
def test_kernel_kind(head, kind):
    assert image.kernel_kind(head) == kind


def test_parse_bundle_finds_the_three_files():
    data = bundle(kernel=BZIMAGE_HEAD + b"K" * 100, ramdisk=b"R" * 33, cmdline=b"console=hvc0 x=1\n")
    layout = image.parse_bundle(data, what="t")
    assert data[layout.kernel.offset:layout.kernel.offset + layout.kernel.size] == BZIMAGE_HEAD + b"K" * 100
    assert data[layout.ramdisk.offset:layout.ramdisk.offset + layout.ramdisk.size] == b"R" * 33
    assert layout.cmdline == "console=hvc0 x=1"


@pytest.mark.parametrize("files,match", [
    ({"ramdisk": b"R"}, "no kernel"),
    ({"kernel": b"not a kernel"}, "not an ELF vmlinux"),
    ({"kernel": BZIMAGE_HEAD, "init": b"x"}, "holds 'init'"),
    ({"kernel": BZIMAGE_HEAD, "cmdline": b"a" * 2000}, "at most 1023"),
    ({"kernel": BZIMAGE_HEAD, "cmdline": b"\xff\xfe"}, "not UTF-8"),
])
def test_parse_bundle_rejects(files, match):
    with pytest.raises(ImageError, match=match):
        image.parse_bundle(bundle(**files), what="setup_pd of PD 1")


def _sealed(data: bytes) -> int:
    fd = image.memfd("t", what="t", pd_id=1)
    os.write(fd, data)
    import fcntl
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, image.SEALS)
    return fd


def test_prepare_bundle_slices_are_sealed_exact_copies():
    kernel = BZIMAGE_HEAD + os.urandom(70000)
    ramdisk = os.urandom(12345)
    boot = image.prepare(_sealed(bundle(kernel=kernel, ramdisk=ramdisk, cmdline=b"quiet")), what="t", pd_id=1)
    try:
        assert boot.fmt == "bundle" and boot.cmdline == "quiet"
        with open(boot.kernel_path, "rb") as f:
            assert f.read() == kernel
        with open(boot.ramdisk_path, "rb") as f:
            assert f.read() == ramdisk
        import fcntl
        assert fcntl.fcntl(boot.kernel_fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
        with pytest.raises(OSError):
            os.write(boot.kernel_fd, b"x")
    finally:
        boot.close()


def test_prepare_plain_kernel_and_garbage():
    boot = image.prepare(_sealed(BZIMAGE_HEAD + b"k"), what="t", pd_id=1)
    assert (boot.fmt, boot.ramdisk_fd, boot.cmdline) == ("kernel", None, None)
    boot.close()
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ImageError, match="not a Xen guest image"):
        image.prepare(_sealed(b"hello world" * 100), what="setup_pd of PD 1", pd_id=1)
    assert set(os.listdir("/proc/self/fd")) == before      # the memfd was closed


def test_open_xen_outside_dom0_is_driver_unavailable():
    if os.path.exists("/proc/xen/capabilities"):
        with open("/proc/xen/capabilities") as f:
            if "control_d" in f.read():
                pytest.skip("this is a Xen dom0: xen:///session opens here (test_domains.py covers it)")
    with pytest.raises(DriverUnavailable, match="open the Xen driver"):
        bmi.open("xen:///session", integrity=False)


def test_guest_ramdisk_is_the_rig_init_with_extra_files_appended(monkeypatch):
    """The kernel unpacks a second archive after the first: the guest gets pvguest.sh and the extras."""
    from .conftest import RIG, guest_ramdisk
    monkeypatch.delenv("BMI_XEN_GUEST_RAMDISK", raising=False)
    base = guest_ramdisk()
    with open(os.path.join(RIG, "init", "pvguest.sh"), "rb") as f:
        init = f.read()
    entries = {e.name: e for e in iter_cpio(base, what="guest ramdisk")}
    start = entries["init"].data_offset
    assert base[start:start + entries["init"].size] == init
    both = guest_ramdisk({"bin/xsclient": b"\x7fELF client"})
    assert both.startswith(base) and len(base) % 4 == 0
    [extra] = iter_cpio(both[len(base):], what="appended archive")
    assert (extra.name, extra.mode & 0o777) == ("bin/xsclient", 0o755)
    assert both[len(base) + extra.data_offset:][:extra.size] == b"\x7fELF client"


def test_xsclient_says_why_it_cannot_run():
    """The guest's xenstore client fails with a message, never silently or by hanging."""
    client = str(images.build("xsclient"))
    usage = subprocess.run([client, "delete", "x"], capture_output=True, text=True, timeout=10)
    assert usage.returncode == 1 and "xsclient read PATH" in usage.stderr
    too_long = subprocess.run([client, "write", "a" * 5000, "v"], capture_output=True, text=True, timeout=10)
    assert too_long.returncode == 1 and "longer than one xenstore message" in too_long.stderr
    if any(os.path.exists(p) for p in ("/dev/xen/xenbus", "/proc/xen/xenbus")):
        return                                   # in a Xen domain the read below would be answered
    absent = subprocess.run([client, "read", "bmi/pd-id"], capture_output=True, text=True, timeout=10)
    assert absent.returncode == 1 and "no xenbus device" in absent.stderr and "ENOENT" in absent.stderr
