"""bmid's event streams against clients that read late or never: no event lost, no memory held for them."""
from __future__ import annotations

import socket
import time

import bmi
from bmi.channel import protocol as p
from bmi.server.daemon import SUBSCRIBER_QUEUE, _Subscriber
from bmi.store import Event


def _churn(mgr, pds: int) -> None:
    """2 * pds events: each PD allocated, then destroyed."""
    made = [mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)) for _ in range(pds)]
    for pd in made:
        pd.destroy()


def test_a_backlog_longer_than_one_read_of_the_store_comes_whole(daemon):
    """`since` sent one read of the store (1000 events) and then only live ones: the rest were skipped."""
    with daemon.open() as mgr:          # (a bmid of its own: its events are these)
        _churn(mgr, 700)
        with mgr.events(since=0, timeout=2) as stream:
            seqs = [e.seq for e in stream]
    assert seqs == list(range(1, 1401)), (len(seqs), seqs[998:1003])


def test_a_client_that_reads_late_still_gets_every_event_in_order(daemon):
    """With the socket full and more than SUBSCRIBER_QUEUE events published meanwhile, the stream is behind
    and catches up from the store: nothing lost, nothing twice, and bmid held at most SUBSCRIBER_QUEUE."""
    with daemon.open() as mgr:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(daemon.socket)
        try:
            p.send(sock, {"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": {}})
            sock.settimeout(10)
            last = p.decode(sock.recv(p.MAX_MESSAGE))["result"]["last"]
            _churn(mgr, SUBSCRIBER_QUEUE + 400)         # the socket holds far fewer: bmid's stream is behind
            seqs = []
            deadline = time.monotonic() + 60
            while len(seqs) < 2 * (SUBSCRIBER_QUEUE + 400) and time.monotonic() < deadline:
                message = p.decode(sock.recv(p.MAX_MESSAGE))
                seqs.append(message["params"]["seq"])
        finally:
            sock.close()
    assert seqs == list(range(last + 1, last + 1 + 2 * (SUBSCRIBER_QUEUE + 400))), (seqs[:3], seqs[-3:])


def test_a_stream_holds_at_most_its_queue_then_is_behind():
    sub = _Subscriber()
    for seq in range(1, SUBSCRIBER_QUEUE + 50):
        sub.put(Event(seq, 0.0, 1, "RUNNING", "", ""))
    assert sub.events.qsize() == SUBSCRIBER_QUEUE and sub.behind
