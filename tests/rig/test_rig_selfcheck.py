"""The QEMU rig's host side without QEMU: initramfs contents, module order, verdicts.

The VM runs themselves are `make test-cgroup2` / `make test-xen`; these
checks keep the pieces they rest on honest in seconds.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest

from bmi.drivers.cpio import iter_cpio

RIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rig")
sys.path.insert(0, RIG)

import initramfs  # noqa: E402
import rig  # noqa: E402
from initramfs import RigError  # noqa: E402

needs_busybox = pytest.mark.skipif(not os.path.isfile(initramfs.BUSYBOX), reason="needs busybox-static")
KERNELS = sorted(glob.glob("/lib/modules/6.1.*/modules.dep"))
needs_debian_kernel = pytest.mark.skipif(not KERNELS, reason="needs linux-image-amd64 (6.1) installed")


@pytest.fixture
def moddir(tmp_path):
    """A module tree shaped like the 6.1 kernel's, with the dependency line in an awkward order."""
    base = tmp_path / "1.0-test"
    (base / "kernel").mkdir(parents=True)
    for name in ("ring", "virtio", "pci", "fs", "zipped"):
        (base / "kernel" / f"{name}.ko").write_bytes(name.encode())
    (base / "modules.dep").write_text(
        "kernel/ring.ko:\n"
        "kernel/virtio.ko: kernel/ring.ko\n"
        "kernel/pci.ko: kernel/ring.ko kernel/virtio.ko\n"   # closure, deepest last
        "kernel/fs.ko: kernel/virtio.ko kernel/ring.ko\n"
        "kernel/zipped.ko.xz:\n")
    (base / "modules.builtin").write_text("kernel/net/built-in_mod.ko\n")
    return str(tmp_path)


def test_module_order_puts_dependencies_first_once(moddir):
    order = initramfs.module_order("1.0-test", ["fs", "pci"], moddir=moddir)
    assert order == ["kernel/ring.ko", "kernel/virtio.ko", "kernel/fs.ko", "kernel/pci.ko"]


def test_module_order_skips_builtins_and_treats_dash_as_underscore(moddir):
    assert initramfs.module_order("1.0-test", ["built_in-mod"], moddir=moddir) == []


def test_module_order_refuses_unknown_compressed_and_missing_kernels(moddir):
    with pytest.raises(RigError, match="no module 'nosuch'"):
        initramfs.module_order("1.0-test", ["nosuch"], moddir=moddir)
    with pytest.raises(RigError, match="compressed"):
        initramfs.module_order("1.0-test", ["zipped"], moddir=moddir)
    with pytest.raises(RigError, match="2.0-absent.*linux-image"):
        initramfs.module_order("2.0-absent", ["fs"], moddir=moddir)


@needs_debian_kernel
def test_the_debian_kernel_modules_the_rigs_load():
    release = os.path.basename(os.path.dirname(KERNELS[-1]))
    order = [os.path.basename(p) for p in initramfs.module_order(release, rig.NINEP_MODULES + rig.XEN_MODULES)]
    for first, then in [("virtio_ring.ko", "virtio.ko"), ("virtio.ko", "virtio_pci.ko"),
                        ("9pnet.ko", "9pnet_virtio.ko"), ("netfs.ko", "fscache.ko"), ("fscache.ko", "9p.ko"),
                        ("xen-privcmd.ko", "xenfs.ko")]:
        assert order.index(first) < order.index(then), order
    assert len(order) == len(set(order))


@needs_busybox
def test_initramfs_holds_init_busybox_scripts_env_and_modules(moddir, tmp_path):
    init = tmp_path / "stage1.sh"
    init.write_text("#!/bin/sh\necho hi\n")
    out = tmp_path / "x.cpio"
    env = {"RIG_TEST_CMD": "pytest -k 'a and not b' \"$x\"", "EMPTY": ""}
    with open(out, "wb") as f:
        packed = initramfs.build(f, init=str(init), scripts=[os.path.join(RIG, "init", "common.sh")], env=env,
                                 release="1.0-test", modules=["pci"], moddir=moddir)
    data = out.read_bytes()
    entries = {e.name: e for e in iter_cpio(data, what="rig initramfs")}
    assert packed == ["kernel/ring.ko", "kernel/virtio.ko", "kernel/pci.ko"]

    def content(name: str) -> bytes:
        e = entries[name]
        return data[e.data_offset:e.data_offset + e.size]

    assert content("init") == init.read_bytes() and entries["init"].mode & 0o111
    assert entries["bin/busybox"].size == os.path.getsize(initramfs.BUSYBOX)
    assert content("etc/rig/modules") == b"ring.ko\nvirtio.ko\npci.ko\n"
    assert content("lib/modules/pci.ko") == b"pci"
    assert content("etc/rig/common.sh").startswith(b"# Shared by")
    for d in ("proc", "sys", "dev", "host", "newroot", "run"):
        assert entries[d].mode & 0o040000, d
    # The env file is read by a shell: values with quotes and spaces must survive it.
    (tmp_path / "env").write_bytes(content("etc/rig/env"))
    shown = subprocess.run(["sh", "-c", '. "$1"; printf "%s|%s" "$RIG_TEST_CMD" "$EMPTY"', "sh",
                            str(tmp_path / "env")], capture_output=True, text=True, check=True).stdout
    assert shown == env["RIG_TEST_CMD"] + "|"


def test_initramfs_without_a_kernel_release_refuses_modules(tmp_path):
    with open(tmp_path / "x.cpio", "wb") as f, pytest.raises(RigError, match="no kernel release"):
        initramfs.build(f, init="/dev/null", modules=["9p"])


PASSED = "echo '7 passed, 3 deselected in 240.12s (0:04:00)'; "


@pytest.mark.parametrize("script, expected", [
    (PASSED + "echo 'BMI-RIG-RESULT 0'", 0),
    (PASSED + "echo 'BMI-RIG-RESULT 0'; echo 'BMI-RIG-RESULT 3'", 3),     # the last result counts
    (PASSED + "echo 'not BMI-RIG-RESULT 0'; exit 0", 1),                 # a marker must start the line
    (PASSED + "echo 'BMI-RIG-RESULT 0\r'", 0),                          # serial consoles end lines with CR LF
    ("echo panic; exit 0", 1),                                           # no result line: a crash
    ("echo booting; echo 'BMI-RIG-RESULT 0'", 1),                        # rc 0 but no pytest summary
    ("echo '=== 0 passed, 7 skipped in 3.00s ==='; echo 'BMI-RIG-RESULT 0'", 1),   # nothing passed
    ("echo '======= 2 passed in 3.00s ======='; echo 'BMI-RIG-RESULT 0'", 0),
])
def test_verdict_comes_from_the_last_result_line(tmp_path, capsys, script, expected):
    log = tmp_path / "serial.log"
    assert rig.boot("t", ["sh", "-c", script], 30, str(log)) == expected
    kept = log.read_text()
    assert kept.startswith("$ sh -c") and ("panic" in kept or "BMI-RIG-RESULT" in kept)
    out = capsys.readouterr().out
    assert "rig t:" in out
    if "passed in" in script or PASSED in script:
        assert "passed" in out.split("rig t:", 1)[1]          # the verdict line carries pytest's counts
    assert (tmp_path / "t.verdict").read_text().startswith("rig t:")


def test_hung_vm_is_killed_at_the_hard_timeout(tmp_path, capsys):
    log = tmp_path / "serial.log"
    start = time.monotonic()
    assert rig.boot("t", ["sh", "-c", "echo started; exec sleep 60"], 1, str(log)) == 1
    assert time.monotonic() - start < 15
    assert "hard timeout" in capsys.readouterr().out
    assert "started" in log.read_text()


@needs_busybox
@pytest.mark.parametrize("script", sorted(os.listdir(os.path.join(RIG, "init"))))
def test_guest_scripts_parse_in_busybox_sh(script):
    """A syntax error in an init only shows as a guest that never reports; catch it here."""
    done = subprocess.run([initramfs.BUSYBOX, "sh", "-n", os.path.join(RIG, "init", script)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
