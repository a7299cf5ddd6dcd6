"""bmi/files.py: a file a user names never hangs bmi or fills its memory, and a wrong one is refused saying why."""
from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from bmi import FileImage
from bmi.errors import ImageError, InvalidArgument
from bmi.files import read_bytes, read_text, sha256_of
from bmi.image import open_file_image

EMPTY = hashlib.sha256(b"").digest()


def _without_hanging(call, fifo: str):
    """call()'s result or exception, from a thread; an open that blocks on the FIFO is set free (a writer opens
    it) and fails the test."""
    outcome: list[object] = []

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


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_fifo_no_one_writes_to_reads_as_empty_at_once(fifo):
    fds = _fds()
    assert _without_hanging(lambda: read_text(fifo, "the report", 100), fifo) == ""
    assert _without_hanging(lambda: sha256_of(fifo, "--expect-image"), fifo) == EMPTY
    assert _fds() == fds


def test_a_pipe_is_read_to_its_end_as_from_a_shell_process_substitution():
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, b"PEM " * 20000), os.close(w)))   # more than a pipe holds
    writer.start()
    try:
        assert read_text(f"/proc/self/fd/{r}", "--ak", 1 << 20) == "PEM " * 20000
    finally:
        writer.join()
        os.close(r)


def test_what_never_ends_or_cannot_be_read_is_refused_saying_what_it_is(tmp_path):
    fds = _fds()
    with pytest.raises(InvalidArgument, match="^the report: /dev/zero has more than 4096 bytes, more than one can"):
        read_bytes("/dev/zero", "the report", 4096)
    with pytest.raises(InvalidArgument, match="^--expect-image: /dev/zero is a character device, not a regular file$"):
        sha256_of("/dev/zero", "--expect-image")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "sock"))
    for path, kind in ((str(tmp_path), "a directory"), (str(tmp_path / "sock"), "a socket")):
        for read in (lambda p: read_text(p, "the report", 100), lambda p: sha256_of(p, "the report")):
            with pytest.raises(InvalidArgument, match=f"^the report: {path} is {kind}, not a regular file$"):
                read(path)
    listening.close()
    with pytest.raises(InvalidArgument, match="^the report: cannot read .*/nowhere: No such file or directory$"):
        read_text(str(tmp_path / "nowhere"), "the report", 100)
    assert _fds() == fds         # no fd left open by a refusal


def test_a_file_over_its_limit_or_not_text_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(b"x" * 11)
    assert read_bytes(path, "the report", 11) == b"x" * 11
    with pytest.raises(InvalidArgument, match=r"the report: .*r.json has more than 10 bytes"):
        read_bytes(path, "the report", 10)
    path.write_bytes(b'{"a": "\xd0(")')
    with pytest.raises(InvalidArgument, match=r"the report: .*r.json is not UTF-8 text \(byte 7 is 0xd0\)"):
        read_text(path, "the report", 100)
    path.write_text("caf\u00e9")
    assert read_text(path, "the report", 100) == "caf\u00e9"
    assert sha256_of(path, "x") == hashlib.sha256("caf\u00e9".encode()).digest()


def test_a_file_image_swapped_for_a_fifo_fails_instead_of_blocking(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"\x7fELF")
    image = FileImage(path)                  # a regular file when it was made
    path.unlink()
    os.mkfifo(path)
    error = _without_hanging(lambda: open_file_image(image, "setup_pd"), str(path))
    assert isinstance(error, ImageError) and "is no longer a regular file" in str(error)
