"""The socket maker (bmi/channel/sockets.py): where the sockets handed to PDs are made, and what they refuse."""
from __future__ import annotations

import signal
import socket

import pytest

from bmi.channel.sockets import SO_PASSRIGHTS, SocketMaker, fd_passing_refusable

SO_NETNS_COOKIE = 71


def netns(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)


@pytest.fixture
def maker():
    m = SocketMaker()
    yield m
    m.close()


def test_pairs_are_made_in_a_network_namespace_that_is_not_the_hosts(maker):
    with socket.socket(socket.AF_UNIX) as host:
        here = netns(host)
    a, b = maker.pair(socket.SOCK_STREAM, fds=False, what="test")
    c, d = maker.pair(socket.SOCK_SEQPACKET, fds=True, what="test")
    with a, b, c, d:
        assert {netns(s) for s in (a, b, c, d)} == {netns(a)} != {here}
        a.sendall(b"x")
        assert b.recv(1) == b"x"
        if fd_passing_refusable():
            assert [s.getsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS) for s in (a, b, c, d)] == [0, 0, 1, 1]
            with pytest.raises(PermissionError):
                socket.send_fds(a, [b"f"], [c.fileno()])
            socket.send_fds(c, [b"f"], [a.fileno()])      # a channel carries fds
            _, fds, _, _ = socket.recv_fds(d, 1, 1)
            socket.socket(fileno=fds[0]).close()


def test_a_maker_killed_by_hand_is_replaced(maker):
    a, b = maker.pair(socket.SOCK_SEQPACKET, fds=False, what="test")
    a.close()
    b.close()
    signal.pidfd_send_signal(maker._pidfd, signal.SIGKILL)
    for _ in range(3):
        a, b = maker.pair(socket.SOCK_SEQPACKET, fds=False, what="test")
        a.send(b"y")
        assert b.recv(1) == b"y"
        a.close()
        b.close()
