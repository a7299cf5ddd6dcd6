"""Fixtures of the bmid tests."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from typing import Iterator

import pytest

from tests.server.bmid import running_bmid


@pytest.fixture
def daemon(tmp_path):
    """A bmid of this test's own (state and socket under tmp_path, no TPM link)."""
    with running_bmid(tmp_path) as d:
        yield d


class SmallFs:
    """A tmpfs of its own (the state filesystem of a test) that the test can fill and free."""

    def __init__(self, path: str):
        self.path = path
        self.filler = os.path.join(path, "filler")

    def fill(self) -> None:
        """Take every free byte (bmid's own reserve file, if it has one, stays)."""
        chunk = b"\0" * (64 << 10)
        with open(self.filler, "ab", buffering=0) as f:
            for size in (len(chunk), 4096, 1):
                try:
                    while True:
                        f.write(chunk[:size])
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.filler)


@contextlib.contextmanager
def small_fs(path: str, size: str = "24m") -> Iterator[SmallFs]:
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill: {done.stderr.strip()}")
    try:
        yield SmallFs(path)
    finally:
        subprocess.run(["umount", "-l", path], check=True)


@pytest.fixture
def state_fs(tmp_path):
    """A small tmpfs for bmid's state (the socket stays outside it)."""
    with small_fs(str(tmp_path / "fs")) as fs:
        yield fs
