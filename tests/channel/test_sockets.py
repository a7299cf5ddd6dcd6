"""The socket maker (bmi/channel/sockets.py): where the sockets handed to PDs are made, and what they refuse."""
from __future__ import annotations

import errno
import os
import signal
import socket
import sys

import pytest

from bmi.channel.sockets import SO_PASSRIGHTS, SocketMaker, fd_passing_refusable
from bmi.drivers.linux.spawn import start_socket_maker

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


def test_a_batch_asked_in_one_message_is_answered_pair_by_pair():
    """type + count in one message: count answers, each with a fresh pair; a count out of 1..64 or an
    unknown type is answered EINVAL alone (the maker serves the next request as before)."""
    sock, _, pidfd = start_socket_maker()
    try:
        def ask(*ints: int) -> None:
            sock.send(b"".join(i.to_bytes(4, sys.byteorder, signed=True) for i in ints))

        def answer() -> tuple[int, list[int]]:
            data, fds, _, _ = socket.recv_fds(sock, 4, 2)
            return int.from_bytes(data, sys.byteorder), fds

        ask(socket.SOCK_SEQPACKET, 3)
        got = [answer() for _ in range(3)]
        assert [code for code, _ in got] == [0, 0, 0] and all(len(fds) == 2 for _, fds in got)
        assert len({os.fstat(fd).st_ino for _, fds in got for fd in fds}) == 6
        for _, fds in got:
            for fd in fds:
                os.close(fd)
        for bad in ((socket.SOCK_STREAM, 0), (socket.SOCK_STREAM, 65), (socket.SOCK_STREAM, -1), (99, 1)):
            ask(*bad)
            assert answer() == (errno.EINVAL, [])
        ask(socket.SOCK_STREAM)                 # one int alone: one pair
        code, fds = answer()
        assert code == 0 and len(fds) == 2
        for fd in fds:
            os.close(fd)
    finally:
        sock.close()
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        os.close(pidfd)
