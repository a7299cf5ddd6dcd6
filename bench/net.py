"""Start-up cost of a PD with one veth interface, against bubblewrap and by hand, alternating in one process.

bmi+veth: allocate_pd + setup_pd (1 MiB static binary, measured) + RUNNING with
          /net/eth0 = veth:BRIDGE and an address, to exit and destroy.
bwrap:    `bwrap --unshare-all` (no network at all) with the same binary, to exit.
by hand:  `unshare -n` running the same binary, which waits until the parent has
          made a veth pair into its namespace (`ip link add ... netns PID`), put
          the host end on the bridge and set address and link inside
          (`nsenter --net ip -batch`), then exits.
The whole run happens in a network namespace of its own (the script re-runs
itself under `unshare --net`): the bridge and every veth live only there.
Needs root.  Prints the medians and the ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bmi  # noqa: E402
from bmi.drivers import net  # noqa: E402
from spawn import build_binary  # noqa: E402  (bench/spawn.py, next to this file)

# reads one byte of stdin (EOF at once under bmi and bwrap), then exits: the hand-made run's release
SOURCE = ("#include <unistd.h>\nstatic char pad[1 << 20] = {1};\n"
          "int main(void) { char c; (void)!read(0, &c, 1); return pad[0] - 1; }\n")
BRIDGE, SUBNET = "bmibench0", "10.213.9.0/24"
WARM_UP = 3


def bmi_once(mgr: bmi.PDManagement, path: str) -> float:
    t0 = time.perf_counter()
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    pd.setup_pd(bmi.FileImage(path))
    pd.set_config_param("/net/eth0", f"veth:{BRIDGE}")
    pd.set_config_param("/net/eth0/address", "10.213.9.2/24")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    status = pd.wait(10)
    pd.destroy()
    assert status is bmi.PDStatus.SHUTDOWN, status
    return time.perf_counter() - t0


def bwrap_once(bwrap: str, path: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([bwrap, "--unshare-all", "--die-with-parent", "--tmpfs", "/", "--proc", "/proc",
                    "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", path, "/prog", "/prog"], check=True,
                   stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def by_hand_once(ip: str, path: str) -> float:
    t0 = time.perf_counter()
    child = subprocess.Popen(["unshare", "--net", "--", path], stdin=subprocess.PIPE)
    host = f"bmihand{child.pid % 100000}"
    # the namespace exists once unshare has exec'd the program (its ns link differs from ours)
    ours = os.readlink("/proc/self/ns/net")
    while os.readlink(f"/proc/{child.pid}/ns/net") == ours:
        time.sleep(0.0001)
    subprocess.run([ip, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", str(child.pid)],
                   check=True)
    subprocess.run([ip, "link", "set", host, "master", BRIDGE, "up"], check=True)
    subprocess.run(["nsenter", f"--net=/proc/{child.pid}/ns/net", "--", ip, "-batch", "-"], check=True, text=True,
                   input="link set lo up\naddr add 10.213.9.3/24 dev eth0\nlink set eth0 up\n")
    child.stdin.close()
    assert child.wait(10) == 0
    subprocess.run([ip, "link", "del", host], capture_output=True)     # gone with the namespace already
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--rounds", type=int, default=30)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/net.py needs root (network namespaces, veth, bridge)")
        return 0
    if os.environ.get("BMI_BENCH_NETNS") != "1":    # into a network namespace of our own, then run there
        env = dict(os.environ, BMI_BENCH_NETNS="1")
        return subprocess.run(["unshare", "--net", "--", sys.executable, *sys.argv], env=env).returncode
    ip = shutil.which("ip") or "/usr/sbin/ip"
    bwrap = shutil.which("bwrap")
    net.create_bridge(BRIDGE, SUBNET)
    with tempfile.TemporaryDirectory() as tmp, bmi.open(integrity=False) as mgr:
        path = build_binary(tmp, SOURCE)
        runners = {"bmi with one veth (to exit+destroy)": lambda: bmi_once(mgr, path),
                   "unshare -n + veth by hand (to exit)": lambda: by_hand_once(ip, path)}
        if bwrap:
            runners["bwrap --unshare-all, no network (to exit)"] = lambda: bwrap_once(bwrap, path)
        times: dict[str, list[float]] = {label: [] for label in runners}
        for turn in range(WARM_UP + args.rounds):     # alternating, so load changes hit every side alike
            for label, run in runners.items():
                took = run()
                if turn >= WARM_UP:
                    times[label].append(took)
    medians = {label: statistics.median(t) * 1000 for label, t in times.items()}
    print(f"rounds: {args.rounds}, image: 1 MiB static ELF, in a network namespace of its own")
    for label, median in medians.items():
        print(f"{label:<42} median {median:7.2f} ms")
    ours, *others = medians
    for label in others:
        print(f"ratio bmi-veth / {label.split(' (')[0]}: {medians[ours] / medians[label]:.2f}")
    if not bwrap:
        print("bwrap not installed: no ratio against it (apt-get install bubblewrap)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
