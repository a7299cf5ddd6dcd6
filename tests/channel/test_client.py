"""The Python client (bmi.pd) against the real server, on real PDs' channels."""
from __future__ import annotations

import mmap
import os
import socket

import pytest

import bmi
import bmi.pd
from bmi import ConnectionPolicy, ConnectionType as CT, PDDescription
from bmi.channel import connections, protocol
from tests.channel.progs import build, run_pd

MB = 1 << 20


def test_pd_uri_outside_a_pd_says_why(monkeypatch):
    monkeypatch.delenv("BMI_CHANNEL_FD", raising=False)
    with pytest.raises(bmi.NotSupported, match="BMI_CHANNEL_FD is not set"):
        bmi.open("pd:///")


def test_pd_uri_opens_the_channel_named_by_the_environment(mgr, monkeypatch):
    pd = mgr.allocate_pd(PDDescription(mem=32 * MB))
    fd = mgr.channels().open(pd.get_pd_id())
    try:
        monkeypatch.setenv("BMI_CHANNEL_FD", str(fd))
        with bmi.open("pd:///") as client:
            assert client.get_version() == 1
            assert client.get_controller().get_pd_id() == pd.get_pd_id()
    finally:
        os.close(fd)


def test_a_pd_controls_itself_read_only_and_nothing_else(mgr, as_pd):
    a = mgr.allocate_pd(PDDescription(mem=32 * MB))
    b = mgr.allocate_pd(PDDescription(mem=32 * MB))
    a.set_config_param("/app/name", "alpha")
    client = as_pd(a)
    me = client.get_controller()
    assert me.get_config_param("/app/name") == "alpha"
    assert me.get_runtime_param("/system/memory/max") == str(32 * MB)
    assert client.list_pd() == [a.get_pd_id()]
    for call in (lambda: client.get_controller(b.get_pd_id()), lambda: client.get_controller(0),
                 lambda: client.get_device_manager(), lambda: me.set_config_param("/app/name", "x"),
                 lambda: me.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC)]),
                 lambda: me.set_runtime_param("/system/memory/current", str(32 * MB)),
                 lambda: me.destroy(), lambda: me.request_status_change("RUNNING")):
        with pytest.raises((bmi.PermissionDenied, bmi.NotSupported)):
            call()
    assert a.get_config_param("/app/name") == "alpha"
    assert a.get_allowed_connections(b.get_pd_id()) == []


def test_child_pds_take_memory_out_of_the_parent_and_die_with_it(mgr, as_pd):
    a = mgr.allocate_pd(PDDescription(mem=64 * MB))
    client = as_pd(a)
    with pytest.raises(bmi.ResourceError, match="more than the parent has left"):
        client.allocate_pd(PDDescription(mem=62 * MB))
    with pytest.raises(bmi.PermissionDenied, match=r"cpu: 2 is above its parent PD \d+'s own /system/cpu/current \(1\)"):
        client.allocate_pd(PDDescription(mem=8 * MB, cpu=64))
    child = client.allocate_pd(PDDescription(mem=16 * MB))
    assert a.get_runtime_param("/system/memory/current") == str(48 * MB)
    with pytest.raises(bmi.InvalidArgument):       # the parent's controller cannot hand it back twice
        a.set_runtime_param("/system/memory/current", str(64 * MB))
    grandchild = client.get_controller(child.get_pd_id())
    assert client.list_pd() == [a.get_pd_id(), child.get_pd_id()]
    assert mgr.get_controller(child.get_pd_id()).get_runtime_param("/system/parent") == str(a.get_pd_id())
    child.setup_pd(bmi.FileImage(str(build("chanpeer"))))
    child.set_config_param("/boot/cmdline", "chanpeer id")
    child.request_status_change("RUNNING")
    assert grandchild.get_current_status() in (bmi.PDStatus.RUNNING, bmi.PDStatus.SHUTDOWN)
    a.destroy()
    assert child.get_pd_id() not in mgr.list_pd()


def test_destroying_a_child_gives_its_memory_back(mgr, as_pd):
    a = mgr.allocate_pd(PDDescription(mem=64 * MB))
    client = as_pd(a)
    child = client.allocate_pd(PDDescription(mem=16 * MB))
    child.destroy()
    assert a.get_runtime_param("/system/memory/current") == str(64 * MB)
    assert client.list_pd() == [a.get_pd_id()]


def test_a_pd_grants_its_children_only_what_it_has(mgr, as_pd):
    a = mgr.allocate_pd(PDDescription(mem=64 * MB))
    b = mgr.allocate_pd(PDDescription(mem=32 * MB))
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.READ)])
    client = as_pd(a)
    child = client.allocate_pd(PDDescription(mem=16 * MB))
    child.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.READ)])
    with pytest.raises(bmi.PermissionDenied, match="cannot grant IPC mode 3"):
        child.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    child.set_allowed_connections(a.get_pd_id(), [ConnectionPolicy(CT.SHM, bmi.RW)])    # its own subtree
    assert child.get_allowed_connections(b.get_pd_id()) == [ConnectionPolicy(CT.IPC, bmi.READ)]


def test_connect_and_accept_between_two_clients(mgr, as_pd):
    a = mgr.allocate_pd(PDDescription(mem=32 * MB))
    b = mgr.allocate_pd(PDDescription(mem=32 * MB))
    ca, cb = as_pd(a), as_pd(b)
    assert cb.accept(timeout=0) is None
    with pytest.raises(bmi.PermissionDenied):
        ca.connect(b.get_pd_id(), CT.SHM, bmi.RW, size=4096)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.SHM, bmi.WRITE)])
    with pytest.raises(bmi.InvalidArgument, match="SHM needs a size"):
        ca.connect(b.get_pd_id(), CT.SHM, bmi.WRITE)
    with ca.connect(b.get_pd_id(), CT.SHM, bmi.WRITE, size=8192) as mine, cb.accept(timeout=5) as theirs:
        assert (theirs.peer, theirs.con_type, theirs.mode, theirs.size) == (a.get_pd_id(), CT.SHM, bmi.WRITE, 8192)
        with mmap.mmap(mine.fd, 8192) as m:
            m[:5] = b"hello"
        with mmap.mmap(theirs.fd, 8192, prot=mmap.PROT_READ) as m:
            assert m[:5] == b"hello"
        with pytest.raises(PermissionError):
            mmap.mmap(theirs.fd, 8192)           # the destination of a WRITE connection only reads
        with pytest.raises(OSError):
            os.ftruncate(mine.fd, 1 << 20)       # sealed: the size is fixed
    assert a.get_runtime_param("/interfaces/connections").endswith(f" to {b.get_pd_id()} SHM WRITE 8192")
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=True)
    assert a.get_runtime_param("/interfaces/connections") == ""


def test_connections_wait_for_accept_in_a_bounded_queue(mgr, as_pd):
    a = mgr.allocate_pd(PDDescription(mem=32 * MB))
    b = mgr.allocate_pd(PDDescription(mem=32 * MB))
    ca, cb = as_pd(a), as_pd(b)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.EVENT, bmi.RW)])
    made = [ca.connect(b.get_pd_id(), CT.EVENT) for _ in range(16)]
    with pytest.raises(bmi.ResourceError, match="has not accepted"):
        ca.connect(b.get_pd_id(), CT.EVENT)
    assert b.get_runtime_param("/interfaces/connections").count("pending") == 16
    got = cb.accept(timeout=1)
    s = made[0].socket()
    s.send((1).to_bytes(8, "little"))
    assert int.from_bytes(got.socket().recv(8), "little") == 1
    s.close()
    for c in made[1:]:
        c.close()


def test_a_pd_connecting_in_a_loop_is_bounded_until_it_revokes(mgr, as_pd, monkeypatch):
    """Closing both ends does not end a connection (the layer holds an fd for its revocation), so a PD
    that connects, accepts and closes in a loop is refused after SOURCE_LIMIT, saying what to do; a
    revocation gives the room back.  The bound is the source's: its peer may still open its own."""
    monkeypatch.setattr(connections, "SOURCE_LIMIT", 4)
    a = mgr.allocate_pd(PDDescription(mem=32 * MB))
    b = mgr.allocate_pd(PDDescription(mem=32 * MB))
    ca, cb = as_pd(a), as_pd(b)
    ipc = [ConnectionPolicy(CT.IPC, bmi.RW)]
    a.set_allowed_connections(b.get_pd_id(), ipc)
    b.set_allowed_connections(a.get_pd_id(), ipc)

    def once(src, dst, dst_pd) -> None:
        mine = src.connect(dst_pd.get_pd_id(), CT.IPC)
        theirs = dst.accept(timeout=5)
        mine.close()
        theirs.close()

    for _ in range(4):
        once(ca, cb, b)
    with pytest.raises(bmi.ResourceError, match=f"PD {a.get_pd_id()} has 4 live connections it opened.*revoke"):
        ca.connect(b.get_pd_id(), CT.IPC)
    once(cb, ca, a)                                 # b's own connections are not a's
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=True)
    a.set_allowed_connections(b.get_pd_id(), ipc)
    once(ca, cb, b)


def test_pds_of_many_sources_together_are_bounded_by_the_layers_fd_limit(mgr, as_pd, monkeypatch):
    """Each source's bound (SOURCE_LIMIT) times many sources could still run the layer out of fds (bmid's store
    then fails and bmid stops): past live_limit() live connections of all PDs, a connect is refused saying
    why, and a revocation gives the room back."""
    monkeypatch.setattr(connections, "live_limit", lambda: 6)
    a, b, c = (mgr.allocate_pd(PDDescription(mem=32 * MB)) for _ in range(3))
    ca, cb, cc = as_pd(a), as_pd(b), as_pd(c)
    ipc = [ConnectionPolicy(CT.IPC, bmi.RW)]
    for source in (a, c):
        source.set_allowed_connections(b.get_pd_id(), ipc)

    def once(src) -> None:
        mine = src.connect(b.get_pd_id(), CT.IPC)
        theirs = cb.accept(timeout=5)
        mine.close()
        theirs.close()

    for src in (ca, ca, ca, ca, cc, cc):
        once(src)
    with pytest.raises(bmi.ResourceError, match="the layer holds 6 live connections, all its fd limit allows"):
        cc.connect(b.get_pd_id(), CT.IPC)
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=True)     # a's four go
    for _ in range(4):
        once(cc)


def test_layer_errors_arrive_as_typed_exceptions(mgr, as_pd):
    a = mgr.allocate_pd(PDDescription(mem=32 * MB))
    channel = as_pd(a)._channel
    with pytest.raises(bmi.NotSupported, match="no method 'reboot_host'"):
        channel.value("reboot_host")
    with pytest.raises(bmi.InvalidArgument, match="unexpected"):
        channel.value("get_version", pd=1)
    with pytest.raises(bmi.InvalidArgument, match="expected an int"):
        channel.value("set_priority", pd=a.get_pd_id(), priority="high")
    with pytest.raises(bmi.InvalidArgument):
        channel.value("connect", tid=a.get_pd_id(), con_type="TELEPATHY", mode=3)


def test_restarting_a_pd_gives_it_a_new_channel_and_cuts_the_old_connections(mgr, as_pd):
    b = mgr.allocate_pd(PDDescription(mem=32 * MB))
    a = run_pd(mgr, "chanpeer", ["sleep", "30000"])
    cb = as_pd(b)
    ca = as_pd(a)         # replaces the channel the program got: the program's fd 3 now sees EOF
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    conn = ca.connect(b.get_pd_id(), CT.IPC)
    peer = cb.accept(timeout=1).socket()
    a.request_status_change("RESTARTING")
    assert peer.recv(10) == b""
    with pytest.raises(bmi.ResourceError, match="channel (failed|closed)"):
        ca.get_version()
    peer.close()
    conn.close()


def test_server_answers_raw_garbage_with_errors(mgr):
    a = mgr.allocate_pd(PDDescription(mem=32 * MB))
    fd = mgr.channels().open(a.get_pd_id())
    sock = socket.socket(fileno=fd)
    try:
        for junk in (b"", b"{", b"[]", b'{"jsonrpc":"2.0"}', b'{"jsonrpc":"2.0","id":1,"method":7}',
                     b"\xff\xfe", b"[" * 60000, b'{"jsonrpc":"2.0","id":true,"method":"get_version"}'):
            sock.send(junk or b" ")
            reply = protocol.decode(sock.recv(70000))
            assert reply["error"]["code"] in (protocol.PARSE_ERROR, protocol.INVALID_REQUEST), junk[:20]
        sock.send(b'{"jsonrpc":"2.0","id":"x","method":"get_version"}')
        assert protocol.decode(sock.recv(70000)) == {"jsonrpc": "2.0", "id": "x", "result": 1}
    finally:
        sock.close()


def test_a_pd_loads_a_childs_image_through_the_one_copy_path(mgr, as_pd):
    """Inside a PD, setup_pd of a PDImage that is no file goes through the shared handover (handover_fd):
    progress reaches the end, the measurement is of the bytes given, and a misbehaving image gets the
    typed error session mode gives, not an OSError, with nothing sent to the layer."""
    import hashlib

    parent = mgr.allocate_pd(PDDescription(mem=64 * MB))
    child = as_pd(parent).allocate_pd(PDDescription(mem=16 * MB))
    data = build("chanpeer").read_bytes()
    seen = []
    child.setup_pd(bmi.BytesImage(data), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(data), len(data))
    assert mgr.get_controller(child.get_pd_id()).measurement()["sha256"] == hashlib.sha256(data).digest()

    class Short(bmi.BytesImage):
        def get_image_size(self) -> int:
            return len(self.data) + 4096         # claims more than get_data gives

    with pytest.raises(bmi.ImageError, match=rf"of PD {child.get_pd_id()}: get_data returned no data"):
        child.setup_pd(Short(data))
    with pytest.raises(bmi.InvalidArgument, match="progress must be callable"):
        child.setup_pd(bmi.BytesImage(data), progress=3)
    assert mgr.get_controller(child.get_pd_id()).get_current_status() is bmi.PDStatus.READY


def test_a_lowered_priority_reaches_every_descendant_and_a_destroyed_one_no_more(mgr, as_pd):
    """The manager finds a PD's children from an index it keeps with allocate and destroy: a lowered limit
    reaches the grandchild, a destroyed child leaves the tree, and its parent's tree is the rest."""
    a = mgr.allocate_pd(PDDescription(mem=64 * MB))
    a.set_priority(5)
    client = as_pd(a)
    child, sibling = client.allocate_pd(PDDescription(mem=16 * MB)), client.allocate_pd(PDDescription(mem=16 * MB))
    grandchild = as_pd(mgr.get_controller(child.get_pd_id())).allocate_pd(PDDescription(mem=8 * MB))
    for pd in (child, sibling, grandchild):
        mgr.get_controller(pd.get_pd_id()).set_priority(5)
    a.set_priority(2)
    assert [mgr.get_controller(pd.get_pd_id()).get_priority() for pd in (child, sibling, grandchild)] == [2, 2, 2]
    child.destroy()
    assert grandchild.get_pd_id() not in mgr.list_pd() and sibling.get_pd_id() in mgr.list_pd()
    a.set_priority(1)
    assert mgr.get_controller(sibling.get_pd_id()).get_priority() == 1
    a.destroy()
    assert sibling.get_pd_id() not in mgr.list_pd()
