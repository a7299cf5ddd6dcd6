"""The channel server answers every request, whatever its handler does or returns (a real socketpair)."""
from __future__ import annotations

import json
import socket

import pytest

from bmi.channel import protocol as p
from bmi.channel.connections import Registry
from bmi.channel.server import ChannelServer


def handler(caller: int, method: str, params: dict, fd: int | None):
    """Each method fails in its own way; "ok" answers."""
    if method == "raises":
        raise RuntimeError("a bug in the layer")
    if method == "unencodable":
        return {1, 2}, None                        # JSON has no sets
    if method == "huge":
        return "x" * (p.MAX_MESSAGE + 1), None     # over the frame
    return "fine", None


@pytest.fixture
def channel():
    registry = Registry()
    server = ChannelServer(handler, registry)
    sock = socket.socket(fileno=server.open(7))
    sock.settimeout(5)
    yield sock
    sock.close()
    server.close()
    registry.close()


def ask(sock: socket.socket, msg_id: int, method: str) -> dict:
    p.send(sock, p.request(msg_id, method, {}))
    data, fds, whole = p.receive(sock)
    assert whole and not fds
    return json.loads(data)


@pytest.mark.parametrize("method, code, words", [
    ("raises", p.INTERNAL_ERROR, "internal error: RuntimeError"),
    ("unencodable", p.INTERNAL_ERROR, "unencodable: the layer could not encode its reply"),
    ("huge", -32006, f"huge by PD 7: the reply was {len(p.encode(p.result(1, 'x' * (p.MAX_MESSAGE + 1))))} bytes, "
                     f"over the channel's frame of {p.MAX_MESSAGE} bytes; ask for less"),
])
def test_a_failing_request_is_answered_and_the_channel_lives_on(channel, method, code, words):
    for msg_id in (1, 2):                          # twice: the worker survived the first
        reply = ask(channel, msg_id, method)
        assert reply["id"] == msg_id and reply["error"]["code"] == code, reply
        assert words in reply["error"]["message"], reply
        assert ask(channel, 10 + msg_id, "ok") == {"jsonrpc": "2.0", "id": 10 + msg_id, "result": "fine"}


def test_a_bug_while_reading_one_channel_closes_it_and_the_others_are_served(monkeypatch):
    """The thread reading the channels survives a failure inside the layer on one PD's record: that channel
    is closed (its PD sees EOF), and every other channel is read and answered as before."""
    decode = p.decode

    def breaks_on_poison(data: bytes):
        if b"poison" in data:
            raise RuntimeError("a bug in the layer's reading")
        return decode(data)

    monkeypatch.setattr(p, "decode", breaks_on_poison)
    registry = Registry()
    server = ChannelServer(handler, registry)
    broken, other = (socket.socket(fileno=server.open(pd_id)) for pd_id in (7, 8))
    try:
        for s in (broken, other):
            s.settimeout(5)
        p.send(broken, p.request(1, "poison", {}))
        assert broken.recv(1) == b""                    # closed by the layer
        for msg_id in (1, 2):
            assert ask(other, msg_id, "ok")["result"] == "fine"
    finally:
        broken.close()
        other.close()
        server.close()
        registry.close()
