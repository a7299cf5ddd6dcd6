"""The Keylime agent under a hostile network: idle peers, floods, uncertified clients, bad bodies, a registrar
that is none.

The agent runs inside bmid and listens where verifiers reach it, so anyone on that network can connect before
TLS asks for a certificate; and it registers over the registrar's plain HTTP port, so whoever answers there
is heard.  Real swtpm, real TLS, real sockets on loopback.
"""
from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import bmi
from bmi.keylime import agent as agent_module
from bmi.keylime.agent import HANDSHAKES, MAX_BODY, MAX_REPLY, Agent, AgentConfig


def _certificate(name: str, issuer: tuple | None = None) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[1].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return key, builder.sign(issuer[0] if issuer else key, hashes.SHA256())


def _files(tmp_path, name: str, pair: tuple) -> tuple[str, str]:
    """A (key, certificate) pair written as PEM files: (certificate file, key file)."""
    key, cert = pair
    (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")


def _client_context(tmp_path, name: str, ca: tuple | None) -> ssl.SSLContext:
    """A verifier's TLS context: a certificate of `ca` (None: no certificate at all)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if ca is not None:
        context.load_cert_chain(*_files(tmp_path, name, _certificate(name, ca)))
    return context


class Site:
    """An agent on the manager's swtpm, listening on a loopback port of its own, and its verifier's TLS."""

    def __init__(self, mgr, tmp_path):
        ca = _certificate("verifier-ca")
        (tmp_path / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
        self.verifier = _client_context(tmp_path, "verifier", ca)
        self.stranger = _client_context(tmp_path, "stranger", _certificate("another-ca"))
        self.anonymous = _client_context(tmp_path, "anonymous", None)
        self.agent = Agent(mgr.integrity_service(), AgentConfig(
            trusted_client_ca=str(tmp_path / "ca.pem"), port=0, tls_dir=str(tmp_path / "tls")))
        self.agent.start()
        self.port = self.agent._server.server_address[1]

    def request(self, head: bytes, context: ssl.SSLContext | None = None, timeout: float = 5.0) -> bytes:
        """Send one request head (and body) over a fresh TLS connection: the whole reply, read to its end."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
            with (context or self.verifier).wrap_socket(raw) as tls:
                tls.sendall(head)
                reply = b""
                while chunk := tls.recv(65536):
                    reply += chunk
                    if b"\r\n\r\n" in reply and _whole(reply):
                        break
                return reply

    def version(self, timeout: float = 5.0) -> int:
        reply = self.request(b"GET /version HTTP/1.1\r\nHost: agent\r\n\r\n", timeout=timeout)
        return int(reply.split(b" ", 2)[1])


def _whole(reply: bytes) -> bool:
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return len(body) >= length


@pytest.fixture
def site(tmgr, tmp_path, capfd):
    s = Site(tmgr, tmp_path)
    try:
        yield s
    finally:
        s.agent.stop()
    assert "Traceback" not in capfd.readouterr().err, "a connection's failure printed a traceback"


def _threads() -> int:
    return threading.active_count()


def test_idle_peers_never_stop_a_verifier_and_the_oldest_are_cut(site):
    """A peer that connects and sends nothing used to hold the agent's one accepting thread in the TLS handshake,
    so every verifier timed out: now each handshake has its own thread, and past HANDSHAKES the oldest is cut."""
    idle = [socket.create_connection(("127.0.0.1", site.port)) for _ in range(HANDSHAKES * 2)]
    try:
        started = time.monotonic()
        assert site.version(timeout=3) == 200
        assert time.monotonic() - started < 2
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b"", "the oldest idle peer was not cut"
    finally:
        for s in idle:
            s.close()


def test_a_flood_of_connections_keeps_the_agents_threads_bounded(site):
    before = _threads()
    flood = []
    try:
        for _ in range(HANDSHAKES * 8):
            flood.append(socket.create_connection(("127.0.0.1", site.port)))
        time.sleep(0.5)
        assert _threads() <= before + HANDSHAKES + 2, "a thread per connection of the flood"
        assert site.version() == 200
    finally:
        for s in flood:
            s.close()


@pytest.mark.parametrize("who", ["stranger", "anonymous"])
def test_a_client_without_a_certificate_of_the_ca_gets_nothing_and_the_agent_goes_on(site, who):
    with pytest.raises((ssl.SSLError, ConnectionError)):
        site.request(b"GET /v2.2/agent/info HTTP/1.1\r\nHost: agent\r\n\r\n", getattr(site, who))
    assert site.version() == 200


@pytest.mark.parametrize("length, code", [
    (b"-1", 400),                   # read to the end of the stream before: the thread waited for good
    (b"abc", 400),                  # a ValueError and a traceback before
    ("\uff11\uff12".encode(), 400),     # digits, but not ASCII ones
    (str(MAX_BODY + 1).encode(), 413),
    (b"99999999999", 413),          # a MemoryError before; a smaller one was read into bmid's memory
])
def test_a_bad_or_huge_content_length_is_refused_without_reading_the_body(site, length, code):
    reply = site.request(b"POST /v2.2/notifications/revocation HTTP/1.1\r\nHost: agent\r\nContent-Length: "
                         + length + b"\r\n\r\n")
    head = reply.split(b"\r\n\r\n")[0]
    assert int(head.split(b" ", 2)[1]) == code
    assert b"Connection: close" in head
    assert site.version() == 200


def test_a_body_within_the_limit_is_read(site):
    notice = b'{"type": "revocation", "pad": "' + b"x" * (MAX_BODY - 64) + b'"}'
    reply = site.request(b"POST /v2.2/notifications/revocation HTTP/1.1\r\nHost: agent\r\nContent-Length: "
                         + str(len(notice)).encode() + b"\r\n\r\n" + notice)
    assert reply.startswith(b"HTTP/1.1 200")
    assert site.agent.revocations[-1]["type"] == "revocation"


def test_a_client_that_stops_mid_request_is_let_go(tmgr, tmp_path, monkeypatch):
    monkeypatch.setattr(agent_module, "IDLE_TIMEOUT", 0.5)
    site = Site(tmgr, tmp_path)
    try:
        before = _threads()
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as raw:
            with site.verifier.wrap_socket(raw) as tls:
                tls.sendall(b"GET /version HTTP/1.1\r\nHost: ag")        # and nothing more
                time.sleep(0.1)
                assert _threads() == before + 1
                assert tls.recv(1) == b"", "the half-sent request held its connection"
        deadline = time.monotonic() + 5
        while _threads() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _threads() == before
    finally:
        site.agent.stop()


_SHORT_OF_FDS = r"""
import os, resource, ssl, sys, threading
from http.server import BaseHTTPRequestHandler
from bmi.keylime.agent import _Server
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server = _Server(("127.0.0.1", 0), BaseHTTPRequestHandler, context)
room = len(os.listdir("/proc/self/fd")) + 3        # fds for 3 connections, held by their handshakes
resource.setrlimit(resource.RLIMIT_NOFILE, (room, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)
sys.stdin.readline()
"""


def test_out_of_fds_the_agent_waits_instead_of_spinning(tmp_path):
    """accept() failing with EMFILE leaves the connection queued and the socket readable: the serving loop went
    round at once, a CPU at 100% for as long as the flood lasted."""
    proc = subprocess.Popen([sys.executable, "-c", _SHORT_OF_FDS, *_files(tmp_path, "agent", _certificate("agent"))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    flood = []
    try:
        port = int(proc.stdout.readline())
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]   # idle: handshakes wait
        time.sleep(0.3)                     # the agent is short of fds by now, with connections queued

        def cpu() -> float:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        before = cpu()
        time.sleep(1.0)
        assert cpu() - before < 0.5, "the serving loop spun on EMFILE"
        assert proc.poll() is None
    finally:
        for s in flood:
            s.close()
        proc.stdin.close()
        proc.wait(10)


class _FakeRegistrar:
    """Whatever answers on the registrar's port: a canned reply body to each method."""

    def __init__(self, replies: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = replies[self.command]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args) -> None:
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = "127.0.0.1:%d" % self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_VERSION_OK = b'{"results": {"current_version": "2.2"}}'


@pytest.mark.parametrize("replies, error", [
    ({"GET": b"x" * (MAX_REPLY + 10)}, "more than"),          # read whole into bmid's memory before
    ({"GET": b"[1, 2]"}, "not a JSON object"),                 # an AttributeError before
    ({"GET": b'{"results": [1]}'}, "not a JSON object"),
    ({"GET": b"[" * 100000}, "not a JSON object"),             # a RecursionError in the JSON parser
    ({"GET": b'{"results": {"current_version": "2.2/../../x"}}'}, "not major.minor"),
    ({"GET": b'{"results": {"current_version": 2}}'}, "not major.minor"),
    ({"GET": _VERSION_OK, "POST": b'{"results": {"blob": "' + b"A" * (MAX_REPLY + 4) + b'"}}'}, "more than"),
    ({"GET": _VERSION_OK, "POST": b'{"results": {"blob": "AAAA"}}'}, "challenge is malformed"),
])
def test_a_registrar_that_is_none_is_a_one_line_error(tmgr, tmp_path, replies, error):
    registrar = _FakeRegistrar(replies)
    try:
        agent = Agent(tmgr.integrity_service(), AgentConfig(trusted_client_ca="unused", registrar=registrar.address,
                                                            tls_dir=str(tmp_path / "tls")))
        with pytest.raises(bmi.IntegrityError, match=error) as caught:
            agent.register()
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    finally:
        registrar.close()
