"""Benchmark of the measurement hot path (issue 3) against the in-process SHA-256 ceiling.

For one image file in /tmp (1 GiB by default), alternating in one process:
the EVP ceiling (hash the file's pages, no copy), hashlib.file_digest, and
measure_into of a FileImage, of a generic PDImage, and of a FileImage with
SHA-256+SHA-384.  Prints the median throughput, the ratio to its ceiling and
the CPU seconds per GiB of all threads (the copy-and-hash pipeline needs
more than one core; on a busy machine that shows as a lower ratio), and
the largest RSS growth seen during a run (anonymous + file pages; the
memfd's own shmem pages aside).  `openssl speed` is the external anchor.

    .venv/bin/python bench/measure.py [--size-mib 1024] [--rounds 3]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
from typing import Callable

from bmi.image import FileImage
from bmi.integrity.measure import hash_file, measure_into


class PreadImage:
    """A generic PDImage over a file: every chunk goes through Python's get_data."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size

    def get_image_size(self) -> int:
        return self.size

    def get_data(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        os.close(self.fd)


def _rss() -> int:
    """Anonymous + file-backed resident bytes (shmem, i.e. memfd pages, left out)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                fields[line.split(":")[0]] = int(line.split()[1]) * 1024
    return fields["RssAnon"] + fields["RssFile"]


def _timed(job: Callable[[], object]) -> tuple[float, float, int]:
    """Run job; return wall seconds, CPU seconds of all threads, and the peak RSS growth (sampled every 5 ms)."""
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss() - base)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t, cpu = time.perf_counter(), time.process_time()
    job()
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    stop.set()
    sampler.join()
    return dt, cpu, max(peak[0], _rss() - base)


class _IntoMemfd:
    """measure_into a fresh memfd; closing it (freeing its pages) is not part of the timing."""

    def __init__(self, make_image: Callable[[], object], banks: tuple[str, ...]):
        self.make_image, self.banks, self.fd = make_image, banks, -1

    def __call__(self) -> dict:
        self.fd = os.memfd_create("bench", os.MFD_CLOEXEC)
        return measure_into(self.make_image(), self.fd, banks=self.banks)

    def close(self) -> None:
        os.close(self.fd)


def _file_digest(path: str) -> Callable[[], bytes]:
    def job() -> bytes:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    return job


def _openssl() -> str:
    if not shutil.which("openssl"):
        return "openssl not installed"
    out = subprocess.run(["openssl", "speed", "-seconds", "3", "-bytes", "1048576", "sha256"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"^sha256\s+([\d.]+)k", out, re.M)
    return f"{float(m.group(1)) * 1e3 / 1e9:.3f} GB/s" if m else "unparsed: " + out.strip()[-200:]


def _make_image(path: str, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(block[i % 4096:] + block[:i % 4096])
        os.fsync(f.fileno())    # no writeback competing with the runs
    hash_file(path)             # and all of it in the page cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = f"/tmp/bmi-bench-measure-{os.getpid()}.img"
    size = args.size_mib << 20
    _make_image(path, size)
    generic = PreadImage(path)
    cases: dict[str, Callable[[], object]] = {
        "ceiling: EVP sha256, no copy": lambda: hash_file(path, "sha256"),
        "ceiling: EVP sha384, no copy": lambda: hash_file(path, "sha384"),
        "hashlib.file_digest sha256": _file_digest(path),
        "measure_into FileImage sha256": _IntoMemfd(lambda: FileImage(path), ("sha256",)),
        "measure_into generic PDImage sha256": _IntoMemfd(lambda: generic, ("sha256",)),
        "measure_into FileImage sha256+sha384": _IntoMemfd(lambda: FileImage(path), ("sha256", "sha384")),
    }
    against = {name: "ceiling: EVP sha384, no copy" if "sha384" in name else "ceiling: EVP sha256, no copy"
               for name in cases}
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    growth: dict[str, int] = dict.fromkeys(cases, 0)
    try:
        print(f"image {size >> 20} MiB in {path}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        print(f"openssl speed -bytes 1048576 sha256 (one core): {_openssl()}")
        for _ in range(args.rounds):
            for name, job in cases.items():
                dt, cpu, grew = _timed(job)
                if isinstance(job, _IntoMemfd):
                    job.close()
                times[name].append(dt)
                cpus[name].append(cpu)
                growth[name] = max(growth[name], grew)
        speed = {name: size / statistics.median(ts) / 1e9 for name, ts in times.items()}
        print(f"{'case':40s} {'GB/s':>7s} {'ratio':>6s}  {'vs':12s} {'CPU s/GiB':>9s} {'RSS growth':>10s}")
        for name in cases:
            ref = against[name]
            tag = "-" if ref == name else ref.split(":")[1].split(",")[0].strip()
            cpu = statistics.median(cpus[name]) * (1 << 30) / size
            print(f"{name:40s} {speed[name]:7.3f} {speed[name] / speed[ref]:6.3f}  {tag:12s} {cpu:9.2f} "
                  f"{growth[name] / (1 << 20):6.1f} MiB")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        generic.close()
        os.unlink(path)


if __name__ == "__main__":
    main()
