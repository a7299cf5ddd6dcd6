"""Statically linked hostile PDs (tests/images/hostile.c) try to break out; each attack must fail.

Each test also checks the attack could have been seen: a listener that would
have accepted, a file that exists on the host, a victim that must survive.
"""
from __future__ import annotations

import ctypes
import os
import socket
import time

import pytest

import bmi
from bmi import ConnectionPolicy, ConnectionType as CT, PDDescription
from tests.channel.progs import lines, run_pd, wait_console

MB = 1 << 20


def attack(mgr, *argv: str, mem: int = 32 * MB, timeout: float = 30.0) -> dict[str, list[str]]:
    """Run one attack in a fresh PD; its console as {what: [results]}."""
    return lines(run_pd(mgr, "hostile", list(argv), mem=mem), timeout)


def first(out: dict[str, list[str]], key: str) -> str:
    assert key in out, out
    return out[key][0]


def victim(mgr) -> bmi.PDController:
    return run_pd(mgr, "chanpeer", ["sleep", "60000"])


def host_pid(mgr, pd: bmi.PDController) -> int:
    return mgr._pds[pd.get_pd_id()].handle.run.pid


def assert_alive(pd: bmi.PDController) -> None:
    assert pd.get_current_status() is bmi.PDStatus.RUNNING


def listener(family: int, addr) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind(addr)
    s.listen(4)
    s.setblocking(False)
    return s


def assert_no_caller(s: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        s.accept()[0].close()


# -- the network -------------------------------------------------------------------------------
def test_ipv4_to_the_hosts_loopback(mgr):
    with listener(socket.AF_INET, ("127.0.0.1", 0)) as s:
        out = attack(mgr, "inet", "127.0.0.1", str(s.getsockname()[1]))
        assert first(out, "inet") in ("ENETUNREACH", "ECONNREFUSED")   # its own loopback, down
        assert_no_caller(s)


def test_ipv4_to_the_outside(mgr):
    assert first(attack(mgr, "inet", "192.0.2.1", "80"), "inet") == "ENETUNREACH"


def test_ipv6_to_the_hosts_loopback(mgr):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        s = listener(socket.AF_INET6, ("::1", 0))
    except OSError as e:
        pytest.skip(f"cannot listen on ::1 here: {e}")
    with s:
        out = attack(mgr, "inet6", "::1", str(s.getsockname()[1]))
        assert first(out, "inet6") in ("ECONNREFUSED", "ENETUNREACH", "EADDRNOTAVAIL")
        assert_no_caller(s)


def test_abstract_unix_socket_of_the_host(mgr):
    name = f"bmi-attack-{os.getpid()}"
    with listener(socket.AF_UNIX, "\0" + name) as s:
        out = attack(mgr, "abstract", name)
        assert first(out, "abstract") in ("ECONNREFUSED", "EPERM")
        assert_no_caller(s)


def test_netlink_sees_only_its_own_namespace(mgr):
    host = sorted(os.listdir("/sys/class/net"))
    assert host != ["lo"], "the host needs an interface besides lo for this test to mean anything"
    assert first(attack(mgr, "netlink"), "netlink").split() == ["lo"]


# -- the host's files and devices ----------------------------------------------------------------
def test_read_host_files(mgr):
    assert os.path.exists("/etc/shadow")
    out = lines(run_pd(mgr, "hostile", ["read", "/etc/shadow"]))
    assert first(out, "read") == "ENOENT"


def test_write_host_files(mgr):
    target = f"/etc/bmi-attack-{os.getpid()}"
    first(attack(mgr, "write", target), "write")
    assert not os.path.exists(target)


def test_mount_unshare_chroot_devices(mgr):
    out = attack(mgr, "escape")
    got = {k: v[0] for k, v in out.items()}
    # /proc/1/ns/net is the PD's own init's namespace (opening it is harmless: setns is denied)
    assert got.pop("setns") in ("ok", "EACCES", "EPERM")
    assert got == {"mount": "EPERM", "unshare": "EPERM", "chroot": "EPERM", "tpm": "ENOENT", "kmsg": "ENOENT",
                   "mknod": "EACCES"}


def test_root_of_its_namespaces_has_no_capabilities(mgr):
    """Namespaced admin powers (netfilter, raw sockets, ...) are kernel surface a PD does not get."""
    got = {k: v[0] for k, v in attack(mgr, "privileged").items()}
    assert got == {"raw": "EPERM", "ifflags": "EPERM", "bind80": "EACCES", "hostname": "EPERM", "dac": "EACCES"}
    # the same attack where the PD's config keeps the capabilities: each would have worked
    pd = run_pd(mgr, "hostile", ["privileged"], start=False)
    pd.set_config_param("/boot/capabilities", "all")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    assert {k: v[0] for k, v in lines(pd).items()} == dict.fromkeys(got, "ok")


def test_a_pd_keeps_only_the_capabilities_it_is_given(mgr):
    pd = run_pd(mgr, "hostile", ["privileged"], start=False)
    pd.set_config_param("/boot/capabilities", "CAP_NET_RAW, net_bind_service")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    got = {k: v[0] for k, v in lines(pd).items()}
    assert got == {"raw": "ok", "ifflags": "EPERM", "bind80": "ok", "hostname": "EPERM", "dac": "EACCES"}
    with pytest.raises(bmi.InvalidArgument, match="'cap_fly' is not a Linux capability"):
        pd.set_config_param("/boot/capabilities", "net_raw cap_fly")


# -- other PDs and the host's processes -------------------------------------------------------------
def test_see_other_pds_or_the_host(mgr):
    v = victim(mgr)
    seen = first(attack(mgr, "procs"), "procs").split()
    assert str(host_pid(mgr, v)) not in seen and str(os.getpid()) not in seen
    assert all(int(p) < 10 for p in seen), seen          # its own pid namespace only
    assert_alive(v)


def test_signal_another_pd(mgr):
    v = victim(mgr)
    assert first(attack(mgr, "kill", str(host_pid(mgr, v))), "kill") == "ESRCH"
    assert_alive(v)


def test_signal_its_own_init(mgr):
    assert first(attack(mgr, "kill", "1"), "kill") == "EPERM"


def test_signal_the_host(mgr):
    assert first(attack(mgr, "kill", str(os.getpid())), "kill") == "ESRCH"


def test_ptrace_another_pd(mgr):
    v = victim(mgr)
    assert first(attack(mgr, "ptrace", str(host_pid(mgr, v))), "ptrace") == "EPERM"
    assert first(attack(mgr, "ptrace", "1"), "ptrace") == "EPERM"
    assert_alive(v)


# -- shared memory and IPC of others ---------------------------------------------------------------
def test_sysv_shared_memory_of_the_host(mgr):
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x6d690000 + os.getpid() % 0xffff
    shmid = libc.shmget(key, 4096, 0o1666)               # IPC_CREAT | 0666
    assert shmid >= 0
    try:
        assert first(attack(mgr, "sysv", hex(key)), "sysv") == "ENOENT"
    finally:
        libc.shmctl(shmid, 0, None)                      # IPC_RMID


def test_posix_shared_memory_of_the_host(mgr):
    name = f"bmi-attack-{os.getpid()}"
    path = f"/dev/shm/{name}"
    with open(path, "w") as f:
        f.write("secret")
    try:
        assert first(attack(mgr, "posixshm", name), "posixshm") == "ENOENT"
    finally:
        os.unlink(path)


# -- the channel -------------------------------------------------------------------------------------
def test_forge_identity_in_the_message(mgr):
    v = victim(mgr)
    vid = v.get_pd_id()
    forged = f'{{"jsonrpc":"2.0","id":1,"method":"get_config_param","params":{{"pd":{vid},"name":"/boot/cmdline"}},' \
             f'"caller":{vid}}}'
    out = attack(mgr, "raw", forged)
    assert '"code":-32600' in first(out, "raw")          # unknown members are refused outright
    out = attack(mgr, "call", "get_config_param", f'{{"pd":{vid},"name":"/boot/cmdline"}}')
    assert first(out, "call").startswith("-32004")
    out = attack(mgr, "call", "set_allowed_connections",
                 f'{{"pd":0,"tid":{vid},"policies":[{{"con_type":"IPC","mode":3}}]}}')
    assert first(out, "call").startswith("-32004")
    assert_alive(v)


def test_grant_itself_a_connection(mgr):
    v = victim(mgr)
    pd = run_pd(mgr, "hostile", ["call", "set_allowed_connections",
                                 f'{{"tid":{v.get_pd_id()},"policies":[{{"con_type":"IPC","mode":3}}]}}'])
    assert first(lines(pd), "call").startswith("-32004")
    assert pd.get_allowed_connections(v.get_pd_id()) == []


def test_connect_without_policy(mgr):
    v = victim(mgr)
    out = attack(mgr, "call", "connect", f'{{"tid":{v.get_pd_id()},"con_type":"IPC","mode":3}}')
    assert first(out, "call").startswith("-32004")
    assert v.get_runtime_param("/interfaces/connections") == ""


def test_write_on_a_read_connection(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", "5000", "+", "recv", "500"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "1", "0", "+", "send", "evil"], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.READ)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    assert lines(a)["send"] == ["EPIPE"]
    assert lines(b)["recv"][0] in ("EOF", "timeout")


def test_keep_using_a_connection_after_revocation(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", "5000", "+", "wait", "/test/step", "1", "5000", "+", "recv", "2000"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "STREAM", "3", "0", "+", "print", "in",
                                 "+", "wait", "/test/step", "1", "5000", "+", "send", "still-here"], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.STREAM, bmi.RW)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    wait_console(a, "print: in")
    wait_console(b, "accept: ok")
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=True)
    a.set_config_param("/test/step", "1")
    b.set_config_param("/test/step", "1")
    assert lines(a)["send"] == ["EPIPE"]
    assert lines(b)["recv"] == ["EOF"]


def test_flood_the_channel(mgr, as_pd_client):
    other, client = as_pd_client
    pd = run_pd(mgr, "hostile", ["flood", "200000", "300"])
    wait_console(pd, "flood:")
    worst = 0.0
    for _ in range(20):                                  # the layer keeps answering another PD
        t0 = time.monotonic()
        assert client.get_version() == 1
        worst = max(worst, time.monotonic() - t0)
    assert worst < 1.0, worst
    out = lines(pd)
    sent, again = (int(x.split("=")[1]) for x in first(out, "flood").split()[:2])
    assert again > 0 or first(out, "flood").endswith("broken=1")   # it was pushed back, not served forever
    assert first(out, "after") in ("-32011", "0", "-1")             # busy, answered, or dropped


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_the_channel(mgr, as_pd_client, seed):
    other, client = as_pd_client
    out = first(attack(mgr, "fuzz", str(seed), "300"), "fuzz")
    counts = dict(x.split("=") for x in out.split())
    assert int(counts["results"]) == 0 or int(counts["errors"]) > 0, out
    assert int(counts["errors"]) > 0 or counts["closed"] == "1", out
    assert client.get_version() == 1                     # the layer is fine


def test_fork_bomb(mgr):
    v = victim(mgr)
    pd = run_pd(mgr, "hostile", ["forkbomb", "2"])
    out = lines(pd)
    if pd.get_current_status() is bmi.PDStatus.CRASHED:
        assert pd.get_runtime_param("/system/exit-reason") == "oom"     # its memory limit ended it first
    else:
        forks, failed = (int(x.split("=")[1]) for x in first(out, "forkbomb").split())
        assert forks < 1024 and failed > 0, out          # pids.max held it
    assert_alive(v)
    assert int(v.get_runtime_param("/system/pids/current")) <= 3


def test_fork_bomb_against_a_tight_pids_limit(mgr):
    v = victim(mgr)
    pd = run_pd(mgr, "hostile", ["forkbomb", "2"], mem=128 * MB, start=False)
    pd.set_runtime_param("/system/pids/max", "32")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    forks, failed = (int(x.split("=")[1]) for x in first(lines(pd), "forkbomb").split())
    assert forks <= 32 and failed > 0
    assert_alive(v)


def test_memory_bomb(mgr):
    v = victim(mgr)
    pd = run_pd(mgr, "hostile", ["membomb"], mem=24 * MB)
    assert pd.wait(30) is bmi.PDStatus.CRASHED
    assert pd.get_runtime_param("/system/exit-reason") == "oom"
    assert_alive(v)


def test_child_pd_beyond_the_parents_memory(mgr):
    pd = run_pd(mgr, "hostile", ["call", "allocate_pd", f'{{"mem":{64 * MB}}}'], mem=32 * MB)
    assert first(lines(pd), "call").startswith("-32006")
    assert mgr.list_pd() == [0, pd.get_pd_id()]


def test_name_a_child_to_take_over_the_admins_terminal(mgr, as_pd_client):
    """A PD names the child it made with an ANSI escape (clear the screen, fake a line of `bmi list`), a bidi
    override, a newline: each is refused, and the name the admin sees is the one it had."""
    other, client = as_pd_client
    child = client.allocate_pd(PDDescription(mem=8 * MB))
    child.set_config_param("/name", "worker")
    for name in ("\x1b[2J\x1b[H1  web  RUNNING", "txt.exe\u202e", "a\nb", "\x9b2J", "w" * 256):
        with pytest.raises(bmi.InvalidArgument, match=f"set_config_param /name of PD {child.get_pd_id()}: "):
            child.set_config_param("/name", name)
    assert mgr.get_controller(child.get_pd_id()).get_config_param("/name") == "worker"
    assert [row["name"] for row in mgr.describe() if row["pd"] == child.get_pd_id()] == ["worker"]


def test_swell_a_childs_config_to_stall_the_layer(mgr, as_pd_client):
    """A PD pours 60 KB values into the config of the child it made (bmid would write all of it at every change
    of that child): refused past the limit, with room again once a value is emptied."""
    from bmi.api import MAX_PD_CONFIG
    other, client = as_pd_client
    child = client.allocate_pd(PDDescription(mem=8 * MB))
    value = "x" * 60000
    stored = 0
    with pytest.raises(bmi.ResourceError, match=f"its config would hold .* more than the {MAX_PD_CONFIG} a PD"):
        for i in range(MAX_PD_CONFIG // len(value) + 1):
            child.set_config_param(f"/junk/{i}", value)
            stored += 1
    assert stored == MAX_PD_CONFIG // (len(value) + len("/junk/0"))
    controller = mgr.get_controller(child.get_pd_id())
    assert controller.get_config_param(f"/junk/{stored - 1}") == value
    child.set_config_param("/junk/0", "")
    child.set_config_param(f"/junk/{stored}", value)           # room again
    assert client.get_version() == 1


@pytest.fixture
def as_pd_client(mgr):
    """Another PD's channel, used from here to check the layer still answers."""
    import bmi.pd
    other = mgr.allocate_pd(PDDescription(mem=32 * MB))
    fd = mgr.channels().open(other.get_pd_id())
    client = bmi.pd.open(fd)
    os.close(fd)
    yield other, client
    client.close()
