"""accept on the real server: a waiting accept meets connect, ordering, timeouts, cuts, and a PD that abuses it.

The destination speaks the raw protocol on its channel here, so that it can
have several requests in flight (a PD's program may: ids tell the replies
apart).  Its accept is known to be waiting once the reply to a get_version
sent after it arrived: the server reads a channel's records in order and
registers an accept as it reads it.
"""
from __future__ import annotations

import select
import socket
import threading
import time

import pytest

import bmi
from bmi import ConnectionPolicy, ConnectionType as CT, PDDescription
from bmi.channel import protocol

MB = 1 << 20


class RawPD:
    """A PD's channel spoken by hand (the socket is the PD's identity, as for its own program)."""

    def __init__(self, mgr: bmi.PDManagement, pd: bmi.PDController):
        self.sock = socket.socket(fileno=mgr.channels().open(pd.get_pd_id()))
        self._ids = iter(range(1000, 10**6))

    def send(self, msg_id: object, method: str, params: dict) -> None:
        protocol.send(self.sock, protocol.request(msg_id, method, params))      # type: ignore[arg-type]

    def reply(self, timeout: float = 5) -> tuple[dict, list[int]]:
        assert select.select([self.sock], [], [], timeout)[0], f"no reply in {timeout} s"
        data, fds, whole = protocol.receive(self.sock)
        assert whole and data
        return protocol.decode(data), fds

    def settled(self) -> None:
        """Every request sent before this one has been read (and an accept among them registered)."""
        msg_id = next(self._ids)
        self.send(msg_id, "get_version", {})
        got, fds = self.reply()
        assert got["id"] == msg_id and not fds

    def quiet(self) -> bool:
        return not select.select([self.sock], [], [], 0)[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(mgr):
    made: list[RawPD] = []

    def make(pd: bmi.PDController) -> RawPD:
        made.append(RawPD(mgr, pd))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _pair(mgr):
    a, b = (mgr.allocate_pd(PDDescription(mem=32 * MB)) for _ in range(2))
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    return a, b


def test_a_waiting_accept_gets_its_end_from_the_connect_right_after_the_connecting_pds_reply(mgr, as_pd, raw,
                                                                                              monkeypatch):
    """The common pattern (a server PD blocked in accept): the thread that ran connect sends the connecting
    PD its reply and then the destination its end; no other thread of the layer is woken for it."""
    a, b = _pair(mgr)
    ca, rb = as_pd(a), raw(b)
    server = mgr.channels()
    sent: list[tuple[int, object, int]] = []
    send = server._send

    def recorded(ch, data, fds=()):
        sent.append((ch.pd_id, protocol.decode(data)["id"], threading.get_ident()))
        send(ch, data, fds)

    monkeypatch.setattr(server, "_send", recorded)
    rb.send(1, "accept", {"timeout": 30})
    rb.settled()
    sent.clear()
    mine = ca.connect(b.get_pd_id(), CT.IPC)
    got, fds = rb.reply()
    assert got["result"]["conn"] == mine.conn and got["result"]["source"] == a.get_pd_id() and len(fds) == 1
    # (the client then asks for its own id: a third record, later)
    assert [(pd, msg_id) for pd, msg_id, _ in sent[:2]] == [(a.get_pd_id(), 1), (b.get_pd_id(), 1)]
    assert sent[0][2] == sent[1][2]            # one thread: the one that ran connect
    assert b.get_runtime_param("/interfaces/connections") == f"{mine.conn} from {a.get_pd_id()} IPC RW"
    with socket.socket(fileno=fds[0]) as theirs, mine.socket() as ours:
        ours.send(b"ping")
        assert theirs.recv(10) == b"ping"


def test_waiting_accepts_take_connections_oldest_first(mgr, as_pd, raw):
    a, b = _pair(mgr)
    ca, rb = as_pd(a), raw(b)
    for msg_id in ("first", "second"):
        rb.send(msg_id, "accept", {"timeout": None})
    rb.settled()
    made = [ca.connect(b.get_pd_id(), CT.IPC) for _ in range(2)]
    replies = {}
    for _ in range(2):
        got, fds = rb.reply()
        replies[got["id"]] = got["result"]["conn"]
        for fd in fds:
            socket.socket(fileno=fd).close()
    assert replies == {"first": made[0].conn, "second": made[1].conn}
    for c in made:
        c.close()


def test_timed_accepts_end_on_time_on_every_channel_and_take_nothing_after(mgr, as_pd, raw):
    a, b = _pair(mgr)
    c = mgr.allocate_pd(PDDescription(mem=32 * MB))
    a.set_allowed_connections(c.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    ca, rb, rc = as_pd(a), raw(b), raw(c)
    t0 = time.monotonic()
    rb.send("forever", "accept", {"timeout": None})
    rc.send("long", "accept", {"timeout": 0.6})
    rc.send("short", "accept", {"timeout": 0.2})
    rb.settled()
    rc.settled()
    ended = []
    for _ in range(2):
        got, fds = rc.reply()
        ended.append((got["id"], got["result"], time.monotonic() - t0))
        assert not fds
    assert [e[:2] for e in ended] == [("short", None), ("long", None)]
    assert ended[0][2] >= 0.2 and ended[1][2] >= 0.6
    assert rb.quiet()                           # the accept without a timeout still waits
    # an ended accept takes nothing: the connection waits for the next accept
    late = ca.connect(c.get_pd_id(), CT.IPC)
    rc.settled()
    assert rc.quiet() and c.get_runtime_param("/interfaces/connections").endswith(" pending")
    rc.send("next", "accept", {"timeout": 0})
    got, fds = rc.reply()
    assert got["id"] == "next" and got["result"]["conn"] == late.conn and len(fds) == 1
    socket.socket(fileno=fds[0]).close()
    with ca.connect(b.get_pd_id(), CT.IPC) as mine:
        got, fds = rb.reply()
        assert got["id"] == "forever" and got["result"]["conn"] == mine.conn
        socket.socket(fileno=fds[0]).close()
    late.close()


@pytest.mark.parametrize("kind", [CT.IPC, CT.STREAM, CT.EVENT])
def test_a_cut_ends_both_ends_of_a_handed_connection(mgr, as_pd, raw, kind):
    """The layer holds one end of each connection; its shutdown is seen at both (EOF, EPIPE), for every kind."""
    a, b = _pair(mgr)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(kind, bmi.RW)])
    ca, rb = as_pd(a), raw(b)
    rb.send(1, "accept", {"timeout": None})
    rb.settled()
    ours = ca.connect(b.get_pd_id(), kind).socket()
    got, fds = rb.reply()
    theirs = socket.socket(fileno=fds[0])
    ours.send(b"12345678")
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=True)
    assert theirs.recv(8) == b"12345678"        # what was sent before the cut still arrives
    for end in (ours, theirs):
        assert end.recv(8) == b""
        with pytest.raises(BrokenPipeError):
            end.send(b"after")
        end.close()
    assert a.get_runtime_param("/interfaces/connections") == ""


def test_a_pending_connection_cut_before_accept_is_never_handed_out(mgr, as_pd, raw):
    a, b = _pair(mgr)
    ca, rb = as_pd(a), raw(b)
    ours = ca.connect(b.get_pd_id(), CT.IPC).socket()
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=True)
    assert ours.recv(8) == b""
    rb.send(1, "accept", {"timeout": 0.1})
    got, fds = rb.reply()
    assert got["result"] is None and not fds
    ours.close()


def test_a_pd_abusing_accept_gets_errors_and_disturbs_no_one(mgr, as_pd, raw):
    """Malformed accepts, one too many, and a reused id: each answered with an error; another PD's
    waiting accept still gets its connection."""
    a, b = _pair(mgr)
    hostile = mgr.allocate_pd(PDDescription(mem=32 * MB))
    ca, rb, rh = as_pd(a), raw(b), raw(hostile)
    rb.send("b", "accept", {"timeout": None})
    for msg_id, params in enumerate([{"timeout": "soon"}, {"timeout": -1}, {"timeout": True},
                                     {"timeout": 1e12}, {"timeout": 1, "peer": 2}]):
        rh.send(msg_id, "accept", params)
        got, _ = rh.reply()
        assert got["id"] == msg_id and got["error"]["code"] == protocol.INVALID_PARAMS, params
    for msg_id in range(10, 14):
        rh.send(msg_id, "accept", {"timeout": None})
    rh.send(10, "accept", {"timeout": None})
    rh.send(14, "accept", {"timeout": None})
    busy = [rh.reply()[0] for _ in range(2)]
    assert [(r["id"], r["error"]["code"]) for r in busy] == [(10, protocol.BUSY), (14, protocol.BUSY)]
    assert "already waits in 4 accept calls" in busy[1]["error"]["message"]
    rb.settled()
    with ca.connect(b.get_pd_id(), CT.IPC) as mine:
        got, fds = rb.reply()
        assert got["id"] == "b" and got["result"]["conn"] == mine.conn
        socket.socket(fileno=fds[0]).close()
    assert rh.quiet()
