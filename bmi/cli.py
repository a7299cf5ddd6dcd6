"""The `bmi` command: run measured, isolated PDs and inspect the layer.

Human output by default, `--json` for scripts.  Exit status of `bmi run` is
the PD's: its exit status, 128+N when killed by signal N (137 for oom).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from typing import Any, Sequence

from . import FileImage, PDDescription, PDStatus, errors
from .uri import open as bmi_open

PROGRESS_THRESHOLD = 64 * 1024 * 1024
EPILOG_RUN = """\
examples:
  bmi run /bin/busybox -- busybox sh -c 'echo hello from $(hostname); ip link'
  bmi run --mem 32M --cpus 1 --performance 50 ./static-prog -- prog --flag
  bmi bundle /usr/bin/python3 -o py.cpio && bmi run py.cpio -- python3 -c 'print(1)'
  bmi tpm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ak_fingerprint"])'  # enrol the AK
  bmi run --attest --nonce 0011 --attest-out report.json ./static-prog
  bmi verify report.json --nonce 0011 --expect-image ./static-prog --ak sha256:<enrolled fingerprint>
"""


def parse_size(text: str) -> int:
    """'64M' -> 67108864; plain numbers are bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64M or 1G") from None


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
        print(f"{key:<{width}}  {value}")


def cmd_info(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        _print(mgr.layer_info(), args.json)
    return 0


def _progress_bar(total: int):
    if total < PROGRESS_THRESHOLD or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="measuring", file=sys.stderr)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return bar, update


def _exit_code(status: PDStatus, exit_status: str | None, reason: str) -> int:
    if status is PDStatus.SHUTDOWN and exit_status is not None:
        return int(exit_status)
    if reason == "oom":
        return 128 + signal.SIGKILL
    for sig in signal.Signals:
        if sig.name in reason:
            return 128 + sig.value
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    image = FileImage(args.image)
    argv = args.args[1:] if args.args[:1] == ["--"] else args.args
    cmdline = shlex.join(argv or [os.path.basename(args.image)])
    banks = [b.strip() for b in args.banks.split(",") if b.strip()]
    with bmi_open(args.uri, integrity=args.attest) as mgr:
        pd = mgr.allocate_pd(PDDescription(mem=args.mem, cpu=args.cpus, performance=args.performance))
        pid = pd.get_pd_id()
        bar, update = _progress_bar(image.get_image_size())
        try:
            pd.setup_pd(image, banks=banks, progress=update)
        finally:
            if bar is not None:
                bar.close()
        measurement = pd.measurement()
        for bank, digest in measurement.items():
            print(f"bmi: PD {pid} measured {bank}:{digest.hex()}", file=sys.stderr)
        pd.set_priority(args.priority)
        pd.set_config_param("/boot/cmdline", cmdline)
        for item in args.env:
            name, _, value = item.partition("=")
            pd.set_config_param(f"/boot/env/{name}", value)
        if args.caps:
            pd.set_config_param("/boot/capabilities", args.caps)
        if args.allow:
            pd.set_config_param("/boot/allow", args.allow)
        pd.request_status_change(PDStatus.RUNNING)
        if args.attest:
            nonce = bytes.fromhex(args.nonce) if args.nonce else os.urandom(32)
            report = pd.get_integrity_link(nonce)
            if args.attest_out:
                with open(args.attest_out, "w") as f:
                    f.write(report.to_json() + "\n")
            else:
                print(report.to_json(), file=sys.stderr, flush=True)
        try:
            offset = 0
            while True:
                offset, data = pd.read_console(offset, timeout=0.5)
                if data:
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
                if pd.get_current_status() not in (PDStatus.RUNNING, PDStatus.PAUSED) and not data:
                    offset, data = pd.read_console(offset, timeout=2.0)
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
                    break
        except KeyboardInterrupt:
            print(f"\nbmi: interrupted; destroying PD {pid}", file=sys.stderr)
            pd.destroy()
            return 130
        status = pd.get_current_status()
        params = {c.name for c in pd.list_runtime_params("/system")}
        exit_status = pd.get_runtime_param("/system/exit-status") if "/system/exit-status" in params else None
        reason = pd.get_runtime_param("/system/exit-reason")
        summary = {"pd": pid, "status": status.name, "exit_status": exit_status, "reason": reason,
                   "measurement": {b: d.hex() for b, d in measurement.items()}}
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        else:
            print(f"bmi: PD {pid} {status.name}: {reason}", file=sys.stderr)
        return _exit_code(status, exit_status, reason)


def cmd_bundle(args: argparse.Namespace) -> int:
    from .drivers.linux.bundle import bundle
    tmp = args.output + ".tmp"
    try:
        with open(tmp, "wb") as out:
            paths = bundle(args.executable, out, extra=args.add)
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
    from .types import ConnectionPolicy, ConnectionType
    policies = [ConnectionPolicy(ConnectionType[t.upper()], args.mode) for t in args.type]
    from .server.cli import resolve
    with bmi_open(args.uri, integrity=False) as mgr:
        src, dst = resolve(mgr, args.src), resolve(mgr, args.dst).get_pd_id()
        src.set_allowed_connections(dst, policies, args.disable_existing)
        now = src.get_allowed_connections(dst)
    names = ", ".join(f"{p.con_type.name} {_mode_text(p.mode)}" for p in now) or "nothing"
    print(f"bmi: PD {src.get_pd_id()} may now open towards PD {dst}: {names}", file=sys.stderr)
    return 0


def _mode_text(mode: int) -> str:
    return {1: "r", 2: "w", 3: "rw"}[mode]


def cmd_connections(args: argparse.Namespace) -> int:
    from .server.cli import resolve
    with bmi_open(args.uri, integrity=False) as mgr:
        text = resolve(mgr, args.pd).get_runtime_param("/interfaces/connections")
    rows = [line.split() for line in text.splitlines()]
    if args.json:
        print(json.dumps([{"conn": int(r[0]), "direction": r[1], "peer": int(r[2]), "type": r[3], "mode": r[4],
                           "pending": r[-1] == "pending"} for r in rows]))
    else:
        for r in rows:
            print(f"{r[0]:>4}  {r[1]:<4} PD {r[2]:<5} {' '.join(r[3:])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmi", description="Create, measure, run and attest isolated protection domains (OpenTC BMI v0.1).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="URIs: linux:///session (default, in-process), linux:///system (bmid), xen:///system\n"
               "(bmid --uri xen:///system), xen:///session (in-process), pd:///. Set BMI_URI or --uri.\n"
               "Run `bmi COMMAND --help` for examples.")
    parser.add_argument("--uri", default=None, help="connection URI (default: $BMI_URI or linux:///session)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    run.add_argument("--mem", type=parse_size, default=64 << 20, help="hard memory limit (default 64M)")
    run.add_argument("--cpus", type=int, default=1, help="number of CPUs (clamped to the host; default 1)")
    run.add_argument("--performance", type=int, default=100, help="share of those CPUs in percent (1-100)")
    run.add_argument("--priority", type=int, default=0, help="-10..+10 (nice and CPU weight; default 0)")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment (repeatable)")
    run.add_argument("--caps", metavar="LIST", help="capabilities the program keeps in its own namespaces, "
                     "e.g. net_raw,net_bind_service or all (default: none, like bwrap)")
    run.add_argument("--allow", metavar="LIST", help="kernel surface refused by default that the PD may use: "
                     "io_uring (config /boot/allow)")
    run.add_argument("--banks", default="sha256", help="digest banks, e.g. sha256,sha384 (default sha256)")
    run.add_argument("--attest", action="store_true", help="print an integrity report (JSON) on stderr")
    run.add_argument("--nonce", help="hex nonce for --attest (default: 32 random bytes)")
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
    allow.set_defaults(func=cmd_allow)

    conns = sub.add_parser("connections", help="the live connections of a PD (/interfaces/connections)")
    conns.add_argument("pd", metavar="PD", help="id or name")
    conns.add_argument("--json", action="store_true", help="machine-readable output")
    conns.set_defaults(func=cmd_connections)

    try:
        from .integrity import cli as integrity_cli
    except ImportError:
        integrity_cli = None
    if integrity_cli is not None:
        integrity_cli.register(sub)
    from .server import cli as pd_cli
    pd_cli.register(sub)
    for command in sub.choices.values():     # `bmi list --uri X` as well as `bmi --uri X list`
        command.add_argument("--uri", default=argparse.SUPPRESS, help="connection URI (as before the command)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except errors.BMIError as e:
        print(f"bmi: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
