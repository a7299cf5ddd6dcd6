"""linux+ssh:// against linux:///system: per-call cost and a 64 MiB setup_pd through ssh vs bmid's local socket.

    .venv/bin/python bench/remote.py [--image-mib 64] [--calls 1000]

Starts a bmid and an sshd of its own on 127.0.0.1 (as tests/remote does:
a host key, a client key and a config of its own, the system's ssh service
untouched), so "remote" is this machine through a real ssh session: the
numbers are the cost of the transport (ssh's encryption, the helper's
framing, the stream of the image), not of a network.  Prints medians and
the ssh/local ratio, and what one bmi.open() through ssh costs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bmi  # noqa: E402
from bench.system import per_call, setup_pair  # noqa: E402
from tests.remote.sshd import Sshd  # noqa: E402
from tests.server.bmid import Bmid  # noqa: E402


def open_ms(uri: str, rounds: int = 5) -> float:
    """Median milliseconds of bmi.open(uri) + one call + close (an ssh login and the helper's start)."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        with bmi.open(uri) as mgr:
            mgr.get_version()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-mib", type=int, default=64, help="setup_pd image size (0: skip)")
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Bmid(tmp).start()
        sshd = Sshd(tmp)
        try:
            sshd.start()
            uri = sshd.uri(socket=daemon.socket)
            print(f"bmi.open + get_version + close through ssh: {open_ms(uri):.0f} ms")
            with daemon.open() as local, bmi.open(uri) as remote:
                a, b = per_call(local, args.calls), per_call(remote, args.calls)
                print(f"per call (median of {args.calls}, us)      local       ssh   ratio")
                for name in a:
                    print(f"  {name:<32} {a[name]:9.1f} {b[name]:9.1f} {b[name] / a[name]:7.1f}x")
                if args.image_mib:
                    l_ms, s_ms = setup_pair(local, remote, args.image_mib, tmp)
                    print(f"setup_pd {args.image_mib} MiB FileImage: local {l_ms:.0f} ms, ssh {s_ms:.0f} ms, "
                          f"ratio {s_ms / l_ms:.2f}x ({args.image_mib / (s_ms / 1e3):.0f} MiB/s through ssh)")
        finally:
            sshd.close()
            daemon.close()


if __name__ == "__main__":
    main()
