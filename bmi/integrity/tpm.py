"""TPM access through tpm2-pytss: which TPM, our own swtpm, bmi's persistent keys.

Choice: /dev/tpmrm0 when present (the kernel's resource manager lets any
number of processes share it); else the TCTI in $BMI_TPM_TCTI; else a
swtpm this module starts in the state directory.  swtpm has no resource
manager: commands of several processes interleave fine (the swtpm TCTI
connects per command) but transient objects and sessions are shared, so
every multi-command sequence runs under an exclusive file lock and first
flushes transient objects a crashed process may have left behind.  The
swtpm is shared by every bmi process using the same state directory and
stopped by the last one to close (users hold a shared lock on users.lock).

Keys: the storage key is a primary of the owner hierarchy.  The AK (ECC
P-256, ECDSA: a quote is about 5x faster than with RSA-2048) is a child
of the endorsement key (the TCG default EK template, ECC P-256, or
RSA-2048 when the TPM's NV only has an RSA EK certificate): its quotes
carry the TPM's real reset and restart counts, and a verifier can prove
it sits beside the EK with MakeCredential/ActivateCredential.  The EK is
recreated from its template when needed (it is deterministic), never
persisted.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

from ..errors import IntegrityError, ResourceError
from . import wire

os.environ.setdefault("TSS2_LOG", "all+none")   # expected failures must not spam stderr
from tpm2_pytss import (  # noqa: E402
    ESAPI, ESYS_TR, TCTILdr, TPM2_ALG, TPM2_CAP, TPM2_HC, TPM2_RC, TPM2_SE, TPM2B_DIGEST, TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT, TPM2B_PRIVATE, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMA_OBJECT, TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION, TPMS_KEYEDHASH_PARMS, TPMS_SENSITIVE_CREATE, TPMT_HA, TPMT_PUBLIC, TPMT_SIG_SCHEME,
    TPMT_SYM_DEF, TPMT_SYM_DEF_OBJECT, TPMU_HA, TPMU_PUBLIC_PARMS, TSS2_Exception,
)
from tpm2_pytss.utils import NVReadEK, NoSuchIndex, create_ek_template  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

STORAGE_HANDLE = 0x81000B10     # owner-hierarchy persistent handles bmi owns
AK_HANDLE = 0x81000B12          # the AK under the EK
OLD_AK_HANDLE = 0x81000B11      # bmi < 0.2 kept an owner-hierarchy primary AK here: evicted on open
EK_CERT_INDEXES = {"EK-ECC256": 0x01C0000A, "EK-RSA2048": 0x01C00002}   # TCG EK credential profile, low range
_KEY_ATTRS = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
              | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.NODA)
_TEMPLATES = {
    STORAGE_HANDLE: ("ecc256:aes128cfb", _KEY_ATTRS | TPMA_OBJECT.DECRYPT),
    AK_HANDLE: ("ecc256:ecdsa-sha256:null", _KEY_ATTRS | TPMA_OBJECT.SIGN_ENCRYPT),
}
_SOCKET_MAX = 100          # sun_path is 108 bytes including ".ctrl" suffix room
T = TypeVar("T")
_CHILDREN: dict[int, subprocess.Popen] = {}    # swtpm processes this process started, by pid


def state_dir(config: Mapping[str, str]) -> Path:
    """Where bmi keeps TPM state: config, $BMI_STATE_DIR, /var/lib/bmi (root), XDG state."""
    if config.get("state_dir"):
        return Path(config["state_dir"])
    if os.environ.get("BMI_STATE_DIR"):
        return Path(os.environ["BMI_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/bmi")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "bmi"


def _lock(path: Path, mode: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _alive(pid: int, marker: str) -> bool:
    """True if pid runs a swtpm for `marker` (guards against pid reuse; zombies count as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X") and b"swtpm" in cmd and marker.encode() in cmd


class Swtpm:
    """Our swtpm daemon for one state directory, shared by all bmi processes using it."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.sock = directory / "swtpm.sock"
        self.pidfile = directory / "swtpm.pid"
        self._users_fd: int | None = None

    @classmethod
    def attach(cls, directory: Path) -> "Swtpm":
        self = cls(directory)
        (directory / "swtpm").mkdir(parents=True, exist_ok=True, mode=0o700)
        if len(str(self.sock)) > _SOCKET_MAX:
            raise ResourceError(f"open TPM: swtpm socket path {self.sock} is longer than {_SOCKET_MAX} bytes; "
                                "set BMI_STATE_DIR to a shorter directory")
        start_fd = _lock(directory / "start.lock", fcntl.LOCK_EX)
        try:
            if self.pid() is None:
                self._start()
            self._users_fd = _lock(directory / "users.lock", fcntl.LOCK_SH)
        finally:
            os.close(start_fd)
        return self

    def pid(self) -> int | None:
        """The running swtpm's pid, or None."""
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid, str(self.dir)) else None

    def _start(self) -> None:
        """Start swtpm as our child in its own session (so we can reap it: PID 1 may not)."""
        for p in (self.sock, Path(f"{self.sock}.ctrl"), self.pidfile):
            p.unlink(missing_ok=True)
        cmd = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.dir / 'swtpm'}",
               "--server", f"type=unixio,path={self.sock}", "--ctrl", f"type=unixio,path={self.sock}.ctrl",
               "--flags", "not-need-init,startup-clear", "--pid", f"file={self.pidfile}",
               "--log", "file=/dev/null"]     # it logs a line per client command otherwise
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise ResourceError(f"open TPM: cannot start swtpm in {self.dir}: {e}") from None
        _CHILDREN[proc.pid] = proc
        deadline = time.monotonic() + 5
        while not (self.sock.exists() and self.pid()):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                del _CHILDREN[proc.pid]
                raise ResourceError(f"open TPM: swtpm in {self.dir} did not come up (exit status "
                                    f"{proc.returncode}); try by hand: {' '.join(cmd[:-2])}")
            time.sleep(0.002)

    def detach(self) -> None:
        """Stop being a user; the last user stops the swtpm."""
        if self._users_fd is None:
            return
        start_fd = _lock(self.dir / "start.lock", fcntl.LOCK_EX)
        try:
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            users, self._users_fd = self._users_fd, None     # taken first: never closed twice
            os.close(users)
            if last:
                self._stop()
            _reap()
        finally:
            os.close(start_fd)

    def _stop(self) -> None:
        pid = self.pid()
        if pid is None:
            self._reap_killed()
            return
        child = _CHILDREN.pop(pid, None)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            os.kill(pid, sig)
            if child is not None:       # ours: wait() also reaps it
                try:
                    child.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    continue
            deadline = time.monotonic() + 2
            while _alive(pid, str(self.dir)) and time.monotonic() < deadline:
                time.sleep(0.002)
            if not _alive(pid, str(self.dir)):
                break
        for p in (self.sock, Path(f"{self.sock}.ctrl"), self.pidfile):
            p.unlink(missing_ok=True)

    def _reap_killed(self) -> None:
        """The swtpm of the pid file is gone already (killed from outside): if it was our child, wait until it
        is reaped -- it may still be exiting, too early for _reap()'s poll, and would stay a zombie."""
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            try:
                child.wait(timeout=2)
            except subprocess.TimeoutExpired:
                _CHILDREN[pid] = child


def _reap() -> None:
    """Collect swtpm children that exited (stopped by whichever process closed last)."""
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


class TPM:
    """One ESAPI connection plus bmi's two persistent keys on the chosen TPM."""

    def __init__(self, kind: str, tcti: str, directory: Path, swtpm: Swtpm | None, shared_rm: bool):
        self.kind, self.tcti, self.dir = kind, tcti, directory
        self._swtpm, self._shared_rm = swtpm, shared_rm
        self._mutex = threading.RLock()
        self._esys: ESAPI | None = None
        self._tctildr: TCTILdr | None = None
        self._handles: dict[int, ESYS_TR] = {}
        self.ak_pem = b""
        self.ak_public_area = b""
        self.storage_public_area = b""
        self._ek: tuple[bytes, str | None] | None = None     # (EK TPMT_PUBLIC, certificate PEM), once read

    @classmethod
    def open(cls, config: Mapping[str, str]) -> "TPM":
        base = state_dir(config)
        swtpm = None
        if (config.get("tpm") or os.environ.get("BMI_TPM")) == "swtpm":   # force our own swtpm
            swtpm = Swtpm.attach(base / "tpm")
            tcti = f"swtpm:path={swtpm.sock}"
        elif config.get("tcti"):
            tcti = config["tcti"]
        elif os.path.exists("/dev/tpmrm0"):
            tcti = "device:/dev/tpmrm0"
        elif os.environ.get("BMI_TPM_TCTI"):
            tcti = os.environ["BMI_TPM_TCTI"]
        else:
            swtpm = Swtpm.attach(base / "tpm")
            tcti = f"swtpm:path={swtpm.sock}"
        if swtpm:
            kind, directory = "software", base / "tpm"
        elif tcti.startswith("device:"):
            kind, directory = "hardware", base / "tpm-hw"
        else:   # an external TPM: assume software unless it is a device node
            kind, directory = "software", base / ("tpm-" + hashlib.sha256(tcti.encode()).hexdigest()[:12])
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self = cls(kind, tcti, directory, swtpm, tcti.startswith(("device:/dev/tpmrm", "tabrmd")))
        try:
            name, _, conf = tcti.partition(":")
            self._tctildr = self._call("connect", lambda: TCTILdr(name, conf or None))
            self._esys = self._call("connect", lambda: ESAPI(self._tctildr))
            with self.exclusive():
                self._evict_old_ak()
                for handle in (STORAGE_HANDLE, AK_HANDLE):
                    self._handles[handle] = self._ensure_key(handle)
            ak_pub, _, _ = self._call("read AK", self._esys.read_public, self._handles[AK_HANDLE])
            self.ak_pem = ak_pub.to_pem()
            self.ak_public_area = ak_pub.publicArea.marshal()
            st_pub, _, _ = self._call("read storage key", self._esys.read_public, self._handles[STORAGE_HANDLE])
            self.storage_public_area = st_pub.publicArea.marshal()
        except BaseException:
            self.close()
            raise
        return self

    def _call(self, what: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run one tss call; a TPM or transport failure becomes IntegrityError naming `what`."""
        try:
            return fn(*args, **kwargs)
        except TSS2_Exception as e:
            raise IntegrityError(f"TPM {what} failed on the {self.kind} TPM ({self.tcti}): {e}") from None

    def _persistent(self, handle: int) -> ESYS_TR | None:
        """The object at a persistent handle, or None when the handle is free."""
        try:
            return self._esys.tr_from_tpmpublic(handle)
        except TSS2_Exception as e:
            if e.rc & 0xFF != TPM2_RC.HANDLE & 0xFF:
                raise IntegrityError(f"TPM read key 0x{handle:08x} failed ({self.tcti}): {e}") from None
            return None

    @staticmethod
    def _matches(tr_public: TPM2B_PUBLIC, handle: int) -> bool:
        spec, attrs = _TEMPLATES[handle]
        a, b = tr_public.publicArea, TPM2B_PUBLIC.parse(spec, objectAttributes=attrs).publicArea
        return (a.type, a.nameAlg, int(a.objectAttributes)) == (b.type, b.nameAlg, int(b.objectAttributes)) \
            and a.parameters.eccDetail.marshal() == b.parameters.eccDetail.marshal()

    def _evict_old_ak(self) -> None:
        """Drop the owner-hierarchy AK an older bmi persisted: it is not rooted in the EK."""
        tr = self._persistent(OLD_AK_HANDLE)
        if tr is not None and self._matches(self._call("read key", self._esys.read_public, tr)[0], AK_HANDLE):
            self._call("evict the old AK", self._esys.evict_control, ESYS_TR.OWNER, tr, OLD_AK_HANDLE)

    def _ensure_key(self, handle: int) -> ESYS_TR:
        """The persistent key at `handle`, created and persisted the first time."""
        spec, attrs = _TEMPLATES[handle]
        tr = self._persistent(handle)
        if tr is not None:
            if not self._matches(self._call("read key", self._esys.read_public, tr)[0], handle):
                raise IntegrityError(f"TPM persistent handle 0x{handle:08x} holds a key that is not bmi's "
                                     f"({spec}); evict it or use another TPM")
            return tr
        template = TPM2B_PUBLIC.parse(spec, objectAttributes=attrs)
        if handle == AK_HANDLE:
            transient = self._create_ak(template)
        else:
            transient = self._call("create key", self._esys.create_primary, None, template, ESYS_TR.OWNER)[0]
        try:
            return self._call("persist key", self._esys.evict_control, ESYS_TR.OWNER, transient, handle)
        finally:
            self._flush(transient)

    def _ek_template(self) -> tuple[TPM2B_PUBLIC, str | None]:
        """The EK's template and certificate (PEM) from NV: ECC P-256 unless only an RSA certificate exists."""
        reader = NVReadEK(self._esys)
        found = {}
        for ek_type in EK_CERT_INDEXES:
            try:
                found[ek_type] = reader(EK_CERT_INDEXES[ek_type])
            except NoSuchIndex:
                continue
            except TSS2_Exception as e:
                raise IntegrityError(f"TPM read EK certificate ({ek_type}) failed ({self.tcti}): {e}") from None
        ek_type = "EK-RSA2048" if "EK-RSA2048" in found and "EK-ECC256" not in found else "EK-ECC256"
        cert, template = self._call("read EK template", create_ek_template, ek_type, reader)
        pem = None
        if cert:
            der = bytes(cert)
            if der[:2] == b"\x30\x82":          # NV areas may be padded past the DER SEQUENCE
                der = der[:4 + int.from_bytes(der[2:4], "big")]
            try:
                pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode("ascii")
            except ValueError as e:
                raise IntegrityError(f"TPM EK certificate at NV 0x{EK_CERT_INDEXES[ek_type]:08x} is not "
                                     f"DER X.509 ({e})") from None
        return template, pem

    @contextlib.contextmanager
    def _endorsement(self) -> Iterator[tuple[ESYS_TR, Callable[[], ESYS_TR]]]:
        """A transient EK and a maker of PolicySecret(endorsement) sessions (its authPolicy); both flushed after.

        Call inside exclusive().  A policy session is consumed by each use.
        """
        template, cert = self._ek_template()
        ek, public = self._call("create EK", self._esys.create_primary, None, template, ESYS_TR.ENDORSEMENT)[:2]
        sessions: list[ESYS_TR] = []

        def policy() -> ESYS_TR:
            sess = self._call("start policy session", self._esys.start_auth_session, ESYS_TR.NONE, ESYS_TR.NONE,
                              TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
            sessions.append(sess)
            self._call("PolicySecret(endorsement) (bmi needs the endorsement hierarchy's auth value empty)",
                       self._esys.policy_secret, ESYS_TR.ENDORSEMENT, sess)
            return sess
        try:
            self._ek = (public.publicArea.marshal(), cert)
            yield ek, policy
        finally:
            for tr in (*sessions, ek):
                self._flush(tr)

    def _create_ak(self, template: TPM2B_PUBLIC) -> ESYS_TR:
        """A new AK under the EK, loaded (transient): the caller persists it."""
        with self._endorsement() as (ek, policy):
            private, public = self._call("create AK under the EK", self._esys.create, ek, None, template,
                                         session1=policy())[:2]
            return self._call("load AK", self._esys.load, ek, private, public, session1=policy())

    def endorsement(self) -> tuple[bytes, str | None]:
        """(EK TPMT_PUBLIC, EK certificate PEM or None); the EK is made once per connection."""
        while self._ek is None:              # _endorsement() records it
            with self.exclusive(), self._endorsement():
                pass
        return self._ek

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and the EK: the secret only this TPM can recover."""
        try:
            blob, secret = TPM2B_ID_OBJECT(credential_blob), TPM2B_ENCRYPTED_SECRET(encrypted_secret)
        except (TSS2_Exception, ValueError, TypeError) as e:
            raise IntegrityError(f"activate_credential: malformed credential: {e}") from None
        with self.exclusive(), self._endorsement() as (ek, policy):
            try:
                return bytes(self._esys.activate_credential(self._handles[AK_HANDLE], ek, blob, secret,
                                                            session1=ESYS_TR.PASSWORD, session2=policy()))
            except TSS2_Exception as e:
                raise IntegrityError("activate_credential: the TPM refused the credential: it was not made "
                                     f"for this TPM's EK and AK, or was altered ({e})") from None

    def _flush(self, tr: ESYS_TR) -> None:
        with contextlib.suppress(TSS2_Exception):
            self._esys.flush_context(tr)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the TPM for a multi-command sequence (objects or sessions in flight)."""
        with self._mutex:
            if self._esys is None:
                raise IntegrityError(f"TPM ({self.tcti}) is closed")
            fd = _lock(self.dir / "tpm.lock", fcntl.LOCK_EX)
            try:
                if not self._shared_rm:
                    for h in self.transient_handles():   # left by a process that died mid-sequence
                        self._flush(self._call("flush stale object", self._esys.tr_from_tpmpublic, h))
                yield
            finally:
                os.close(fd)

    def transient_handles(self) -> list[int]:
        _, data = self._call("list handles", self._esys.get_capability, TPM2_CAP.HANDLES,
                                TPM2_HC.TRANSIENT_FIRST, 64)
        return [int(h) for h in data.data.handles]

    def banks(self) -> list[str]:
        """PCR banks with at least one PCR allocated."""
        _, caps = self._call("read PCR banks", self._esys.get_capability, TPM2_CAP.PCRS, 0, 1)
        return [wire.ALG_NAMES[int(s.hash)] for s in caps.data.assignedPCR
                if int(s.hash) in wire.ALG_NAMES and any(bytes(s.pcrSelect)[:s.sizeofSelect])]

    def pcr_read(self, bank: str, pcrs: tuple[int, ...]) -> dict[int, bytes]:
        """PCR values; PCR_Read returns at most 8 per call, so loop on what came back."""
        out: dict[int, bytes] = {}
        with self._mutex:
            while len(out) < len(pcrs):
                todo = [i for i in pcrs if i not in out]
                _, sel, digests = self._call("PCR read", self._esys.pcr_read,
                                             TPML_PCR_SELECTION.parse(wire.format_selection(bank, todo)))
                got = [i for s in sel.pcrSelections for i in range(s.sizeofSelect * 8)
                       if bytes(s.pcrSelect)[i // 8] >> (i % 8) & 1]
                if not got:
                    raise IntegrityError(f"TPM PCR read: {bank} PCRs {todo} are not allocated ({self.tcti})")
                for i, d in zip(got, list(digests)):
                    out[i] = bytes(d)
        return out

    def extend(self, pcr: int, digests: Mapping[str, bytes]) -> None:
        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=wire.ALG_IDS[alg], digest=TPMU_HA(**{alg: d}))
                                     for alg, d in digests.items()])
        with self._mutex:
            self._call(f"PCR {pcr} extend", self._esys.pcr_extend, ESYS_TR.parse(f"PCR{pcr}"), values)

    def pcr_reset(self, pcr: int) -> None:
        with self._mutex:
            self._call(f"PCR {pcr} reset", self._esys.pcr_reset, ESYS_TR.parse(f"PCR{pcr}"))

    def quote(self, selection: str, qualifying: bytes) -> tuple[bytes, bytes]:
        """(marshalled TPMS_ATTEST, marshalled TPMT_SIGNATURE) by the AK over `selection`."""
        with self._mutex:
            attest, sig = self._call("quote", self._esys.quote, self._handles[AK_HANDLE], selection, qualifying,
                                     TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
            return bytes(attest), sig.marshal()

    def reset_count(self) -> int:
        """TPM resets so far: tells one boot (of the TPM) from the next."""
        with self._mutex:
            return int(self._call("read clock", self._esys.read_clock).clockInfo.resetCount)

    def create_sealed(self, data: bytes, auth_policy: bytes) -> tuple[bytes, bytes]:
        """Seal `data` under the storage key: (TPMT_PUBLIC, TPM2B_PRIVATE buffer)."""
        template = TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA,
            authPolicy=TPM2B_DIGEST(auth_policy),
            parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS())))
        template.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=data))
        with self.exclusive():
            private, public = self._call("create sealed object", self._esys.create,
                                         self._handles[STORAGE_HANDLE], sensitive, template)[:2]
            return public.publicArea.marshal(), bytes(private)

    def unseal(self, selection: str, public_area: bytes, private: bytes, seed: bytes | None) -> bytes:
        """Import (when `seed` is given: a duplicated blob), load, satisfy PolicyPCR, unseal."""
        with self.exclusive():
            try:
                public, used = TPM2B_PUBLIC.unmarshal(wire.tpm2b(public_area))
                priv = TPM2B_PRIVATE(private)
                secret = None if seed is None else TPM2B_ENCRYPTED_SECRET(seed)
            except (TSS2_Exception, ValueError, TypeError) as e:
                raise IntegrityError(f"malformed sealed object: {e}") from None
            if used != len(public_area) + 2:
                raise IntegrityError("malformed sealed object: trailing bytes after its public area")
            parent = self._handles[STORAGE_HANDLE]
            if secret is not None:
                priv = self._call("import", self._esys.import_, parent, b"", public, priv, secret,
                                  TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL))
            obj = self._call("load sealed object", self._esys.load, parent, priv, public)
            try:
                sess = self._call("start policy session", self._esys.start_auth_session, ESYS_TR.NONE,
                                  ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                                  TPM2_ALG.SHA256)
                try:
                    self._call("PolicyPCR", self._esys.policy_pcr, sess, b"", selection)
                    try:
                        return bytes(self._esys.unseal(obj, session1=sess))
                    except TSS2_Exception as e:
                        if e.rc & 0xFF == TPM2_RC.POLICY_FAIL & 0xFF:
                            raise IntegrityError(f"TPM refused to unseal: the TVL PCRs ({selection}) differ "
                                                 "from those the blob is sealed to") from None
                        raise IntegrityError(f"TPM unseal failed ({self.tcti}): {e}") from None
                finally:
                    self._flush(sess)
            finally:
                self._flush(obj)

    def close(self) -> None:
        """Idempotent: drop the connection, then our use of the swtpm."""
        with self._mutex:
            esys, tctildr, self._esys, self._tctildr = self._esys, self._tctildr, None, None
            if esys is not None:
                esys.close()
            if tctildr is not None:
                tctildr.close()
            if self._swtpm is not None:
                self._swtpm.detach()
                self._swtpm = None
