"""Attacks through the sockets bmi hands to PDs (tests/images/chanpeer.c), and kernel surface a PD is refused.

- A name bound on a channel or connection end lands in bmi's empty network
  namespace, never the host's (squatting X11/D-Bus-style abstract names).
- Connection ends carry no fds, so colluding PDs cannot build a write path
  past a READ policy or past revocation (SO_PASSRIGHTS, held off by seccomp).
- io_uring is refused unless the PD's /boot/allow lists it.
"""
from __future__ import annotations

import os
import socket

import pytest

import bmi
from bmi import ConnectionPolicy, ConnectionType as CT
from bmi.channel.sockets import SO_PASSRIGHTS, fd_passing_refusable
from tests.channel.progs import lines, run_pd, step, wait_console
from tests.security.test_hostile import attack, first

W = "15000"    # ms: generous for a loaded host; only a failing test waits it out


def host_abstract_names() -> set[str]:
    """The abstract names bound in the host's network namespace (this process's), as "@name"."""
    with open("/proc/net/unix") as f:
        next(f)
        return {parts[7] for line in f if len(parts := line.split()) > 7 and parts[7].startswith("@")}


def assert_not_on_the_host(name: str) -> None:
    """Nobody on the host can reach `name`, and the host may bind it itself: the PD squats nothing here."""
    assert "@" + name not in host_abstract_names()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(ConnectionRefusedError):
            s.connect("\0" + name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind("\0" + name)              # EADDRINUSE if the PD's bind had landed in the host's namespace


def bound(pd: bmi.PDController) -> str:
    """The name a PD's `bindabs` reported (it must have succeeded: the attack was made)."""
    text = wait_console(pd, "bindabs: ")
    result = next(line for line in text.splitlines() if line.startswith("bindabs: ")).split(": ", 1)[1]
    assert result.startswith("ok @"), text
    return result[len("ok @"):]


def test_abstract_name_bound_on_the_channel_is_not_the_hosts(mgr):
    name = f"/tmp/.X11-unix/X{os.getpid()}"
    pd = run_pd(mgr, "chanpeer", ["bindabs", "chan", name, "+", "wait", "/test/step", "done", W])
    assert bound(pd) == name
    assert_not_on_the_host(name)
    step(pd, "done")
    lines(pd)


def test_abstract_and_autobind_names_on_a_stream_connection_are_not_the_hosts(mgr):
    name = f"bmi-squat-{os.getpid()}"
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "bindabs", "conn", "-", "+", "wait", "/test/step", "done", W])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "STREAM", "3", "0", "+", "bindabs", "conn", name,
                                 "+", "wait", "/test/step", "done", W], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.STREAM, bmi.RW)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    assert bound(a) == name
    autobound = bound(b)
    assert autobound and autobound != name
    assert_not_on_the_host(name)
    assert "@" + autobound not in host_abstract_names()
    for pd in (a, b):
        step(pd, "done")
        lines(pd)


def test_colluding_pds_cannot_pass_a_socket_past_read_only_and_revocation(mgr):
    """A may only READ from B; B hands A one end of its own socketpair over the connection for A to write to."""
    if not fd_passing_refusable():
        pytest.skip(f"this kernel ({os.uname().release}) has no SO_PASSRIGHTS (Linux 6.16+): connections can "
                    f"carry fds, as /capability/connections/fd-passing says")
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "passfd", "+", "siderecv", "3000", "+",
                                 "wait", "/test/step", "revoked", W, "+", "siderecv", "3000", "+", "passfd"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "1", "0", "+", "recvfd", "3000", "+",
                                 "sidesend", "before", "+", "wait", "/test/step", "revoked", W, "+",
                                 "sidesend", "after"], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.READ)])
    assert a.get_runtime_param("/capability/connections/fd-passing").startswith("refused")
    a.request_status_change(bmi.PDStatus.RUNNING)
    wait_console(b, "siderecv: ")
    wait_console(a, "sidesend: ")
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=True)
    assert a.get_runtime_param("/interfaces/connections") == ""
    step(a, "revoked")
    step(b, "revoked")
    oa, ob = lines(a), lines(b)
    assert ob["passfd"] == ["EPERM", "EPIPE"]            # A's end refuses fds; after the cut nothing goes at all
    assert oa["recvfd"] == ["timeout"]
    assert oa["sidesend"] == ["EBADF", "EBADF"]         # A never got a socket to write to B through
    assert ob["siderecv"] == ["EOF", "EOF"]             # the end B offered never left it


def test_so_passrights_cannot_be_turned_back_on(mgr):
    if not fd_passing_refusable():
        pytest.skip(f"this kernel ({os.uname().release}) has no SO_PASSRIGHTS (Linux 6.16+)")
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "wait", "/test/step", "done", W])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "3", "0", "+", "passrights", "conn", "1",
                                 "+", "passrights", "conn", "0", "+", "passrights", "chan", "1", "+",
                                 "print", "done", "+", "wait", "/test/step", "done", W], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    wait_console(a, "print: done")
    (conn,) = mgr._registry.live(a.get_pd_id())
    # the layer holds A's end (the source's: its shutdown revokes both): SO_PASSRIGHTS still off there
    assert [s.getsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS) for s in conn.held] == [0]
    for pd in (a, b):
        step(pd, "done")
    assert lines(a)["passrights"] == ["EPERM", "EPERM", "EPERM"]
    lines(b)


def test_io_uring_is_refused_unless_allowed(mgr):
    assert first(attack(mgr, "iouring"), "iouring") == "EPERM"
    with open("/proc/sys/kernel/io_uring_disabled") as f:
        host_disabled = f.read().strip() != "0"
    pd = run_pd(mgr, "hostile", ["iouring"], start=False)
    with pytest.raises(bmi.InvalidArgument, match="'fly' cannot be allowed"):
        pd.set_config_param("/boot/allow", "io_uring fly")
    pd.set_config_param("/boot/allow", "io_uring")
    # io_uring's socket commands set socket options where the seccomp filter does not look
    assert pd.get_runtime_param("/capability/connections/fd-passing").startswith("possible")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    got = first(lines(pd), "iouring")
    if host_disabled:
        pytest.skip(f"the host disables io_uring itself (kernel.io_uring_disabled): the PD got {got}")
    assert got == "ok"


@pytest.mark.parametrize("allowed", [False, True], ids=["io_uring-refused", "io_uring-allowed"])
def test_io_uring_turns_fd_passing_on_only_where_the_capability_says_so(mgr, allowed):
    """A turns SO_PASSRIGHTS on for its connection end through io_uring's setsockopt command, which the
    seccomp filter cannot see, and B passes it a socket.  Refused unless A's /boot/allow lists io_uring;
    where it does, fds do get in, and /capability/connections/fd-passing says exactly that (there is no
    way to restrict a PD's io_uring from outside it: IORING_REGISTER_RESTRICTIONS binds only a ring its
    creator registers them on).  Out of A they stay refused: B's end is untouched."""
    if not fd_passing_refusable():
        pytest.skip(f"this kernel ({os.uname().release}) has no SO_PASSRIGHTS (Linux 6.16+)")
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "wait", "/test/step", "go", W, "+", "passfd", "+",
                                 "recvfd", W])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "3", "0", "+",
                                 "uringpassrights", "conn", "1", "+", "print", "set", "+", "recvfd", "3000", "+",
                                 "passfd"], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    if allowed:
        a.set_config_param("/boot/allow", "io_uring")
    said = a.get_runtime_param("/capability/connections/fd-passing")
    a.request_status_change(bmi.PDStatus.RUNNING)
    wait_console(a, "print: set")
    step(b, "go")
    oa, ob = lines(a), lines(b)
    if not allowed:
        assert said.startswith("refused")
        assert (oa["uringpassrights"], ob["passfd"], oa["recvfd"]) == (["EPERM"], ["EPERM"], ["timeout"])
    else:
        assert said.startswith("possible into this PD") and "io_uring" in said, said
        if oa["uringpassrights"] == ["EPERM"] and _host_disables_io_uring():
            pytest.skip("the host disables io_uring itself (kernel.io_uring_disabled)")
        assert (oa["uringpassrights"], ob["passfd"], oa["recvfd"]) == (["ok"], ["ok"], ["ok"])
        assert b.get_runtime_param("/capability/connections/fd-passing").startswith("refused")
    assert (oa["passfd"], ob["recvfd"]) == (["EPERM"], ["EOF"])      # nothing goes from A to B


def _host_disables_io_uring() -> bool:
    with open("/proc/sys/kernel/io_uring_disabled") as f:
        return f.read().strip() != "0"


def test_sockets_kept_across_a_bmid_restart_stay_out_of_the_host(tmp_path):
    """bmid's fd keeper holds the channel and a pending connection end over a SIGKILL; they are still the empty
    namespace's sockets, and still refuse fds."""
    from tests.server.bmid import running_bmid
    names = [f"bmi-squat-{os.getpid()}-conn", f"bmi-squat-{os.getpid()}-chan"]
    with running_bmid(tmp_path) as daemon:
        with daemon.open() as mgr:
            c = run_pd(mgr, "chanpeer", ["print", "idle", "sleep", "2500", "+", "accept", "20000", "+",
                                         "bindabs", "conn", names[0], "+", "bindabs", "chan", names[1], "+",
                                         "passfd", "+", "wait", "/test/step", "done", "30000"])
            c_id = c.get_pd_id()
            a = run_pd(mgr, "chanpeer", ["connect", str(c_id), "IPC", "3", "0", "+", "print", "idle", "+",
                                         "recv", "40000"], start=False)
            a.set_allowed_connections(c_id, [ConnectionPolicy(CT.IPC, bmi.RW)])
            a.request_status_change(bmi.PDStatus.RUNNING)
            wait_console(a, "print: idle")
            assert c.get_runtime_param("/interfaces/connections").endswith(" pending")
        daemon.kill()
        daemon.start()
        with daemon.open() as mgr:
            c = mgr.get_controller(c_id)
            text = wait_console(c, "passfd: ", timeout=30)
            assert [line for line in text.splitlines() if line.startswith("bindabs: ")] == [
                f"bindabs: ok @{name}" for name in names]
            for name in names:
                assert_not_on_the_host(name)
            if fd_passing_refusable():
                assert "passfd: EPERM" in text
            step(c, "done")
            lines(c)


def test_a_pd_cannot_allow_its_child_io_uring_it_is_not_allowed_itself(mgr):
    call = ["call", "set_config_param", '{"pd":2,"name":"/boot/allow","value":"io_uring"}']
    parent = run_pd(mgr, "chanpeer", ["call", "allocate_pd", f'{{"mem":{16 << 20}}}', "+", *call], mem=64 << 20)
    got = lines(parent)["call"]
    assert got[0] == "ok 2" and got[1].startswith("error -32004 ") and "more than PD 1 is allowed itself" in got[1]
    with pytest.raises(bmi.InvalidArgument, match="not set"):
        mgr.get_controller(2).get_config_param("/boot/allow")
    # a parent allowed io_uring may pass it on
    allowed = run_pd(mgr, "chanpeer", ["call", "allocate_pd", f'{{"mem":{16 << 20}}}', "+",
                                       "call", "set_config_param", '{"pd":4,"name":"/boot/allow","value":"io_uring"}'],
                     mem=64 << 20, start=False)
    allowed.set_config_param("/boot/allow", "io_uring")
    allowed.request_status_change(bmi.PDStatus.RUNNING)
    assert lines(allowed)["call"] == ["ok 4", "ok null"]
    assert mgr.get_controller(4).get_config_param("/boot/allow") == "io_uring"
