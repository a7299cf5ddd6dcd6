"""libbmi's cost: one bmi_get_current_status from C against the same call from Python (session mode).

    .venv/bin/python bench/embed.py [--calls 2000] [--runs 5]

Compiles bench/embed.c with `python -m bmi.embed --cflags --libs` and runs
it; prints the medians per call, their C/Python ratio (goal: <= 2x: the C
call is the Python call plus cffi's entry and the argument checks) and the
one-time cost of the first call, which starts the embedded interpreter.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bmi  # noqa: E402


def python_call(calls: int) -> float:
    """Median microseconds of pd.get_current_status() in this process."""
    with bmi.open("linux:///session", integrity=False) as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            pd.get_current_status()
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    flags = subprocess.run([sys.executable, "-m", "bmi.embed", "--cflags", "--libs"], capture_output=True,
                           text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "embed")
        subprocess.run(["cc", "-O2", os.path.join(ROOT, "bench", "embed.c"), *flags, "-o", exe], check=True)
        firsts, c_calls, py_calls = [], [], []
        for _ in range(args.runs):
            out = subprocess.run([exe, str(args.calls)], capture_output=True, text=True, check=True,
                                 env={"PATH": "/usr/bin:/bin", "HOME": tmp}).stdout.split()
            firsts.append(float(out[0]))
            c_calls.append(float(out[1]))
            py_calls.append(python_call(args.calls))
    c, py = statistics.median(c_calls), statistics.median(py_calls)
    print(f"bmi_get_current_status from C:      {c:8.2f} us (median of {args.runs} runs x {args.calls} calls)")
    print(f"pd.get_current_status() from Python: {py:8.2f} us")
    print(f"ratio C/Python:                      {c / py:8.2f}x (goal <= 2x)")
    print(f"first call (interpreter start):      {statistics.median(firsts) / 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
