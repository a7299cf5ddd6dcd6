"""measure_into: copy-and-hash against hashlib, over real memfds, and every way an image can misbehave."""
from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bmi.errors import ImageError, InvalidArgument
from bmi.image import BytesImage, FdImage, FileImage
from bmi.integrity.measure import (CHUNK_SIZE, DEFAULT_MAX_IMAGE, FILE_STEP, SUPPORTED_BANKS,
                                   copy_into, handover_fd, hash_file, max_image_size, measure_into)

CHUNK = CHUNK_SIZE


def _tasks() -> int:
    """OS threads of this process: the C workers are invisible to `threading`."""
    return len(os.listdir("/proc/self/task"))


def _tasks_back_to(count: int, timeout: float = 2.0) -> int:
    """The thread count once it is back to `count`, or after `timeout`: a joined thread can stay listed in
    /proc/self/task for a moment after pthread_join returned (the kernel wakes the joiner before the task
    is gone), longer on a loaded host."""
    deadline = time.monotonic() + timeout
    while _tasks() != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return _tasks()


@pytest.fixture
def memfd():
    fd = os.memfd_create("bmi-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    yield fd
    os.close(fd)


def _contents(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _expect(data: bytes, banks=SUPPORTED_BANKS) -> dict[str, bytes]:
    return {b: hashlib.new(b, data).digest() for b in banks}


class ShortReads:
    """A well-behaved PDImage that returns fewer bytes than asked, in a pattern given by `cuts`."""

    def __init__(self, data: bytes, cuts: list[int]):
        self.data, self.cuts, self.calls = data, cuts or [CHUNK], 0

    def get_image_size(self) -> int:
        return len(self.data)

    def get_data(self, offset: int, length: int) -> bytes:
        self.calls += 1
        n = max(1, min(length, self.cuts[self.calls % len(self.cuts)]))
        return self.data[offset:offset + n]


def _file_image(tmp_path, data: bytes) -> FileImage:
    p = tmp_path / "image.bin"
    p.write_bytes(data)
    return FileImage(p)


@pytest.mark.parametrize("size", [1, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7])
@pytest.mark.parametrize("kind", ["bytes", "file"])
def test_matches_hashlib_and_copies_every_byte(size, kind, memfd, tmp_path):
    data = os.urandom(size)
    image = BytesImage(data) if kind == "bytes" else _file_image(tmp_path, data)
    assert measure_into(image, memfd) == _expect(data, ("sha256",))
    assert _contents(memfd) == data


@pytest.mark.parametrize("banks", [("sha384",), ("sha512",), ("sha384", "sha512"), SUPPORTED_BANKS,
                                   ("SHA512", "sha512", "sha256")])
@pytest.mark.parametrize("kind", ["bytes", "file"])
def test_several_banks(banks, kind, memfd, tmp_path):
    data = os.urandom(2 * CHUNK + 12345)
    image = BytesImage(data) if kind == "bytes" else _file_image(tmp_path, data)
    got = measure_into(image, memfd, banks=banks)
    want = {"sha256"} | {b.lower() for b in banks}
    assert got == _expect(data, sorted(want))
    assert _contents(memfd) == data


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 3 * CHUNK + 100), cuts=st.lists(st.integers(1, CHUNK + 1), max_size=5),
       banks=st.lists(st.sampled_from(SUPPORTED_BANKS), max_size=3))
def test_random_sizes_and_short_reads(size, cuts, banks):
    data = os.urandom(size)
    fd = os.memfd_create("bmi-test")
    try:
        got = measure_into(ShortReads(data, cuts), fd, banks=banks)
        assert got == _expect(data, sorted({"sha256", *banks}))
        assert _contents(fd) == data
    finally:
        os.close(fd)


def test_a_reused_buffer_is_measured_as_it_was_returned(memfd):
    """An image that hands out one bytearray and overwrites it on the next call."""

    class Reuse:
        buf = bytearray(CHUNK)

        def get_image_size(self):
            return 4 * CHUNK

        def get_data(self, offset, length):
            self.buf[:] = bytes([offset // CHUNK + 1]) * CHUNK
            return self.buf[:length] if length < CHUNK else self.buf

    data = b"".join(bytes([i + 1]) * CHUNK for i in range(4))
    assert measure_into(Reuse(), memfd) == _expect(data, ("sha256",))
    assert _contents(memfd) == data


def test_overridden_file_image_is_read_through_get_data(memfd, tmp_path):
    data = os.urandom(CHUNK + 3)

    class Upper(FileImage):
        def get_data(self, offset, length):
            return bytes(b ^ 0xFF for b in super().get_data(offset, length))

    flipped = bytes(b ^ 0xFF for b in data)
    assert measure_into(Upper(_file_image(tmp_path, data).path), memfd) == _expect(flipped, ("sha256",))
    assert _contents(memfd) == flipped


@pytest.mark.parametrize("kind", ["bytes", "file"])
def test_progress_per_chunk_then_total(kind, memfd, tmp_path):
    size = 2 * FILE_STEP + 5 if kind == "file" else 5 * CHUNK + 5
    data = os.urandom(size)
    image = BytesImage(data) if kind == "bytes" else _file_image(tmp_path, data)
    seen: list[tuple[int, int]] = []
    measure_into(image, memfd, progress=lambda done, total: seen.append((done, total)))
    step = FILE_STEP if kind == "file" else CHUNK
    assert seen == [(min(i * step, size), size) for i in range(1, -(-size // step) + 1)]


# --- bounds -------------------------------------------------------------------------------

def test_max_image_size_env(monkeypatch):
    monkeypatch.delenv("BMI_MAX_IMAGE", raising=False)
    assert max_image_size() == DEFAULT_MAX_IMAGE
    for raw, want in [("4096", 4096), ("64K", 64 << 10), ("3m", 3 << 20), ("2G", 2 << 30), ("1 GiB", 1 << 30)]:
        monkeypatch.setenv("BMI_MAX_IMAGE", raw)
        assert max_image_size() == want
    for bad in ["-1", "0", "lots", "1.5G", "12Q"]:
        monkeypatch.setenv("BMI_MAX_IMAGE", bad)
        with pytest.raises(InvalidArgument, match="BMI_MAX_IMAGE"):
            max_image_size()


class Counting:
    """An image that records every get_data call (to prove nothing was pulled)."""

    def __init__(self, size: int):
        self.size, self.calls = size, 0

    def get_image_size(self):
        return self.size

    def get_data(self, offset, length):
        self.calls += 1
        return b"x" * length


def test_over_the_bound_fails_before_any_copy(memfd, monkeypatch):
    image = Counting(4097)
    with pytest.raises(ImageError, match=r"PD 7: image is 4097 bytes, over the bound of 4096"):
        measure_into(image, memfd, max_size=4096, pd_id=7)
    monkeypatch.setenv("BMI_MAX_IMAGE", "4K")
    with pytest.raises(ImageError, match="over the bound"):
        measure_into(image, memfd)
    assert image.calls == 0 and os.fstat(memfd).st_size == 0
    assert measure_into(Counting(4096), memfd)["sha256"] == hashlib.sha256(b"x" * 4096).digest()


def test_a_file_over_the_bound_fails_before_any_copy(memfd, tmp_path):
    with pytest.raises(ImageError, match="over the bound"):
        measure_into(_file_image(tmp_path, b"y" * 5000), memfd, max_size=4999)
    assert os.fstat(memfd).st_size == 0


# --- bad arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"banks": ("sha1",)}, "unknown PCR bank 'sha1'"),
    ({"banks": ("sha256", 3)}, "unknown PCR bank 3"),
    ({"max_size": 0}, "max_size must be a positive int"),
    ({"max_size": "1G"}, "max_size must be a positive int"),
    ({"progress": 5}, "progress must be callable"),
    ({"banks": None}, "banks must be a sequence"),
])
def test_bad_arguments(kwargs, match, memfd):
    image = Counting(10)
    with pytest.raises(InvalidArgument, match=f"PD 3: {match}"):
        measure_into(image, memfd, pd_id=3, **kwargs)
    assert image.calls == 0


def test_bad_fds(tmp_path):
    image = Counting(10)
    with pytest.raises(InvalidArgument, match="fd 999 is not open"):
        measure_into(image, 999)
    ro = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(InvalidArgument, match=f"fd {ro} is not open for writing"):
            measure_into(image, ro)
    finally:
        os.close(ro)
    assert image.calls == 0


def test_a_memfd_that_already_holds_bytes_is_refused(memfd):
    os.write(memfd, b"left over")
    image = Counting(3)
    with pytest.raises(InvalidArgument, match=f"PD 5: fd {memfd} already holds 9 bytes"):
        measure_into(image, memfd, pd_id=5)
    assert image.calls == 0 and _contents(memfd) == b"left over"


@pytest.mark.parametrize("kind", ["bytes", "file"])
def test_sealed_memfd_is_refused_without_a_digest(kind, memfd, tmp_path):
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW)
    data = os.urandom(CHUNK * 2)
    image = BytesImage(data) if kind == "bytes" else _file_image(tmp_path, data)
    tasks = _tasks()
    with pytest.raises(InvalidArgument, match="PD 4: .*Operation not permitted"):
        measure_into(image, memfd, pd_id=4)
    assert _tasks_back_to(tasks) == tasks


# --- misbehaving images --------------------------------------------------------------------

class Bad:
    """A PDImage that misbehaves in one chosen way, after `good` well-behaved chunks."""

    def __init__(self, how: str, size: int = 4 * CHUNK, good: int = 2):
        self.how, self.size, self.good, self.calls = how, size, good, 0

    def get_image_size(self):
        if self.how == "size-raises":
            raise OSError("disk gone")
        return {"size-str": "12", "size-float": 12.0, "size-bool": True, "size-neg": -1,
                "size-zero": 0}.get(self.how, self.size)

    def get_data(self, offset, length):
        self.calls += 1
        if self.calls <= self.good:
            return b"z" * length
        if self.how == "raises":
            raise RuntimeError("backend fell over")
        return {"str": "text", "none": None, "int": 5, "too-long": b"z" * (length + 1),
                "empty": b""}[self.how]


@pytest.mark.parametrize("how, match", [
    ("size-raises", r"get_image_size\(\) raised OSError\('disk gone'\)"),
    ("size-str", "get_image_size.. returned str, not int"),
    ("size-float", "returned float, not int"),
    ("size-bool", "returned bool, not int"),
    ("size-neg", r"returned -1 < 0"),
    ("size-zero", "empty image"),
    ("raises", rf"get_data\({2 * CHUNK}, {CHUNK}\) raised RuntimeError\('backend fell over'\)"),
    ("str", "returned str, not bytes"),
    ("none", "returned NoneType, not bytes"),
    ("int", "returned int, not bytes"),
    ("too-long", f"returned {CHUNK + 1} bytes, more than asked"),
    ("empty", f"returned no data at offset {2 * CHUNK}"),
])
def test_misbehaving_image_gets_a_typed_error_and_leaves_nothing(how, match, memfd):
    tasks, fds = _tasks(), sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(ImageError, match=f"PD 9: .*{match}") as err:
        measure_into(Bad(how), memfd, banks=SUPPORTED_BANKS, pd_id=9)
    assert err.value.pd_id == 9
    if how.endswith("raises"):
        assert err.value.__cause__ is not None
    assert _tasks_back_to(tasks) == tasks and threading.active_count() >= 1
    assert sorted(os.listdir("/proc/self/fd")) == fds


def test_zero_length_reads_are_retried_a_few_times(memfd):
    class Flaky:
        calls = 0

        def get_image_size(self):
            return 100

        def get_data(self, offset, length):
            self.calls += 1
            return b"" if self.calls % 3 else b"q" * length

    assert measure_into(Flaky(), memfd)["sha256"] == hashlib.sha256(b"q" * 100).digest()


def test_failing_progress_aborts_as_invalid_argument(memfd):
    def boom(done, total):
        if done >= 2 * CHUNK:
            raise KeyError("stop")

    tasks = _tasks()
    with pytest.raises(InvalidArgument, match=f"progress callback raised KeyError.'stop'. at {2 * CHUNK}/") as err:
        measure_into(BytesImage(b"p" * 5 * CHUNK), memfd, progress=boom)
    assert isinstance(err.value.__cause__, KeyError)
    assert _tasks_back_to(tasks) == tasks


def test_keyboard_interrupt_from_progress_passes_through(memfd):
    def interrupt(done, total):
        raise KeyboardInterrupt

    tasks = _tasks()
    with pytest.raises(KeyboardInterrupt):
        measure_into(BytesImage(b"p" * 3 * CHUNK), memfd, progress=interrupt)
    assert _tasks_back_to(tasks) == tasks


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_file_changing_size_mid_way(change, memfd, tmp_path):
    image = _file_image(tmp_path, os.urandom(3 * FILE_STEP))

    def meddle(done, total):
        if done == FILE_STEP:
            with open(image.path, "r+b") as f:
                f.truncate(FILE_STEP + CHUNK) if change == "shrink" else (f.seek(0, 2), f.write(b"more"))

    tasks = _tasks()
    with pytest.raises(ImageError, match="shrank while being loaded" if change == "shrink"
                       else "changed size while being loaded"):
        measure_into(image, memfd, progress=meddle, pd_id=2)
    assert _tasks_back_to(tasks) == tasks


def test_gil_is_released_while_a_file_is_hashed(memfd, tmp_path):
    image = _file_image(tmp_path, os.urandom(64 << 20))
    result: dict[str, bytes] = {}
    worker = threading.Thread(target=lambda: result.update(measure_into(image, memfd)))
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.monotonic())
    worker.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # A held GIL stalls this loop for the whole C call: one gap as long as the
    # call.  Relative to the call's length, so a loaded 2-core CI host (where
    # the scheduler alone makes 25 ms gaps) does not fail it.
    total = ticks[-1] - ticks[0]
    assert len(ticks) > 1000 and max(gaps) < total / 3, (len(ticks), max(gaps), total)
    assert result["sha256"] == hashlib.sha256(_contents(memfd)).digest()


def test_hash_file_is_plain_evp(tmp_path):
    data = os.urandom(9 * CHUNK + 1)
    p = _file_image(tmp_path, data).path
    for bank in SUPPORTED_BANKS:
        assert hash_file(p, bank) == hashlib.new(bank, data).digest()
    with pytest.raises(InvalidArgument):
        hash_file(p, "md5")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "generic"])
def test_one_gib(kind):
    path = f"/tmp/bmi-measure-test-{os.getpid()}.img"
    block = os.urandom(CHUNK)
    try:
        with open(path, "wb") as f:
            for i in range(1024):
                f.write(block[i:] + block[:i])
        with open(path, "rb") as f:
            want = hashlib.file_digest(f, "sha256").digest()

        class Generic:
            def get_image_size(self):
                return os.path.getsize(path)

            def get_data(self, offset, length):
                with open(path, "rb") as f:
                    f.seek(offset)
                    return f.read(length)

        fd = os.memfd_create("bmi-1gib")
        try:
            got = measure_into(FileImage(path) if kind == "file" else Generic(), fd, banks=("sha384",))
            assert got["sha256"] == want and os.fstat(fd).st_size == 1 << 30
            with open(f"/proc/self/fd/{fd}", "rb") as copy:
                assert hashlib.file_digest(copy, "sha384").digest() == got["sha384"]
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


# -- one copy and one hash per image in system mode: FdImage, copy_into, handover_fd --------------------

def test_an_fd_image_is_read_by_c_and_hashed_once(memfd, tmp_path, monkeypatch):
    data = os.urandom(3 * CHUNK + 5)
    image = _file_image(tmp_path, data)
    fd = os.open(image.path, os.O_RDONLY)
    try:
        pulled = []
        monkeypatch.setattr(FdImage, "get_data", lambda self, o, n: pulled.append(o) or b"")
        assert measure_into(FdImage(fd), memfd, banks=SUPPORTED_BANKS) == _expect(data)
    finally:
        os.close(fd)
    assert pulled == [] and _contents(memfd) == data       # C pread the file: no Python call per chunk


@pytest.mark.parametrize("kind", ["pipe", "write-only", "directory"])
def test_an_fd_image_that_is_no_readable_file_is_an_image_error(kind, memfd, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\x7fELF" * 100)
    if kind == "pipe":
        fd, w = os.pipe()
        os.write(w, b"x" * 100)
        os.close(w)
    else:
        fd = os.open(tmp_path if kind == "directory" else path, os.O_RDONLY if kind == "directory" else os.O_WRONLY)
    try:
        image = FdImage(fd)
        image._size = 400                   # what a lying fstat would give: the copy still refuses
        with pytest.raises(ImageError, match="regular file|not open for reading"):
            measure_into(image, memfd, pd_id=4)
    finally:
        os.close(fd)
    assert _contents(memfd) == b""


def test_copy_into_copies_without_hashing(memfd):
    data = os.urandom(2 * CHUNK + 3)
    copy_into(BytesImage(data), memfd)
    assert _contents(memfd) == data


def test_handover_of_a_file_image_is_its_own_file_read_only(tmp_path):
    data = os.urandom(CHUNK + 1)
    image = _file_image(tmp_path, data)
    calls = []
    fd = handover_fd(image, progress=lambda d, t: calls.append((d, t)), pd_id=3)
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(image.path))      # no copy
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)
    assert calls == [(len(data), len(data))]


def test_handover_of_another_image_is_a_memfd_copy(memfd):
    data = os.urandom(CHUNK + 9)
    fd = handover_fd(ShortReads(data, [4096]))
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:") and _contents(fd) == data
    finally:
        os.close(fd)
    with pytest.raises(ImageError, match="PD 5"):
        handover_fd(BytesImage(b""), pd_id=5)


def test_the_banks_are_the_c_headers_and_the_tpm_knows_each():
    """One list of banks: the digest fields of csrc/measure/measure.h, read through the shim's cdef; each is a
    TPM hash algorithm the verifier's wire code knows, with the digest size the header reserves."""
    import re
    from pathlib import Path

    from bmi.integrity import wire

    header = (Path(__file__).resolve().parents[2] / "csrc" / "measure" / "measure.h").read_text()
    fields = re.search(r"struct bmi_meas_digests \{\s*unsigned char ([^;]+);", header).group(1)
    declared = re.findall(r"(\w+)\[(\d+)\]", fields)
    assert SUPPORTED_BANKS == tuple(name for name, _ in declared)
    for name, size in declared:
        assert hashlib.new(name).digest_size == int(size)
        assert name in wire.ALG_IDS and wire.crypto_hash(name).digest_size == int(size)
