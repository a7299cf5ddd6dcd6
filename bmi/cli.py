"""The `bmi` command: run measured, isolated PDs and inspect the layer.

Human output by default, `--json` for scripts.  Every command ends through
main(): 0 done, 1 failed, 2 a usage error, 130 after Ctrl-C, quietly on a
closed pipe; with --json a failure is one object on stdout.  Exit status of
`bmi run` is the PD's: its exit status, 128+N when killed by signal N (137
for oom).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence
from urllib.parse import urlsplit

from . import FileImage, PDDescription, PDStatus, __version__, device_cli, errors, params
from .uri import is_session, open as bmi_open, resolve as resolve_uri

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


class UsageError(errors.InvalidArgument):
    """The command line itself is wrong: exit status 2, like argparse's own errors."""

    usage = ""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors take main()'s one error path (status 2; one JSON object with --json)."""

    def error(self, message: str) -> NoReturn:
        error = UsageError(f"{self.prog}: {message}")
        error.usage = self.format_usage()
        raise error


def parse_size(text: str) -> int:
    """'64M' -> 67108864; plain numbers are bytes (the parameters' own parser)."""
    try:
        return params.parse_size(text, what="size")
    except errors.InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def parse_hex(text: str) -> str:
    """A hex string (a nonce), checked while parsing so no image is measured for a typo."""
    try:
        bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex") from None
    return text


def parse_env(text: str) -> str:
    """NAME=VALUE, as `env` takes it; a bare NAME is a mistake, not an empty variable."""
    name, sep, _ = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return text


def add_pd_options(parser: argparse.ArgumentParser) -> None:
    """The options `run` and `create` share: resources, priority, environment, capabilities, banks."""
    parser.add_argument("--mem", type=parse_size, default=64 << 20, help="hard memory limit (default 64M)")
    parser.add_argument("--cpus", type=int, default=1, help="number of CPUs (clamped to the host; default 1)")
    parser.add_argument("--performance", type=int, default=100, help="share of those CPUs in percent (1-100)")
    parser.add_argument("--priority", type=int, default=0, help="-10..+10 (nice and CPU weight; default 0)")
    parser.add_argument("--env", action="append", default=[], type=parse_env, metavar="NAME=VALUE",
                        help="environment (repeatable)")
    parser.add_argument("--caps", metavar="LIST", help="capabilities the program keeps in its own namespaces, "
                        "e.g. net_raw,net_bind_service or all (default: none, like bwrap)")
    parser.add_argument("--allow", metavar="LIST", help="kernel surface refused by default that the PD may use: "
                        "io_uring (config /boot/allow)")
    parser.add_argument("--banks", default="sha256", help="digest banks, e.g. sha256,sha384 (default sha256)")
    device_cli.add_options(parser)      # --device, --net


@contextlib.contextmanager
def held_interrupts() -> Iterator[Callable[[], None]]:
    """Hold Ctrl-C while a call is in flight and raise it at the next check() this yields.

    A call to bmid cut short leaves its reply on the channel, where the next call (the destroy that cleans
    up) would read it; a PD allocated by bmid but not yet known here would be left behind.  A Ctrl-C that
    comes after the last check is raised on leaving."""
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))

    def check() -> None:
        if pending:
            pending.clear()
            raise KeyboardInterrupt
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()


def prepare_pd(mgr: Any, args: argparse.Namespace, argv: Sequence[str] | None, check: Callable[[], None],
               config: Mapping[str, str] | None = None) -> Any:
    """Allocate a PD and give it the options of add_pd_options, all checked before the image is measured
    (a bad --priority must not wait for a 1 GiB hash); then measure the image into it.

    `check` (held_interrupts) is called between the calls and while the image is copied, so Ctrl-C lands
    where the PD can still be destroyed: on any failure nothing half-built is left behind."""
    pd = mgr.allocate_pd(PDDescription(mem=args.mem, cpu=args.cpus, performance=args.performance))
    try:
        check()
        pd.set_priority(args.priority)
        for key, value in (config or {}).items():
            pd.set_config_param(key, value)
        if argv:
            pd.set_config_param("/boot/cmdline", shlex.join(argv))
        for item in args.env:
            name, _, value = item.partition("=")
            pd.set_config_param(f"/boot/env/{name}", value)
        if args.caps:
            pd.set_config_param("/boot/capabilities", args.caps)
        if args.allow:
            pd.set_config_param("/boot/allow", args.allow)
        device_cli.apply(mgr, pd, args)     # --net config, --device assignments
        check()
        image = FileImage(args.image)
        with progress(args, image.get_image_size(), "measuring") as update:
            def copied(done: int, total: int) -> None:
                check()
                if update is not None:
                    update(done, total)
            pd.setup_pd(image, banks=[b.strip() for b in args.banks.split(",") if b.strip()], progress=copied)
        check()
    except BaseException:
        pd.destroy()
        raise
    return pd


@contextlib.contextmanager
def progress(args: argparse.Namespace, total: int | None, desc: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar (tqdm) on stderr for a long step, when stderr is a terminal and not --quiet.

    total None: not known before the step starts.  Yields the callback setup_pd and bundle take
    (done, total), or None when there is no bar."""
    if (getattr(args, "quiet", False) or not sys.stderr.isatty()
            or (total is not None and total < PROGRESS_THRESHOLD)):
        yield None
        return
    from tqdm import tqdm
    # shutil's size: $COLUMNS/$LINES, the terminal's, or 80x24 where a terminal reports 0 (tqdm would draw nothing)
    size = shutil.get_terminal_size()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
              leave=False, ncols=size.columns, nrows=size.lines) as bar:
        def update(done: int, now_total: int) -> None:
            if bar.total != now_total:
                bar.total = now_total
            bar.update(done - bar.n)
        yield update


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
    pd.request_status_change(PDStatus.RUNNING)
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
            print(f"bmi: PD {pid} {status.name}: {reason}", file=sys.stderr)
        return _exit_code(status, exit_status, reason)


def cmd_bundle(args: argparse.Namespace) -> int:
    from .drivers.linux.bundle import bundle
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
    from .types import ConnectionPolicy, ConnectionType
    policies = [ConnectionPolicy(ConnectionType[t.upper()], args.mode) for t in args.type]
    from .server.cli import resolve
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
    from .server.cli import resolve
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


def connection_rows(text: str) -> list[dict[str, Any]]:
    """/interfaces/connections (`ID to|from PEER TYPE MODE [pending]` per line) as rows."""
    rows = [line.split() for line in text.splitlines()]
    return [{"conn": int(r[0]), "direction": r[1], "peer": int(r[2]), "type": r[3], "mode": r[4],
             "pending": r[-1] == "pending"} for r in rows]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bmi", description="Create, measure, run and attest isolated protection domains (OpenTC BMI v0.1).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="URIs: linux:///session (default, in-process), linux:///system (bmid), xen:///system\n"
               "(bmid --uri xen:///system), xen:///session (in-process), pd:///. Set BMI_URI or --uri.\n"
               "Exit status: 0 done, 1 failed, 2 bad usage, 130 interrupted; `bmi run`: the PD's own.\n"
               "Run `bmi COMMAND --help` for examples.")
    parser.add_argument("--version", action="version", version=f"bmi {__version__} (BMI API v0.1)")
    parser.add_argument("--uri", default=None, help="connection URI (default: $BMI_URI or linux:///session)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
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

    try:
        from .integrity import cli as integrity_cli
    except ImportError:
        integrity_cli = None
    if integrity_cli is not None:
        integrity_cli.register(sub)
    from .server import cli as pd_cli
    pd_cli.register(sub)
    device_cli.register(sub)
    for command in sub.choices.values():     # `bmi list --uri X` as well as `bmi --uri X list`
        command.add_argument("--uri", default=argparse.SUPPRESS, help="connection URI (as before the command)")
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars")
    for name in ("allow", "connections"):
        sub.choices[name].set_defaults(needs_bmid=True)
    return parser


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _wants_json(argv: Sequence[str]) -> bool:
    """--json among the options (before a `--` that starts the PD's argv); known even when parsing fails."""
    return "--json" in list(argv)[:list(argv).index("--") if "--" in argv else None]


def _error_type(error: BaseException) -> str:
    """The bmi error class a failure is (UsageError is an InvalidArgument), else the Python one."""
    for cls in type(error).__mro__:
        if cls.__name__ in errors.__all__:
            return cls.__name__
    return type(error).__name__


def _fail(error: BaseException, as_json: bool, status: int) -> int:
    """The one way every command reports a failure: a line on stderr, or with --json one object on stdout."""
    message = str(error)
    if isinstance(error, OSError) and error.strerror:
        message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    if as_json:
        print(json.dumps({"ok": False, "error": {"type": _error_type(error), "message": message}}), flush=True)
    else:
        if isinstance(error, UsageError):
            print(error.usage.rstrip(), file=sys.stderr)
        print(f"bmi: {_error_type(error)}: {message}", file=sys.stderr, flush=True)
    return status


def _run(args: argparse.Namespace) -> int:
    uri = resolve_uri(args.uri)
    if getattr(args, "needs_bmid", False) and is_session(uri):
        system = urlsplit(uri).scheme + ":///system"
        raise errors.NotSupported(f"PDs of {uri} end with this command; use --uri {system} (bmid) to keep them")
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, and turn every failure into a message and an exit status (never a traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = _wants_json(argv)
    try:
        return _run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader (`| head`) is gone: nothing more to say, and nothing at exit either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except errors.InvalidArgument as e:
        return _fail(e, as_json, EXIT_USAGE)
    except (errors.BMIError, OSError) as e:
        return _fail(e, as_json, EXIT_FAILED)
    except Exception as e:      # a bug: say so in one line; BMI_DEBUG=1 shows the traceback
        if os.environ.get("BMI_DEBUG"):
            raise
        return _fail(RuntimeError(f"internal error: {type(e).__name__}: {e} (BMI_DEBUG=1 shows where)"),
                     as_json, EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
