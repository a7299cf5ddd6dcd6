"""`bmi device ...`, `bmi net ...` and the --device/--net options of `bmi run` and `bmi create`.

    bmi device list
    bmi --uri linux:///system device assign web /dev/ttyUSB0 --mode rw
    bmi --uri linux:///system net create lab0 --subnet 10.213.7.0/24
    bmi run --net veth:lab0,10.213.7.2/24,gw=10.213.7.1 --device /dev/ttyUSB0:rw /bin/busybox -- busybox httpd -f

The semantics (who may assign, one PD per device unless shared) are the
DeviceManager's (bmi/api.py); this module only turns options into its calls.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..uri import open as bmi_open
from .common import parse_mode, resolve

def _print(args: argparse.Namespace, value: Any, lines: list[str]) -> None:
    print(json.dumps(value, sort_keys=True) if args.json else "\n".join(lines))


def cmd_device_list(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        found = mgr.get_device_manager().list_devices()
        _print(args, found, found)
    return 0


def cmd_device_assign(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        pd = resolve(mgr, args.pd)
        mgr.get_device_manager().assign(args.device, pd.get_pd_id(), args.mode, args.shared)
        _print(args, {"pd": pd.get_pd_id(), "device": args.device}, [f"{args.device} assigned to PD {pd.get_pd_id()}"])
    return 0


def cmd_device_unassign(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        pd = resolve(mgr, args.pd)
        mgr.get_device_manager().unassign(args.device, pd.get_pd_id())
        _print(args, {"pd": pd.get_pd_id(), "device": args.device}, [f"{args.device} taken from PD {pd.get_pd_id()}"])
    return 0


def cmd_net_create(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        mgr.get_device_manager().create_network(args.name, args.subnet, args.nat)
        _print(args, {"name": args.name, "subnet": args.subnet, "nat": args.nat}, [f"network {args.name} created"])
    return 0


def cmd_net_list(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        nets = mgr.get_device_manager().list_networks()
        _print(args, nets, [f"{n['name']}  {n['subnet']}{'  nat' if n['nat'] else ''}" for n in nets])
    return 0


def cmd_net_destroy(args: argparse.Namespace) -> int:
    with bmi_open(args.uri) as mgr:
        mgr.get_device_manager().destroy_network(args.name)
        _print(args, {"name": args.name}, [f"network {args.name} destroyed"])
    return 0


def register(sub: Any) -> None:
    """`bmi device` and `bmi net`; changing commands need bmid (a session's PDs and networks end with it)."""
    def verb(group: Any, name: str, help: str, func: Any, changes: bool) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=help)
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(func=func, **({"needs_bmid": True} if changes else {}))
        return parser

    device = sub.add_parser("device", help="host devices for PDs (DeviceManager)")
    verbs = device.add_subparsers(dest="verb", required=True, metavar="VERB")
    verb(verbs, "list", "the host devices a PD may be given here", cmd_device_list, False)
    assign = verb(verbs, "assign", "give PD a host device node", cmd_device_assign, True)
    assign.add_argument("pd", metavar="PD", help="id or name")
    assign.add_argument("device", metavar="DEV", help="e.g. /dev/ttyUSB0")
    assign.add_argument("--mode", type=parse_mode, default=3, help="r, w or rw (default rw)")
    assign.add_argument("--shared", action="store_true", help="other PDs may have it too (each assigned shared)")
    unassign = verb(verbs, "unassign", "take a device node back from a PD", cmd_device_unassign, True)
    unassign.add_argument("pd", metavar="PD", help="id or name")
    unassign.add_argument("device", metavar="DEV")

    net = sub.add_parser("net", help="host networks (bridges) for PDs' veth interfaces")
    verbs = net.add_subparsers(dest="verb", required=True, metavar="VERB")
    create = verb(verbs, "create", "a host bridge on a private subnet (like virsh net-define)", cmd_net_create, True)
    create.add_argument("name", metavar="NAME")
    create.add_argument("--subnet", required=True, help="e.g. 10.213.7.0/24 (the bridge gets its first address)")
    create.add_argument("--nat", action="store_true", help="route it out through the host (changes its firewall)")
    verb(verbs, "list", "the networks the manager made", cmd_net_list, False)
    destroy = verb(verbs, "destroy", "remove a network", cmd_net_destroy, True)
    destroy.add_argument("name", metavar="NAME")
