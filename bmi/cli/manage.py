"""`bmi` subcommands that drive PDs one call at a time, like virsh/xl: meant for linux:///system
and xen:///system (bmid --uri xen:///system).

    bmi --uri linux:///system create --image /bin/busybox --name web -- busybox httpd -f
    bmi list
    bmi start web ; bmi show web ; bmi console web ; bmi param get web /system/memory/current
    bmi attest web --nonce 00112233 ; bmi destroy web

PDs are named by id or by the config parameter /name (set by create --name; never all digits, unique).
Human tables by default, --json everywhere.  Against a session URI these commands refuse (bmi/cli's
main): the PDs would end with the command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from ..errors import InvalidArgument, NotSupported
from ..params import normalize
from ..text import printable
from ..types import PDStatus
from ..uri import open as bmi_open
from .integrity import _pinned_key
from .common import (NAME_PARAM, add_pd_options, connection_rows, describe, held_interrupts,
                     prepare_pd, resolve, start_pd)

STATUS_VERBS = {"start": PDStatus.RUNNING, "pause": PDStatus.PAUSED, "resume": PDStatus.RUNNING,
                "shutdown": PDStatus.SHUTDOWN, "restart": PDStatus.RESTARTING, "destroy": PDStatus.DESTROYED}


def _out(args: argparse.Namespace, value: Any, human: str) -> None:
    print(json.dumps(value, sort_keys=True) if args.json else human)


def cmd_list(args: argparse.Namespace) -> int:
    from ..testing import owned_pds, owner_gone
    with bmi_open(args.uri) as mgr:
        rows = describe(mgr)
        owners = dict(owned_pds(mgr)) if args.owner else {}
    if args.owner:          # test runs tag their PDs (config /owner, see bmi.testing)
        for r in rows:
            r["owner"] = owners.get(r["pd"], "")
            r["owner_gone"] = bool(r["owner"]) and owner_gone(r["owner"])
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    print(f"{'ID':>5}  {'NAME':<16} {'STATUS':<10} {'SHA256':<16}" + ("  OWNER" if args.owner else ""))
    for r in rows:
        owner = (f"  {printable(r['owner']) or '-'}" + (" (gone)" if r["owner_gone"] else "")) if args.owner else ""
        print(f"{r['pd']:>5}  {printable(r.get('name', '')):<16} {r['status']:<10} {r.get('sha256', '')[:16]:<16}{owner}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    """destroy PD, or --owner-gone: every PD whose owning test run has ended."""
    if args.owner_gone == (args.pd is not None):
        raise InvalidArgument("destroy: give a PD (id or name) or --owner-gone, not both")
    if args.pd is not None:
        return cmd_status_change(args)
    from ..testing import destroy_orphans
    with bmi_open(args.uri) as mgr:
        destroyed = destroy_orphans(mgr)
    _out(args, {"destroyed": destroyed}, f"destroyed {len(destroyed)} PD(s) whose owner is gone: "
                                         f"{' '.join(map(str, destroyed)) or '-'}")
    return 0


def check_name(mgr: Any, name: str, pd_id: int | None = None) -> None:
    """A name addresses one PD: not all digits (those are ids) and not another PD's."""
    if not name or name.isdigit():
        raise InvalidArgument(f"name {name!r}: a name must not be empty or all digits (those are PD ids)")
    taken = [r["pd"] for r in describe(mgr) if r.get("name") == name and r["pd"] != pd_id]
    if taken:
        raise InvalidArgument(f"name {name!r}: PD {taken[0]} has that name already; names are unique")


def cmd_create(args: argparse.Namespace) -> int:
    argv = args.args[1:] if args.args[:1] == ["--"] else args.args
    with bmi_open(args.uri) as mgr, held_interrupts() as check:
        if args.name is not None:
            check_name(mgr, args.name)
        pd = prepare_pd(mgr, args, argv, check, {NAME_PARAM: args.name} if args.name is not None else {})
        try:
            if args.start:
                start_pd(pd, args, check)
            check()
        except BaseException:
            pd.destroy()                # nothing half-built is left behind
            raise
        summary = {"pd": pd.get_pd_id(), "name": args.name or "", "status": pd.get_current_status().name,
                   "sha256": pd.measurement()["sha256"].hex()}
    _out(args, summary, f"PD {summary['pd']} {summary['status']} sha256:{summary['sha256']}")
    return 0


def _number(pd: Any, name: str) -> int | None:
    """A numeric runtime parameter, None where the PD has none (no uptime before it runs)."""
    try:
        text = pd.get_runtime_param(name)
    except InvalidArgument:
        return None
    return int(text) if text.strip().lstrip("-").isdigit() else None


def describe_pd(pd: Any) -> dict[str, Any]:
    """Everything `bmi show` says about one PD, like `virsh dominfo`."""
    try:
        name = pd.get_config_param(NAME_PARAM)
    except InvalidArgument:
        name = ""
    info: dict[str, Any] = {
        "pd": pd.get_pd_id(), "name": name, "status": pd.get_current_status().name,
        "measurement": {bank: digest.hex() for bank, digest in pd.measurement().items()},
        "priority": pd.get_priority(), "parent": _number(pd, "/system/parent"),
        "uptime": _number(pd, "/system/uptime"),
        "exit_status": _number(pd, "/system/exit-status"), "exit_reason": None,
        "memory": {k: _number(pd, f"/system/memory/{k}") for k in ("current", "used", "min", "max")},
        "cpu": {k: _number(pd, f"/system/cpu/{k}") for k in ("current", "max", "performance")},
        "pids": {k: _number(pd, f"/system/pids/{k}") for k in ("current", "max")},
        "connections": connection_rows(pd.get_runtime_param("/interfaces/connections")),
    }
    with contextlib.suppress(InvalidArgument):
        info["exit_reason"] = pd.get_runtime_param("/system/exit-reason")
    return info


def cmd_show(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        info = describe_pd(resolve(mgr, args.pd))
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    mem, cpu, pids = info["memory"], info["cpu"], info["pids"]
    rows = [("Id", info["pd"]), ("Name", info["name"] or "-"), ("Status", info["status"]),
            *((f"Measurement {bank}", digest) for bank, digest in info["measurement"].items()),
            ("Memory", f"{_mib(mem['current'])} limit, {_mib(mem['used'])} used, max {_mib(mem['max'])}"),
            ("CPUs", f"{cpu['current']} of max {cpu['max']}, performance {cpu['performance']} %"),
            ("Processes", f"{pids['current']} of max {pids['max']}" if pids["max"] is not None else "-"),
            ("Priority", info["priority"]), ("Parent", info["parent"]),
            ("Uptime", f"{info['uptime']} s" if info["uptime"] is not None else "-")]
    if info["exit_reason"] is not None:
        rows += [("Exit status", "-" if info["exit_status"] is None else info["exit_status"]),
                 ("Exit reason", info["exit_reason"])]
    rows.append(("Connections", len(info["connections"])))
    rows += [("", f"{c['conn']} {c['direction']} PD {c['peer']} {c['type']} {c['mode']}"
                  f"{' pending' if c['pending'] else ''}") for c in info["connections"]]
    for key, value in rows:
        print(f"{key + ':' if key else '':<20} {printable(str(value))}")
    return 0


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / (1 << 20):.1f} MiB"


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
    if not args.name.startswith("/"):
        raise InvalidArgument(f"config {args.action} {args.name!r}: config parameters are paths like /name or "
                              f"/boot/cmdline (with the leading '/')")
    with bmi_open(args.uri) as mgr:
        pd = resolve(mgr, args.pd)
        if args.action == "set" and args.value is not None and normalize(args.name, what="config set",
                                                                          pd_id=pd.get_pd_id()) == NAME_PARAM:
            check_name(mgr, args.value, pd.get_pd_id())
        _get_or_set(args, pd, "config", args.name, pd.get_config_param, pd.set_config_param)
    return 0


def cmd_attest(args: argparse.Namespace) -> int:
    try:
        nonce = bytes.fromhex(args.nonce)
    except ValueError:
        raise InvalidArgument(f"attest: --nonce {args.nonce!r} is not hex") from None
    ak = _pinned_key(args.ak, "attest")
    with bmi_open(args.uri) as mgr:
        report = resolve(mgr, args.pd).get_integrity_link(nonce)
    if ak is not None:          # checked here, against the key pinned beforehand, not one the layer sends now
        from ..integrity.keys import resolve as resolve_key
        from ..integrity.verify import verify_report
        verify_report(report, nonce=nonce, pd_integrity=report.pd_integrity, ak=ak)
    text = report.to_json()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    if ak is not None:
        print(f"verified: signed by the pinned AK {resolve_key(ak, 'attest').fingerprint}, nonce {args.nonce}, "
              f"PD measurement {report.pd_integrity.hex()}", file=sys.stderr)
    return 0


def cmd_ak(args: argparse.Namespace) -> int:
    """The layer's attestation key, to pin once (at enrolment) for `bmi attest --ak` and `bmi verify --ak`."""
    with bmi_open(args.uri) as mgr:
        key = mgr.get_attestation_key()
    if args.out:
        with open(args.out, "w") as f:
            f.write(key.pem)
    if args.json:
        print(json.dumps({"fingerprint": key.fingerprint, "pem": key.pem, "tpm": key.tpm}, indent=2))
    else:
        print(f"fingerprint {key.fingerprint}\n{key.pem}", end="" if key.pem.endswith("\n") else "\n")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    """Print the console; with --follow keep printing until the PD ends (Ctrl-C leaves it running)."""
    with bmi_open(args.uri) as mgr:
        pd = resolve(mgr, args.pd)
        offset = 0
        while True:
            offset, data = pd.read_console(offset, timeout=0.5 if args.follow else 0)
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            if data:
                continue
            if not args.follow or pd.get_current_status() not in (PDStatus.RUNNING, PDStatus.PAUSED):
                return 0


def cmd_events(args: argparse.Namespace) -> int:
    """Print status events as they happen (like `virsh event --loop`); bmid only."""
    with bmi_open(args.uri) as mgr:
        if not hasattr(mgr, "events"):
            raise NotSupported(f"events: {mgr.uri} has no event stream; status events come from bmid "
                               f"(--uri linux:///system or xen:///system)")
        with mgr.events(since=args.since, timeout=args.timeout) as stream:
            for event in stream:
                row = {"seq": event.seq, "time": event.time, "pd": event.pd_id, "name": event.name,
                       "status": event.status.name, "reason": event.reason}
                _out(args, row, f"{event.seq:>6}  PD {event.pd_id:<5} {printable(event.name) or '-':<12} "
                                f"{event.status.name:<10} {printable(event.reason)}")
                sys.stdout.flush()
    return 0


#: `--help` examples; these commands talk to bmid (BMI_URI=linux:///system or --uri).
EXAMPLES = {
    "list": "examples:\n  BMI_URI=linux:///system bmi list --json\n  bmi --uri xen:///system list",
    "create": "examples:\n  bmi --uri linux:///system create --image /bin/busybox --name web --start -- \\\n"
              "      busybox sh -c 'while :; do date; sleep 5; done'\n  bmi --uri linux:///system create --image root.cpio --mem 128M",
    "start": "example:\n  bmi --uri linux:///system start web",
    "destroy": "examples:\n  bmi --uri linux:///system destroy web\n"
               "  bmi --uri linux:///system destroy --owner-gone   # PDs of killed pytest runs",
    "show": "examples:\n  bmi --uri linux:///system show web\n  bmi --uri linux:///system show 3 --json",
    "param": "examples:\n  bmi --uri linux:///system param ls web /system\n"
             "  bmi --uri linux:///system param set web /system/memory/current 32M",
    "config": "example:\n  bmi --uri linux:///system config set web /boot/cmdline 'busybox sleep 60'",
    "attest": "example:\n  bmi --uri linux:///system attest web --nonce 00ff --out report.json\n"
              "  bmi verify report.json --nonce 00ff --expect-image /bin/busybox \\\n"
              "      --ak ak.pem             # the AK's PEM from `bmi tpm` on the host",
    "ak": "example (once, when enrolling the host; then pin the file):\n"
          "  bmi --uri linux+ssh://root@host/system ak --out host-ak.pem\n"
          "  bmi --uri linux+ssh://root@host/system attest web --nonce 00ff --ak host-ak.pem",
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
        parser.set_defaults(func=func, needs_bmid=True)     # PDs of a session URI would end with the command
        return parser

    listing = add("list", "every PD: id, name, status, measurement", cmd_list, pd=False)
    listing.add_argument("--owner", action="store_true",
                         help="also the owning test run (config /owner) and whether it has ended")
    create = add("create", "allocate a PD, measure an image into it (and start it with --start)", cmd_create,
                 pd=False)
    create.add_argument("--image", required=True, help="a static ELF, or a newc cpio root with /init")
    create.add_argument("--name", help="a name to address the PD by (config parameter /name; not all digits)")
    add_pd_options(create)
    create.add_argument("--start", action="store_true", help="start it right away")
    create.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the PD's argv")
    add("show", "everything about one PD: status, name, measurement, resources, uptime, exit, connections",
        cmd_show)
    for verb, status in STATUS_VERBS.items():
        if verb != "destroy":
            add(verb, f"request_status_change({status.name})", cmd_status_change)
    destroy = add("destroy", "request_status_change(DESTROYED), or --owner-gone", cmd_destroy, pd=False)
    destroy.add_argument("pd", metavar="PD", nargs="?", help="id or name")
    destroy.add_argument("--owner-gone", action="store_true",
                         help="destroy every PD whose owner (a pytest run, config /owner) has ended")
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
    attest.add_argument("--ak", metavar="FILE|FINGERPRINT",
                        help="verify the report here against the machine's attestation key, pinned beforehand "
                             "(a PEM file or sha256:<hex>, from `bmi tpm`): exit 1 (IntegrityError) if it fails")
    ak = add("ak", "the layer's attestation key (AK): its fingerprint and PEM, to pin for attest/verify --ak",
             cmd_ak, pd=False)
    ak.add_argument("--out", metavar="FILE", help="also write the PEM to FILE")
    ak.set_defaults(needs_bmid=False)
    console = add("console", "the PD's console output", cmd_console)
    console.add_argument("-f", "--follow", action="store_true", help="keep printing until the PD ends")
    events = add("events", "status events of every PD as they happen (bmid)", cmd_events, pd=False)
    events.add_argument("--since", type=int, metavar="SEQ", help="first replay the stored events after SEQ")
    events.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds without an event")
