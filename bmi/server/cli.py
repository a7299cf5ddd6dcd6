"""`bmi` subcommands that drive PDs one call at a time, like virsh/xl: meant for linux:///system
and xen:///system (bmid --uri xen:///system).

    bmi --uri linux:///system create --image /bin/busybox --name web -- busybox httpd -f
    bmi list
    bmi start web ; bmi console web ; bmi param get web /system/memory/current
    bmi attest web --nonce 00112233 ; bmi destroy web

PDs are named by id or by the config parameter /name (set by create --name).
Human tables by default, --json everywhere.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from .. import FileImage, PDDescription, PDStatus
from ..errors import InvalidArgument, NoSuchDomain, NotSupported
from ..uri import open as bmi_open

NAME_PARAM = "/name"
STATUS_VERBS = {"start": PDStatus.RUNNING, "pause": PDStatus.PAUSED, "resume": PDStatus.RUNNING,
                "shutdown": PDStatus.SHUTDOWN, "restart": PDStatus.RESTARTING, "destroy": PDStatus.DESTROYED}


def _describe(mgr: Any) -> list[dict[str, Any]]:
    """Every PD as a row; one call to bmid, one per PD in session mode."""
    if hasattr(mgr, "describe"):
        return mgr.describe()
    rows = []
    for pd_id in mgr.list_pd()[1:]:
        pd = mgr.get_controller(pd_id)
        try:
            name = pd.get_config_param(NAME_PARAM)
        except InvalidArgument:
            name = ""
        rows.append({"pd": pd_id, "name": name, "status": pd.get_current_status().name,
                     "sha256": pd.measurement().get("sha256", b"").hex()})
    return rows


def resolve(mgr: Any, ref: str) -> Any:
    """A controller for a PD given by id or name."""
    if ref.isdigit():
        return mgr.get_controller(int(ref))
    matches = [r["pd"] for r in _describe(mgr) if r.get("name") == ref]
    if len(matches) != 1:
        why = "no PD has that name" if not matches else f"{len(matches)} PDs have that name: {matches}"
        raise NoSuchDomain(f"{ref!r}: {why}")
    return mgr.get_controller(matches[0])


def _out(args: argparse.Namespace, value: Any, human: str) -> None:
    print(json.dumps(value, sort_keys=True) if args.json else human)


def cmd_list(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        rows = _describe(mgr)
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    print(f"{'ID':>5}  {'NAME':<16} {'STATUS':<10} SHA256")
    for r in rows:
        print(f"{r['pd']:>5}  {r.get('name', ''):<16} {r['status']:<10} {r.get('sha256', '')[:16]}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    argv = args.args[1:] if args.args[:1] == ["--"] else args.args
    with bmi_open(args.uri) as mgr:
        if args.name and any(r.get("name") == args.name for r in _describe(mgr)):
            raise InvalidArgument(f"create: a PD named {args.name!r} exists already")
        pd = mgr.allocate_pd(PDDescription(mem=args.mem, cpu=args.cpus, performance=args.performance))
        try:
            if args.name:
                pd.set_config_param(NAME_PARAM, args.name)
            pd.setup_pd(FileImage(args.image))
            if argv:
                pd.set_config_param("/boot/cmdline", shlex.join(argv))
            if args.caps:
                pd.set_config_param("/boot/capabilities", args.caps)
            if args.start:
                pd.request_status_change(PDStatus.RUNNING)
        except BaseException:
            pd.destroy()                # nothing half-built is left behind
            raise
        summary = {"pd": pd.get_pd_id(), "name": args.name or "", "status": pd.get_current_status().name,
                   "sha256": pd.measurement()["sha256"].hex()}
    _out(args, summary, f"PD {summary['pd']} {summary['status']} sha256:{summary['sha256']}")
    return 0


def cmd_status_change(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        pd = resolve(mgr, args.pd)
        pd.request_status_change(STATUS_VERBS[args.command])
        status = pd.get_current_status().name
    _out(args, {"pd": pd.get_pd_id(), "status": status}, f"PD {pd.get_pd_id()} {status}")
    return 0


def _get_or_set(args: argparse.Namespace, pd: Any, kind: str, name: str, get: Any, put: Any) -> None:
    """`set` (when asked) then `get` one parameter, printed alike for runtime and config parameters."""
    if args.action == "set":
        if args.value is None:
            raise InvalidArgument(f"{kind} set {name}: give a value")
        put(name, args.value)
    value = get(name)
    _out(args, {"pd": pd.get_pd_id(), "name": name, "value": value}, value)


def cmd_param(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        pd = resolve(mgr, args.pd)
        if args.action == "ls":
            caps = pd.list_runtime_params(args.path or "/")
            rows = [{"name": c.name, "read": c.read, "write": c.write} for c in caps]
            _out(args, rows, "\n".join(f"{'r' if c.read else '-'}{'w' if c.write else '-'} {c.name}"
                                       for c in caps))
            return 0
        if args.path is None:
            raise InvalidArgument(f"param {args.action}: give a parameter path")
        _get_or_set(args, pd, "param", args.path, pd.get_runtime_param, pd.set_runtime_param)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        pd = resolve(mgr, args.pd)
        _get_or_set(args, pd, "config", args.name, pd.get_config_param, pd.set_config_param)
    return 0


def cmd_attest(args: argparse.Namespace) -> int:
    try:
        nonce = bytes.fromhex(args.nonce)
    except ValueError:
        raise InvalidArgument(f"attest: --nonce {args.nonce!r} is not hex") from None
    with bmi_open(args.uri) as mgr:
        report = resolve(mgr, args.pd).get_integrity_link(nonce)
    text = report.to_json()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Print the console; with --follow keep printing until the PD ends (Ctrl-C leaves it running)."""
    with bmi_open(args.uri) as mgr:
        pd = resolve(mgr, args.pd)
        offset = 0
        try:
            while True:
                offset, data = pd.read_console(offset, timeout=0.5 if args.follow else 0)
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
                if data:
                    continue
                if not args.follow or pd.get_current_status() not in (PDStatus.RUNNING, PDStatus.PAUSED):
                    return 0
        except KeyboardInterrupt:
            return 130


def cmd_events(args: argparse.Namespace) -> int:
    """Print status events as they happen (like `virsh event --loop`); bmid only."""
    with bmi_open(args.uri) as mgr:
        if not hasattr(mgr, "events"):
            raise NotSupported(f"events: {mgr.uri} has no event stream; status events come from bmid "
                               f"(--uri linux:///system or xen:///system)")
        try:
            with mgr.events(since=args.since, timeout=args.timeout) as stream:
                for event in stream:
                    row = {"seq": event.seq, "time": event.time, "pd": event.pd_id, "name": event.name,
                           "status": event.status.name, "reason": event.reason}
                    _out(args, row, f"{event.seq:>6}  PD {event.pd_id:<5} {event.name or '-':<12} "
                                    f"{event.status.name:<10} {event.reason}")
                    sys.stdout.flush()
        except KeyboardInterrupt:
            return 130
    return 0


#: `--help` examples; these commands talk to bmid (BMI_URI=linux:///system or --uri).
EXAMPLES = {
    "list": "examples:\n  BMI_URI=linux:///system bmi list --json\n  bmi --uri xen:///system list",
    "create": "examples:\n  bmi --uri linux:///system create --image /bin/busybox --name web --start -- \\\n"
              "      busybox sh -c 'while :; do date; sleep 5; done'\n  bmi --uri linux:///system create --image root.cpio --mem 128M",
    "start": "example:\n  bmi --uri linux:///system start web",
    "param": "examples:\n  bmi --uri linux:///system param ls web /system\n"
             "  bmi --uri linux:///system param set web /system/memory/current 32M",
    "config": "example:\n  bmi --uri linux:///system config set web /boot/cmdline 'busybox sleep 60'",
    "attest": "example:\n  bmi --uri linux:///system attest web --nonce 00ff --out report.json\n"
              "  bmi verify report.json --nonce 00ff --expect-image /bin/busybox",
    "console": "example:\n  bmi --uri linux:///system console web -f",
    "events": "examples:\n  bmi --uri linux:///system events --json          # until Ctrl-C\n"
              "  bmi --uri linux:///system events --since 0 --timeout 1   # the stored log, then stop",
}


def register(sub: Any) -> None:
    """Add the subcommands to the `bmi` parser."""
    def add(name: str, help: str, func: Any, pd: bool = True) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        if pd:
            parser.add_argument("pd", metavar="PD", help="id or name")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(func=func)
        return parser

    add("list", "every PD: id, name, status, measurement", cmd_list, pd=False)
    from ..cli import parse_size
    create = add("create", "allocate a PD, measure an image into it (and start it with --start)", cmd_create,
                 pd=False)
    create.add_argument("--image", required=True, help="a static ELF, or a newc cpio root with /init")
    create.add_argument("--mem", type=parse_size, default=64 << 20, help="memory limit (default 64M)")
    create.add_argument("--cpus", type=int, default=1, help="CPUs (default 1)")
    create.add_argument("--performance", type=int, default=100, help="share of those CPUs in percent")
    create.add_argument("--name", help="a name to address the PD by (config parameter /name)")
    create.add_argument("--caps", metavar="LIST", help="capabilities it keeps in its namespaces, e.g. "
                        "net_bind_service (default: none)")
    create.add_argument("--start", action="store_true", help="start it right away")
    create.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the PD's argv")
    for verb, status in STATUS_VERBS.items():
        add(verb, f"request_status_change({status.name})", cmd_status_change)
    param = add("param", "runtime parameters: get PD PATH | set PD PATH VALUE | ls PD [PATH]", cmd_param,
                pd=False)
    param.add_argument("action", choices=["get", "set", "ls"])
    param.add_argument("pd", metavar="PD", help="id or name")
    param.add_argument("path", nargs="?")
    param.add_argument("value", nargs="?")
    config = add("config", "config parameters: get PD NAME | set PD NAME VALUE", cmd_config, pd=False)
    config.add_argument("action", choices=["get", "set"])
    config.add_argument("pd", metavar="PD", help="id or name")
    config.add_argument("name")
    config.add_argument("value", nargs="?")
    attest = add("attest", "an integrity report (TPM quote) of the PD, as JSON", cmd_attest)
    attest.add_argument("--nonce", required=True, help="hex nonce (1..64 bytes)")
    attest.add_argument("--out", help="also write the report to this file")
    console = add("console", "the PD's console output", cmd_console)
    console.add_argument("-f", "--follow", action="store_true", help="keep printing until the PD ends")
    events = add("events", "status events of every PD as they happen (bmid)", cmd_events, pd=False)
    events.add_argument("--since", type=int, metavar="SEQ", help="first replay the stored events after SEQ")
    events.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds without an event")
