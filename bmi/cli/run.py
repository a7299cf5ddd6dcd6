"""`bmi info`, `bmi run`, `bmi bundle`, `bmi allow`, `bmi connections`: the commands that measure and run
a PD in one go, and inspect or open its connections."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Callable

from ..clientlib import pd_client_dir
from ..errors import NotSupported
from ..text import printable
from ..types import ConnectionPolicy, ConnectionType, PDStatus
from ..uri import open as bmi_open
from .common import (add_pd_options, connection_rows, held_interrupts, parse_hex, prepare_pd, progress, resolve,
                     start_pd)

EPILOG_RUN = """\
examples:
  bmi run /bin/busybox -- busybox sh -c 'echo hello from $(hostname); ip link'
  bmi run --mem 32M --cpus 1 --performance 50 ./static-prog -- prog --flag
  bmi bundle /usr/bin/python3 -o py.cpio && bmi run py.cpio -- python3 -c 'print(1)'
  bmi tpm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ak_fingerprint"])'  # enrol the AK
  bmi run --attest --nonce 0011 --attest-out report.json ./static-prog
  bmi verify report.json --nonce 0011 --expect-image ./static-prog --ak sha256:<enrolled fingerprint>
"""


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        print(f"{key:<{width}}  {printable(str(value))}")


def cmd_info(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        info = mgr.layer_info()
    try:
        info["pd_client_dir"] = str(pd_client_dir())
    except NotSupported as e:
        info["pd_client_dir"] = f"none ({e})"
    _print(info, args.json)
    return 0


def _exit_code(status: PDStatus, exit_status: str | None, reason: str) -> int:
    if status is PDStatus.SHUTDOWN and exit_status is not None:
        return int(exit_status)
    if reason == "oom":
        return 128 + signal.SIGKILL
    for sig in signal.Signals:
        if sig.name in reason:
            return 128 + sig.value
    return 1


def _start_and_stream(pd: Any, args: argparse.Namespace, check: Callable[[], None]) -> None:
    """Start the PD (attest it when asked) and copy its console to stdout until it ends."""
    start_pd(pd, args, check)
    if args.attest:
        nonce = bytes.fromhex(args.nonce) if args.nonce is not None else os.urandom(32)
        report = pd.get_integrity_link(nonce)
        if args.attest_out:
            with open(args.attest_out, "w") as f:
                f.write(report.to_json() + "\n")
        else:
            print(report.to_json(), file=sys.stderr, flush=True)
    offset = 0
    while True:
        check()
        offset, data = pd.read_console(offset, timeout=0.5)
        if data:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        if pd.get_current_status() not in (PDStatus.RUNNING, PDStatus.PAUSED) and not data:
            offset, data = pd.read_console(offset, timeout=2.0)
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.args[1:] if args.args[:1] == ["--"] else args.args
    with bmi_open(args.uri, integrity=args.attest) as mgr, held_interrupts() as check:
        pd = prepare_pd(mgr, args, argv or [os.path.basename(args.image)], check)
        pid = pd.get_pd_id()
        measurement = pd.measurement()
        for bank, digest in measurement.items():
            print(f"bmi: PD {pid} measured {bank}:{digest.hex()}", file=sys.stderr)
        try:
            _start_and_stream(pd, args, check)
        except (KeyboardInterrupt, BrokenPipeError):
            pd.destroy()        # Ctrl-C or a closed pipe ends the PD, in bmid as in session mode
            raise
        status = pd.get_current_status()
        params = {c.name for c in pd.list_runtime_params("/system")}
        exit_status = pd.get_runtime_param("/system/exit-status") if "/system/exit-status" in params else None
        reason = pd.get_runtime_param("/system/exit-reason")
        summary = {"pd": pid, "status": status.name, "exit_status": exit_status, "reason": reason,
                   "measurement": {b: d.hex() for b, d in measurement.items()}}
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        else:
            print(f"bmi: PD {pid} {status.name}: {printable(str(reason))}", file=sys.stderr)
        return _exit_code(status, exit_status, reason)


def cmd_bundle(args: argparse.Namespace) -> int:
    from ..drivers.linux.bundle import bundle
    tmp = args.output + ".tmp"
    try:
        with open(tmp, "wb") as out, progress(args, None, "bundling") as update:
            paths = bundle(args.executable, out, extra=args.add, progress=update)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if args.json:
        print(json.dumps({"output": args.output, "files": paths}))
    else:
        print(f"bmi: wrote {args.output}: {len(paths)} paths, /init -> {os.path.abspath(args.executable)}",
              file=sys.stderr)
    return 0


_MODES = {"r": 1, "read": 1, "w": 2, "write": 2, "rw": 3, "wr": 3}


def parse_mode(text: str) -> int:
    """'r', 'w', 'rw' (or read/write) -> bmi.READ/WRITE/RW."""
    try:
        return _MODES[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mode: r, w or rw") from None


def cmd_allow(args: argparse.Namespace) -> int:
    policies = [ConnectionPolicy(ConnectionType[t.upper()], args.mode) for t in args.type]
    with bmi_open(args.uri, integrity=False) as mgr:
        src, dst = resolve(mgr, args.src), resolve(mgr, args.dst).get_pd_id()
        src.set_allowed_connections(dst, policies, args.disable_existing)
        now = src.get_allowed_connections(dst)
    if args.json:
        print(json.dumps({"pd": src.get_pd_id(), "towards": dst,
                          "allowed": [{"type": p.con_type.name, "mode": _mode_text(p.mode)} for p in now]}))
        return 0
    names = ", ".join(f"{p.con_type.name} {_mode_text(p.mode)}" for p in now) or "nothing"
    print(f"bmi: PD {src.get_pd_id()} may now open towards PD {dst}: {names}", file=sys.stderr)
    return 0


def _mode_text(mode: int) -> str:
    return {1: "r", 2: "w", 3: "rw"}[mode]


def cmd_connections(args: argparse.Namespace) -> int:
    with bmi_open(args.uri, integrity=False) as mgr:
        text = resolve(mgr, args.pd).get_runtime_param("/interfaces/connections")
    rows = connection_rows(text)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'CONN':>4}  {'DIR':<4} {'PEER':<8} {'TYPE':<6} {'MODE':<5}")
    for r in rows:
        print(f"{r['conn']:>4}  {r['direction']:<4} PD {r['peer']:<5} {r['type']:<6} {r['mode']:<5}"
              f"{' pending' if r['pending'] else ''}")
    return 0



def register(sub: Any) -> None:
    """Add these commands to the `bmi` parser."""
    info = sub.add_parser("info", help="what the layer is and can do (driver, cgroups, namespaces, TPM)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    run = sub.add_parser("run", help="measure and run an image as a PD, streaming its console",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_RUN,
                         description="Allocate a PD, measure IMAGE into it (SHA-256 printed on stderr), start "
                                     "it, stream its console, and exit with its status. Ctrl-C destroys it.")
    run.add_argument("image", metavar="IMAGE", help="a static ELF, or a newc cpio root with /init (bmi bundle)")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                     help="the PD's argv (argv[0] first); default: the image's file name")
    add_pd_options(run)
    run.add_argument("--attest", action="store_true", help="print an integrity report (JSON) on stderr")
    run.add_argument("--nonce", type=parse_hex, help="hex nonce for --attest (default: 32 random bytes)")
    run.add_argument("--attest-out", metavar="FILE", help="write the --attest report to FILE instead of stderr")
    run.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    run.set_defaults(func=cmd_run)

    bundle = sub.add_parser("bundle", help="make a root archive so a dynamically linked program can run as a PD",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="example:\n  bmi bundle /bin/sh --add /bin/ls --add /etc/passwd -o root.cpio\n"
                                   "  bmi run root.cpio -- sh -c 'ls -l /'")
    bundle.add_argument("executable", metavar="EXE", help="the program; /init points at it")
    bundle.add_argument("--add", action="append", default=[], metavar="PATH",
                        help="also include PATH (file or directory, at the same path; repeatable)")
    bundle.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive to write")
    bundle.add_argument("--json", action="store_true", help="list the archived paths as JSON")
    bundle.set_defaults(func=cmd_bundle)

    allow = sub.add_parser("allow", help="let PD SRC open connections to PD DST (spec set_allowed_connections)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="examples:\n  bmi allow 1 2 --type ipc --mode rw\n"
                                  "  bmi allow 1 2 --type shm --type event --mode r --disable-existing\n"
                                  "  bmi allow 1 2 --disable-existing     # withdraw everything, cut live ones")
    allow.add_argument("src", metavar="SRC", help="the PD that opens the connections (id or name)")
    allow.add_argument("dst", metavar="DST", help="the PD it may connect to (id or name)")
    allow.add_argument("--type", action="append", default=[], choices=["ipc", "stream", "shm", "event"],
                       help="connection type (repeatable); none: allow nothing")
    allow.add_argument("--mode", type=parse_mode, default=3, help="r, w or rw, seen from SRC (default rw)")
    allow.add_argument("--disable-existing", action="store_true",
                       help="cut live connections the new policy no longer allows")
    allow.add_argument("--json", action="store_true", help="print the policy now in force as JSON")
    allow.set_defaults(func=cmd_allow)

    conns = sub.add_parser("connections", help="the live connections of a PD (/interfaces/connections)")
    conns.add_argument("pd", metavar="PD", help="id or name")
    conns.add_argument("--json", action="store_true", help="machine-readable output")
    conns.set_defaults(func=cmd_connections)

