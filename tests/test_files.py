"""bmi/files.py: a file a user names is read only when it is a regular file, within its limit, as the text asked."""
from __future__ import annotations

import os
import threading

import pytest

from bmi import FileImage
from bmi.errors import ImageError, InvalidArgument
from bmi.files import open_regular, read_bytes, read_text, sha256_of
from bmi.image import open_file_image


def _without_hanging(call, fifo: str):
    """call() in a thread; a FIFO open that blocks is set free (a writer opens it) and fails the test."""
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as e:
            outcome.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))     # lets the blocked open return
        thread.join(10)
        pytest.fail(f"{call} blocked on the FIFO {fifo}")
    return outcome[0]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("read", [lambda p: read_text(p, "the report", 1 << 20),
                                  lambda p: read_bytes(p, "the report", 1 << 20),
                                  lambda p: sha256_of(p, "the report"),
                                  lambda p: os.close(open_regular(p, "the report"))])
def test_anything_but_a_regular_file_is_refused_at_once_saying_what_it_is(read, fifo, tmp_path):
    fds = len(os.listdir("/proc/self/fd"))
    error = _without_hanging(lambda: read(fifo), fifo)
    assert isinstance(error, InvalidArgument) and str(error) == f"the report: {fifo} is a FIFO, not a regular file"
    for path, kind in (("/dev/zero", "a character device"), (str(tmp_path), "a directory")):
        with pytest.raises(InvalidArgument, match=f"^the report: {path} is {kind}, not a regular file$"):
            read(path)
    with pytest.raises(InvalidArgument, match="^the report: cannot read .*/nowhere: No such file or directory$"):
        read(str(tmp_path / "nowhere"))
    assert len(os.listdir("/proc/self/fd")) == fds         # no fd left open by a refusal


def test_a_file_over_its_limit_or_not_text_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(b"x" * 11)
    assert read_bytes(path, "the report", 11) == b"x" * 11
    with pytest.raises(InvalidArgument, match=r"the report: .*r.json is larger than 10 bytes"):
        read_bytes(path, "the report", 10)
    path.write_bytes(b'{"a": "\xd0(")')
    with pytest.raises(InvalidArgument, match=r"the report: .*r.json is not UTF-8 text \(byte 7 is 0xd0\)"):
        read_text(path, "the report", 100)
    path.write_text("caf\u00e9")
    assert read_text(path, "the report", 100) == "caf\u00e9"
    assert sha256_of(path, "x").hex() == "850f7dc43910ff890f8879c0ed26fe697c93a067ad93a7d50f466a7028a9bf4e"


def test_a_file_image_swapped_for_a_fifo_fails_instead_of_blocking(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"\x7fELF")
    image = FileImage(path)                  # a regular file when it was made
    path.unlink()
    os.mkfifo(path)
    error = _without_hanging(lambda: open_file_image(image, "setup_pd"), str(path))
    assert isinstance(error, ImageError) and "is no longer a regular file" in str(error)
