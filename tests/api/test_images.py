"""setup_pd with every kind of bad image: typed errors, PD unchanged, nothing leaked."""
import gzip
import hashlib
import io
import stat

import pytest

import bmi
from bmi.drivers.cpio import CpioWriter
from tests.helpers import busybox_path


class Image:
    """A PDImage whose behaviour each test chooses."""

    def __init__(self, data=b"", size=None, get_data=None):
        self.data, self.size, self._get = data, size, get_data

    def get_image_size(self):
        return len(self.data) if self.size is None else self.size

    def get_data(self, offset, length):
        if self._get is not None:
            return self._get(offset, length)
        return self.data[offset:offset + length]


def _busybox():
    return open(busybox_path(), "rb").read()


def _archive(build) -> bytes:
    out = io.BytesIO()
    w = CpioWriter(out)
    build(w)
    w.close()
    return out.getvalue()


def _raise(offset, length):
    if offset > 0:
        raise OSError("disk on fire")
    return b"\x7fELF" + b"\0" * (length - 4)


BAD_IMAGES = {
    "empty": Image(b""),
    "negative size": Image(b"x", size=-1),
    "size not an int": Image(b"x", size="10"),
    "raises in get_data": Image(size=1 << 20, get_data=_raise),
    "returns more than asked": Image(size=100, get_data=lambda o, n: b"\0" * (n + 10)),
    "returns a str": Image(size=100, get_data=lambda o, n: "x" * n),
    "lies about its size": Image(b"\x7fELF" * 10, size=1000),
    "garbage": Image(b"\x00garbage" * 1000),
    "script": Image(b"#!/bin/sh\necho hi\n"),
    "gzip": Image(gzip.compress(b"070701" + b"0" * 200)),
    "dynamic ELF": Image(open("/bin/ls", "rb").read()),
    "foreign ELF": Image(b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\x00\x28\x00" + b"\0" * 200),
    "truncated cpio": Image(b"070701" + b"0" * 50),
    "cpio without init": Image(_archive(lambda w: w.file("bin/x", b"x"))),
    "cpio with device": Image(_archive(lambda w: (w.file("init", b"x", 0o755),
                                                  w.raw("dev/sda", stat.S_IFBLK | 0o600)))),
    "cpio escaping": Image(_archive(lambda w: (w.file("init", b"x", 0o755), w.file("../../etc/evil", b"x")))),
    "cpio proc symlink": Image(_archive(lambda w: (w.file("init", b"x", 0o755), w.symlink("proc", "/etc")))),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_leaves_pd_allocated(mgr, name):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    with pytest.raises(bmi.ImageError) as e:
        pd.setup_pd(BAD_IMAGES[name])
    assert f"PD {pd.get_pd_id()}" in str(e.value)
    assert pd.get_current_status() is bmi.PDStatus.ALLOCATED
    assert pd.measurement() == {}


def test_failed_setup_keeps_the_previous_image(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    pd.setup_pd(bmi.FileImage(busybox_path()))
    before = pd.measurement()
    with pytest.raises(bmi.ImageError):
        pd.setup_pd(BAD_IMAGES["garbage"])
    assert pd.get_current_status() is bmi.PDStatus.READY
    assert pd.measurement() == before
    pd.set_config_param("/boot/cmdline", "busybox true")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    assert pd.wait(10) is bmi.PDStatus.SHUTDOWN
    assert pd.get_runtime_param("/system/exit-status") == "0"


def test_dynamic_elf_error_says_what_to_do(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    with pytest.raises(bmi.ImageError, match="bmi bundle"):
        pd.setup_pd(bmi.FileImage("/bin/ls"))


@pytest.mark.parametrize("image", [None, "/bin/ls", b"bytes", object()])
def test_not_a_pdimage(mgr, image):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    with pytest.raises(bmi.InvalidArgument, match="PDImage"):
        pd.setup_pd(image)


def test_setup_arguments_checked(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    with pytest.raises(bmi.InvalidArgument):
        pd.setup_pd(bmi.FileImage(busybox_path()), banks="sha256")
    with pytest.raises(bmi.InvalidArgument):
        pd.setup_pd(bmi.FileImage(busybox_path()), banks=("md5",))
    with pytest.raises(bmi.InvalidArgument):
        pd.setup_pd(bmi.FileImage(busybox_path()), progress=42)
    assert pd.get_current_status() is bmi.PDStatus.ALLOCATED


def test_measurement_covers_every_byte_and_progress_is_reported(mgr):
    data = _busybox()
    calls = []
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    pd.setup_pd(Image(data, get_data=lambda o, n: data[o:o + min(n, 4096)]),
                progress=lambda done, total: calls.append((done, total)))
    assert pd.measurement()["sha256"] == hashlib.sha256(data).digest()
    assert calls and calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_bytes_image_runs(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    pd.setup_pd(bmi.BytesImage(_busybox()))
    pd.set_config_param("/boot/cmdline", "busybox echo from-bytes")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    pd.wait(10)
    assert pd.get_runtime_param("/console/log") == "from-bytes\n"


def test_file_image_must_exist():
    with pytest.raises(bmi.InvalidArgument):
        bmi.FileImage("/nonexistent/image")


def test_image_size_bound_from_the_environment(mgr, monkeypatch):
    monkeypatch.setenv("BMI_MAX_IMAGE", "1M")
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    with pytest.raises(bmi.ImageError, match="1048576|1 MiB|BMI_MAX_IMAGE"):
        pd.setup_pd(bmi.FileImage(busybox_path()))
    assert pd.get_current_status() is bmi.PDStatus.ALLOCATED
    monkeypatch.setenv("BMI_MAX_IMAGE", "lots")
    with pytest.raises(bmi.InvalidArgument):
        pd.setup_pd(bmi.FileImage(busybox_path()))


def test_a_file_changed_after_setup_runs_what_was_measured(mgr, tmp_path):
    """System mode hands bmid the FileImage's own file: bmid's one copy and hash goes into its own sealed
    memfd, so changing the file in place afterwards changes neither what runs nor its measurement."""
    original = _busybox()
    path = tmp_path / "image"
    path.write_bytes(original)
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    pd.setup_pd(bmi.FileImage(path))
    with open(path, "r+b") as f:        # the same inode, other bytes: a shell script that would run instead
        f.write(b"#!/bin/sh\necho swapped\n" + b"\0" * 64)
    pd.set_config_param("/boot/cmdline", "busybox echo measured")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    pd.wait(10)
    assert pd.get_runtime_param("/console/log") == "measured\n"
    assert pd.measurement()["sha256"] == hashlib.sha256(original).digest()
