"""A Keylime pull-mode agent on bmi's TPM link (API 2.x, what keylime 7.14 verifier and tenant call).

Endpoints: GET /version, GET /v2.x/quotes/identity, GET /v2.x/quotes/integrity,
POST /v2.x/notifications/revocation, GET /v2.x/agent/info.  The agent
registers with the registrar (EK, EK certificate from NV, the AK under
the EK), proves the AK with TPM2_ActivateCredential, and serves HTTPS with
a self-signed certificate it registered (mTLS: clients need a certificate
from `trusted_client_ca`, the verifier's CA).  Quotes are ECDSA by bmi's
ECC AK: the tenant needs `ecdsa` in accept_tpm_signing_algs.
"""
from __future__ import annotations

import base64
import datetime
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import ssl
import struct
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid as uuidlib
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import IntegrityError, InvalidArgument, ResourceError
from ..files import MAX_DOCUMENT, read_text
from ..integrity import wire
from ..integrity.service import IntegrityService
from .launches import IMA_PCR, LaunchList

log = logging.getLogger("bmi.keylime")
API_VERSIONS = ["2.1", "2.2"]
DATA_PCR = 16                 # Keylime binds the agent's public key here (config.TPM_DATA_PCR)
DEFAULT_CONFIG = Path("/etc/bmi/keylime.toml")
_NONCE = re.compile(r"[A-Za-z0-9]{1,64}")
_VERSION = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")
_PATH = re.compile(r"/v(2\.\d+)/(quotes/identity|quotes/integrity|notifications/revocation|agent/info)/?")
MAX_BODY = 64 * 1024          # bytes of a request's body (the API's only one: a revocation notice)
MAX_REPLY = 1 << 20           # bytes of a registrar's reply (its challenge is a few hundred)
HANDSHAKES = 16               # TLS handshakes under way at once; a new connection past it cuts the oldest
HANDSHAKE_TIMEOUT = 5.0       # s a client has to finish TLS (its certificate) after connecting
CLIENTS = 32                  # connections past TLS (certified clients) served at once; more are closed
IDLE_TIMEOUT = 30.0           # s a connection may take to send its next request, or the rest of one
NOTE_EVERY = 10.0             # s between two log lines about connections that failed or were cut
_SHORT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass
class AgentConfig:
    """/etc/bmi/keylime.toml (or flags): who the agent is and where the registrar and it live."""

    uuid: str = ""                           # default: derived from the EK, stable for this TPM
    registrar: str = "127.0.0.1:8890"        # the registrar's agent (non-TLS) port
    ip: str = "127.0.0.1"                    # where the verifier reaches this agent
    port: int = 9002
    tls_dir: str = ""                        # agent key + self-signed cert (made when missing)
    trusted_client_ca: str = ""              # PEM of the CA whose clients may call (the verifier's cacert.crt)

    @classmethod
    def load(cls, path: str | Path | None, overrides: Mapping[str, Any]) -> "AgentConfig":
        values: dict[str, Any] = {}
        file = Path(path) if path else DEFAULT_CONFIG
        if path or file.exists():
            text = read_text(file, "keylime agent: config", MAX_DOCUMENT)
            try:
                values = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise InvalidArgument(f"keylime agent: config {file}: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InvalidArgument(f"keylime agent: config {file}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        if not config.trusted_client_ca:
            raise InvalidArgument("keylime agent: trusted_client_ca is not set (the verifier's CA certificate, "
                                  "e.g. its cv_ca/cacert.crt): without it anyone could ask for quotes")
        return config


def pcr_blob(bank: str, values: Mapping[int, bytes]) -> bytes:
    """What `tpm2_quote -o` writes: TPML_PCR_SELECTION and TPML_DIGESTs as in memory (little-endian, padded)."""
    bitmap = sum(1 << i for i in values)
    selection = struct.pack("<I", 1) + struct.pack("<HB", wire.ALG_IDS[bank], 3) + bitmap.to_bytes(3, "little")
    selection += b"\0\0" + bytes(8 * 15)
    digests = [values[i] for i in sorted(values)]
    chunks = [digests[i:i + 8] for i in range(0, len(digests), 8)]
    out = selection + struct.pack("<I", len(chunks))
    for chunk in chunks:
        out += struct.pack("<I", len(chunk))
        for j in range(8):
            d = chunk[j] if j < len(chunk) else b""
            out += struct.pack("<H", len(d)) + d.ljust(64, b"\0")
    return out


def _tpm2b(area: bytes) -> bytes:
    return struct.pack(">H", len(area)) + area


def _boottime() -> int:
    with open("/proc/stat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("btime "))


class Agent:
    """One agent on one IntegrityService: registration, quotes, the HTTPS server."""

    def __init__(self, service: IntegrityService, config: AgentConfig):
        self.service, self.config = service, config
        self.launches = LaunchList(service.tpm)
        ak = service.attestation_key()
        self.ak = ak
        self.uuid = config.uuid or str(uuidlib.UUID(bytes=hashlib.sha256(ak.ek_public_area).digest()[:16]))
        self.pubkey = ak.pem             # bound into PCR 16 (no payloads: no separate transport key)
        self.revocations: list[dict] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- TLS ------------------------------------------------------------------------------------
    def _tls_files(self) -> tuple[Path, Path]:
        directory = Path(self.config.tls_dir) if self.config.tls_dir else self.service.tpm.dir / "keylime"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert, key = directory / "agent-cert.pem", directory / "agent-key.pem"
        if not (cert.exists() and key.exists()):
            private = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.uuid)])
            now = datetime.datetime.now(datetime.timezone.utc)
            try:
                san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(self.config.ip))])
            except ValueError:
                san = x509.SubjectAlternativeName([x509.DNSName(self.config.ip)])
            certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                           .public_key(private.public_key()).serial_number(x509.random_serial_number())
                           .not_valid_before(now - datetime.timedelta(minutes=5))
                           .not_valid_after(now + datetime.timedelta(days=3650))
                           .add_extension(san, critical=False).sign(private, hashes.SHA256()))
            key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
            key.chmod(0o600)
            cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return cert, key

    # -- registrar -----------------------------------------------------------------------------
    def _registrar(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call to the registrar: its reply, a JSON object of at most MAX_REPLY bytes (the registrar's port
        is plain HTTP: whoever answers on it must not fill bmid's memory or raise past this)."""
        url = f"http://{self.config.registrar}{path}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                text = reply.read(MAX_REPLY + 1)
        except urllib.error.HTTPError as e:
            raise IntegrityError(f"keylime agent {self.uuid}: registrar {method} {url}: HTTP {e.code} "
                                 f"{e.read(300).decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ResourceError(f"keylime agent {self.uuid}: registrar {url} unreachable: {e}") from None
        if len(text) > MAX_REPLY:
            raise IntegrityError(f"keylime agent {self.uuid}: registrar {method} {url}: a reply of more than "
                                 f"{MAX_REPLY} bytes; is that a Keylime registrar?")
        try:
            answer = json.loads(text or b"{}")
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("results", {}), dict):
            raise IntegrityError(f"keylime agent {self.uuid}: registrar {method} {url}: the reply is not a JSON "
                                 f"object with an object of results; is that a Keylime registrar?")
        return answer

    def register(self) -> None:
        """Register EK, EK certificate and AK, then prove the AK with ActivateCredential."""
        cert, _ = self._tls_files()
        version = self._registrar("GET", "/version").get("results", {}).get("current_version", "2.1")
        if not isinstance(version, str) or not _VERSION.fullmatch(version):
            raise IntegrityError(f"keylime agent {self.uuid}: registrar {self.config.registrar}: API version "
                                 f"{str(version)[:40]!r} is not major.minor")
        body = {"ek_tpm": base64.b64encode(_tpm2b(self.ak.ek_public_area)).decode(),
                "aik_tpm": base64.b64encode(_tpm2b(self.ak.public_area)).decode(),
                "ip": self.config.ip, "port": int(self.config.port), "mtls_cert": cert.read_text()}
        if self.ak.ek_certificate:
            der = x509.load_pem_x509_certificate(self.ak.ek_certificate.encode()).public_bytes(
                serialization.Encoding.DER)
            body["ekcert"] = base64.b64encode(der).decode()
        reply = self._registrar("POST", f"/v{version}/agents/{self.uuid}", body)
        try:
            blob = base64.b64decode(reply["results"]["blob"])
            magic, _ = struct.unpack_from(">II", blob)
            n = struct.unpack_from(">H", blob, 8)[0]
            id_object = blob[10:10 + n]
            m = struct.unpack_from(">H", blob, 10 + n)[0]
            secret_blob = blob[12 + n:12 + n + m]
            if magic != 0xBADCC0DE or len(secret_blob) != m:
                raise ValueError("not a MakeCredential blob")
        except (KeyError, TypeError, ValueError, struct.error) as e:
            raise IntegrityError(f"keylime agent {self.uuid}: registrar's challenge is malformed: {e}") from None
        secret = self.service.activate_credential(id_object, secret_blob)
        tag = hmac.new(base64.b64encode(secret), self.uuid.encode(), hashlib.sha384).hexdigest()
        self._registrar("PUT", f"/v{version}/agents/{self.uuid}/activate", {"auth_tag": tag})
        log.info("registered and activated agent %s with %s", self.uuid, self.config.registrar)

    # -- quotes --------------------------------------------------------------------------------
    def quote(self, nonce: str, pcrs: set[int], ima_from: int | None) -> dict:
        """Reset and bind PCR 16, quote `pcrs` + 16 with the raw nonce, and the launch list from ima_from."""
        if not _NONCE.fullmatch(nonce):
            raise InvalidArgument("nonce must be 1..64 letters or digits")
        tpm = self.service.tpm
        selected = tuple(sorted(pcrs | {DATA_PCR}))
        selection = wire.format_selection("sha256", selected)
        with tpm.exclusive():                           # launches are recorded under the same lock
            tpm.pcr_reset(DATA_PCR)
            tpm.extend(DATA_PCR, {"sha256": hashlib.sha256(self.pubkey.encode()).digest()})
            attest, sig = tpm.quote(selection, nonce.encode())
            values = tpm.pcr_read("sha256", selected)
            lines = self.launches.lines() if ima_from is not None else []
        if wire.pcr_composite("sha256", [values[i] for i in selected]) != wire.parse_quote(attest).pcr_digest:
            raise IntegrityError("keylime agent: the quoted PCRs changed during the quote")
        b64 = lambda b: base64.b64encode(b).decode()   # noqa: E731
        result: dict[str, Any] = {
            "quote": "r" + b64(attest) + ":" + b64(sig) + ":" + b64(pcr_blob("sha256", values)),
            "hash_alg": "sha256", "enc_alg": "ecc", "sign_alg": "ecdsa", "pubkey": self.pubkey,
            "boottime": _boottime()}
        if ima_from is not None:
            start = ima_from if 0 <= ima_from <= len(lines) else 0
            result["ima_measurement_list"] = "".join(line + "\n" for line in lines[start:])
            result["ima_measurement_list_entry"] = start
        return result

    def handle(self, method: str, target: str, body: bytes) -> tuple[int, dict]:
        """(HTTP status, results) for one request."""
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if method == "GET" and url.path.rstrip("/") == "/version":
            return 200, {"supported_version": API_VERSIONS[-1], "supported_versions": API_VERSIONS}
        match = _PATH.fullmatch(url.path)
        if not match:
            return 404, {}
        what = match.group(2)
        if what == "agent/info" and method == "GET":
            return 200, {"agent_uuid": self.uuid, "tpm_hash_alg": "sha256", "tpm_enc_alg": "ecc",
                         "tpm_sign_alg": "ecdsa", "ak_handle": 0x81000B12}
        if what == "notifications/revocation" and method == "POST":
            try:
                self.revocations.append(json.loads(body or b"{}"))
            except ValueError:
                return 400, {}
            log.warning("keylime agent %s: the verifier revoked this host: %s", self.uuid, body[:500])
            return 200, {}
        if method != "GET" or not what.startswith("quotes/"):
            return 405, {}
        try:
            if what == "quotes/identity":
                return 200, self.quote(query.get("nonce", ""), set(), None)
            mask = int(query.get("mask", "0x0"), 16)
            pcrs = {i for i in range(24) if mask >> i & 1} | {IMA_PCR}
            result = self.quote(query.get("nonce", ""), pcrs, int(query.get("ima_ml_entry", "0")))
            if query.get("partial") == "1":
                result.pop("pubkey")
            return 200, result
        except (InvalidArgument, ValueError) as e:
            return 400, {"error": str(e)}

    # -- server --------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve HTTPS (mTLS) in a thread."""
        cert, key = self._tls_files()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        ca = read_text(self.config.trusted_client_ca, "keylime agent: trusted_client_ca", MAX_DOCUMENT)
        try:
            context.load_verify_locations(cadata=ca)
        except ssl.SSLError as e:
            raise InvalidArgument(f"keylime agent: trusted_client_ca {self.config.trusted_client_ca}: {e}") from None
        context.verify_mode = ssl.CERT_REQUIRED
        agent = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True      # headers and body are two writes: no 40 ms delayed-ACK stall
            timeout = IDLE_TIMEOUT              # a client that stops sending lets go of its thread

            def _serve(self) -> None:
                length = _content_length(self.headers.get("Content-Length"))
                if length is None or length > MAX_BODY:
                    self.close_connection = True        # its body is not read: the stream cannot go on
                    code, results = (413, {"error": f"a request body is at most {MAX_BODY} bytes"}) if length \
                        else (400, {"error": "Content-Length must be a decimal number of bytes"})
                else:
                    body = self.rfile.read(length) if length else b""
                    try:
                        code, results = agent.handle(self.command, self.path, body)
                    except Exception as e:      # a TPM failure: the verifier retries, the agent stays up
                        log.warning("keylime agent: %s %s failed: %s", self.command, self.path, e)
                        code, results = 500, {"error": str(e)}
                status = "Success" if code == 200 else "Error"
                data = json.dumps({"code": code, "status": status, "results": results}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("keylime agent: " + format, *args)

        try:
            server = _Server((self.config.ip, int(self.config.port)), Handler, context)
        except OSError as e:
            raise ResourceError(f"keylime agent: cannot listen on {self.config.ip}:{self.config.port}: {e}") from None
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="keylime-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _content_length(text: str | None) -> int | None:
    """A request's Content-Length (0 when absent); None when it is not a decimal number (a negative one read
    to the end of the stream, and held the connection's thread)."""
    if text is None:
        return 0
    text = text.strip()
    return int(text) if text.isdigit() and text.isascii() else None


class _Server(ThreadingHTTPServer):
    """HTTPS where no client can stop the others: each TLS handshake runs in the connection's own thread with a
    deadline, and at most HANDSHAKES at once (a new connection cuts the oldest: a verifier's handshake takes
    milliseconds, an idle peer's never ends); certified clients get CLIENTS threads at most.  With the listening
    socket wrapped whole, accept() did the handshake in the one serving thread: a peer that connected and sent
    nothing stopped the agent for every verifier.  A connection that fails is a log line, not a traceback."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, context: ssl.SSLContext):
        super().__init__(address, handler)
        self.context = context
        self._lock = threading.Lock()
        self._handshaking: dict[int, ssl.SSLSocket] = {}   # in arrival order: the oldest first
        self._clients = 0
        self._failed, self._noted, self._last = 0, 0.0, ""

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as e:
            self._note(client_address, e)
            request.close()
            return
        with self._lock:
            if len(self._handshaking) >= HANDSHAKES:
                oldest = self._handshaking.pop(next(iter(self._handshaking)))
                try:                # the base class's shutdown: SSLSocket.shutdown would drop its SSL object
                    socket.socket.shutdown(oldest, socket.SHUT_RDWR)     # under its thread's feet
                except OSError:
                    pass            # (its thread closed it meanwhile)
            self._handshaking[id(tls)] = tls
        try:
            super().process_request(tls, client_address)
        except BaseException:       # no thread for it (the process is out of them): not left half-served
            with self._lock:
                self._handshaking.pop(id(tls), None)
            tls.close()
            raise

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in _SHORT_OF:    # no fd or memory for the connection: it stays queued and the listening
                time.sleep(0.1)         # socket readable, so the serving loop would spin; wait for some
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(HANDSHAKE_TIMEOUT)
            request.do_handshake()
        finally:
            with self._lock:
                self._handshaking.pop(id(request), None)
        with self._lock:
            if self._clients >= CLIENTS:
                raise ResourceError(f"{CLIENTS} certified clients are served already")
            self._clients += 1
        try:
            super().finish_request(request, client_address)
        finally:
            with self._lock:
                self._clients -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        self._note(client_address, sys.exc_info()[1])

    def _note(self, client_address: Any, error: BaseException | None) -> None:
        """One log line per NOTE_EVERY s about the connections that failed (a flood must not flood the log)."""
        with self._lock:
            self._failed += 1
            self._last = f"{client_address[0] if client_address else '?'}: {type(error).__name__}: {error}"
            now = time.monotonic()
            if now - self._noted < NOTE_EVERY:
                return
            failed, last, self._failed, self._noted = self._failed, self._last, 0, now
        log.info("keylime agent: %d connection(s) failed or were cut (too slow, not certified, or past the "
                 "limits); the last: %s", failed, last)


def run_in_bmid(service: IntegrityService, config_path: str | None) -> Agent:
    """bmid --keylime: enable Keylime mode on bmid's TPM, register, serve in a thread."""
    LaunchList(service.tpm).enable()
    agent = Agent(service, AgentConfig.load(config_path, {}))
    agent.register()
    agent.start()
    return agent
