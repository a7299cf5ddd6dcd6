"""Network interfaces for PDs and host bridges, made from the manager's side with iproute2.

Shared by the drivers: the Linux driver moves a veth into the PD's network
namespace (below), the Xen driver plugs a vif into the same host bridges.

A PD starts with only loopback in its own network namespace.  Its config
`/net/<ifname>` = `veth:<bridge>` or `macvlan:<parent>` (with
`/net/<ifname>/address` CIDR and optional `/net/<ifname>/gateway`) asks for
one interface: right after the PD's init exists and before start() returns,
the interface is made in the manager's network namespace, moved into the
PD's (by the init's pid) and configured there with `nsenter --net`.  The PD
holds no CAP_NET_ADMIN, so it cannot change what it was given.  The host end
of a veth is removed when the PD's run ends (the kernel also removes a veth
pair when the PD's namespace goes).

Host bridges (`bmi net create`) are plain Linux bridges with the first
address of their subnet; `nat` adds forwarding and a masquerade rule, which
changes the host's firewall: only on request.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import zlib
from dataclasses import dataclass

from ..errors import InvalidArgument, NotSupported, ResourceError

KINDS = ("veth", "macvlan")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
_NSENTER = "nsenter"


@dataclass(frozen=True)
class Interface:
    """One `/net/<name>` of a PD's config, checked."""

    name: str
    kind: str               # veth or macvlan
    link: str               # the bridge (veth) or parent interface (macvlan) on the host
    address: str | None     # CIDR inside the PD
    gateway: str | None


def exists(name: str) -> bool:
    """Whether this network namespace has an interface `name` (sysfs may show another namespace's)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _ip() -> str:
    found = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if found is None:
        raise NotSupported("network interfaces for PDs need iproute2's `ip` (Debian package iproute2)")
    return found


def check_ifname(name: str, what: str, pd_id: int | None = None) -> str:
    if not _IFNAME.match(name) or name in (".", ".."):
        raise InvalidArgument(f"{what}: {name!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)",
                              pd_id=pd_id)
    return name


def check_param(name: str, value: str, what: str, pd_id: int) -> None:
    """A /net/... config value, checked when it is set."""
    parts = name.split("/")[2:]
    if not parts or len(parts) > 2:
        raise InvalidArgument(f"{what}: network config is /net/IFNAME, /net/IFNAME/address or "
                              f"/net/IFNAME/gateway", pd_id=pd_id)
    check_ifname(parts[0], what, pd_id)
    if len(parts) == 1:
        kind, _, link = value.partition(":")
        if kind not in KINDS or not link:
            raise InvalidArgument(f"{what}: {value!r} is not veth:BRIDGE or macvlan:PARENT", pd_id=pd_id)
        check_ifname(link, what, pd_id)
    elif parts[1] == "address":
        try:
            ipaddress.ip_interface(value)
        except ValueError:
            raise InvalidArgument(f"{what}: {value!r} is not an address with prefix (10.0.0.2/24)",
                                  pd_id=pd_id) from None
        if "/" not in value:
            raise InvalidArgument(f"{what}: {value!r} lacks its prefix length (10.0.0.2/24)", pd_id=pd_id)
    elif parts[1] == "gateway":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise InvalidArgument(f"{what}: {value!r} is not an IP address", pd_id=pd_id) from None
    else:
        raise InvalidArgument(f"{what}: unknown network setting {parts[1]!r} (address or gateway)", pd_id=pd_id)


def interfaces(config: dict[str, str]) -> list[Interface]:
    """The interfaces a PD's config asks for, in name order."""
    found = []
    for key, value in sorted(config.items()):
        parts = key.split("/")
        if len(parts) == 3 and parts[1] == "net":
            kind, _, link = value.partition(":")
            found.append(Interface(parts[2], kind, link, config.get(key + "/address"), config.get(key + "/gateway")))
    return found


def host_name(pd_id: int, ifname: str) -> str:
    """A host-side name unique to this manager, PD and interface (15 bytes at most)."""
    return f"bmi{zlib.crc32(f'{os.getpid()}:{pd_id}:{ifname}'.encode()):08x}"


def _run(args: list[str], what: str, pd_id: int, stdin: str | None = None) -> None:
    done = subprocess.run(args, capture_output=True, text=True, input=stdin)
    if done.returncode != 0:
        raise ResourceError(f"{what}: `{' '.join(args)}` failed: {done.stderr.strip() or done.returncode}",
                            pd_id=pd_id)


def _inside(pid: int) -> list[str]:
    return [_NSENTER, f"--net=/proc/{pid}/ns/net", "--", _ip()]


def attach(pid: int, pd_id: int, iface: Interface) -> str:
    """Make `iface` in the network namespace of the PD whose init is `pid`; returns the host-side name."""
    ip, what = _ip(), f"network interface {iface.name} of PD {pd_id}"
    host = host_name(pd_id, iface.name)
    if not exists(iface.link):
        raise InvalidArgument(f"{what}: there is no {'bridge' if iface.kind == 'veth' else 'interface'} "
                              f"{iface.link!r} on the host (bmi net create makes bridges)", pd_id=pd_id)
    if iface.kind == "veth":
        _run([ip, "link", "add", host, "type", "veth", "peer", "name", iface.name, "netns", str(pid)], what, pd_id)
        try:
            _run([ip, "link", "set", host, "master", iface.link, "up"], what, pd_id)
        except BaseException:
            detach(host)
            raise
    else:
        _run([ip, "link", "add", "link", iface.link, "name", host, "type", "macvlan", "mode", "bridge"], what, pd_id)
        try:
            _run([ip, "link", "set", host, "netns", str(pid)], what, pd_id)
        except BaseException:
            detach(host)
            raise
        _run([*_inside(pid), "link", "set", host, "name", iface.name], what, pd_id)
    inside = ["link set lo up"]         # one `ip -batch` in the PD's namespace for all of its settings
    if iface.address:
        inside.append(f"addr add {iface.address} dev {iface.name}")
    inside.append(f"link set {iface.name} up")
    if iface.gateway:
        inside.append(f"route add default via {iface.gateway} dev {iface.name}")
    _run([*_inside(pid), "-batch", "-"], what, pd_id, "\n".join(inside) + "\n")
    return host


def detach(host: str) -> None:
    """Remove a host-side interface (gone already when the PD's namespace went: nothing to do)."""
    if exists(host):
        subprocess.run([_ip(), "link", "del", host], capture_output=True)


# -- host bridges --------------------------------------------------------------------------------
def create_bridge(name: str, subnet: str, nat: bool = False) -> None:
    """A host bridge with the subnet's first address (like `virsh net-define` + `net-start`)."""
    what = f"net create {name}"
    check_ifname(name, what)
    try:
        network = ipaddress.ip_network(subnet)
    except ValueError as e:
        raise InvalidArgument(f"{what}: {subnet!r} is not a subnet like 10.7.0.0/24 ({e})") from None
    if network.num_addresses < 4:
        raise InvalidArgument(f"{what}: {subnet} is too small for a gateway and PDs")
    if exists(name):
        raise InvalidArgument(f"{what}: an interface named {name} exists already")
    ip = _ip()
    _run([ip, "link", "add", name, "type", "bridge"], what, 0)
    try:
        _run([ip, "addr", "add", f"{next(network.hosts())}/{network.prefixlen}", "dev", name], what, 0)
        _run([ip, "link", "set", name, "up"], what, 0)
        if nat:
            _nat(name, str(network), "-A")
    except BaseException:
        subprocess.run([ip, "link", "del", name], capture_output=True)
        raise


def destroy_bridge(name: str, subnet: str | None = None, nat: bool = False) -> None:
    what = f"net destroy {name}"
    check_ifname(name, what)
    if nat and subnet:
        _nat(name, subnet, "-D")
    if exists(name):
        _run([_ip(), "link", "del", name], what, 0)


class HostBridges:
    """The host-network part of a driver whose host (or dom0) is Linux: `bmi net` networks are bridges."""

    def create_network(self, name: str, subnet: str, nat: bool) -> None:
        create_bridge(name, subnet, nat)

    def destroy_network(self, name: str, subnet: str, nat: bool) -> None:
        destroy_bridge(name, subnet, nat)

    def restore_network(self, name: str, subnet: str, nat: bool) -> None:
        if not exists(name):        # still there: the running PDs' interfaces are still in it
            create_bridge(name, subnet, nat)


def _nat(name: str, subnet: str, op: str) -> None:
    """Forwarding and masquerade for a bridge's subnet (changes the host's firewall: never in tests)."""
    iptables = shutil.which("iptables") or shutil.which("iptables", path="/usr/sbin:/sbin")
    if iptables is None:
        raise NotSupported(f"net {name} --nat needs iptables")
    if op == "-A":
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
    _run([iptables, "-t", "nat", op, "POSTROUTING", "-s", subnet, "!", "-o", name, "-j", "MASQUERADE"],
         f"net {name} nat", 0)
