"""IntegrityManagement (spec 7.4) through the API, against a real swtpm."""
import hashlib
import shutil

import pytest

import bmi
from bmi import ConnectionIntegrityPolicy, ConnectionPolicy, ConnectionType, IntegrityPolicy
from tests.helpers import busybox_path

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")


def _ready(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    pd.setup_pd(bmi.FileImage(busybox_path()))
    return pd


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).digest()


def test_integrity_link_binds_nonce_and_measurement(tmgr):
    pd = _ready(tmgr)
    ak = tmgr.get_attestation_key()
    report = pd.get_integrity_link(b"nonce-1")
    assert report.pd_integrity == _digest(busybox_path())
    assert report.tpm == "software"
    bmi.verify_report(report, nonce=b"nonce-1", pd_integrity=_digest(busybox_path()), ak=ak.pem)
    with pytest.raises(bmi.IntegrityError, match="nonce"):
        bmi.verify_report(report, nonce=b"nonce-2", pd_integrity=_digest(busybox_path()), ak=ak.pem)
    with pytest.raises(bmi.IntegrityError):
        bmi.verify_report(report, nonce=b"nonce-1", pd_integrity=b"\0" * 32, ak=ak.pem)
    again = bmi.IntegrityReport.from_json(report.to_json())
    bmi.verify_report(again, nonce=b"nonce-1", pd_integrity=_digest(busybox_path()), ak=ak.fingerprint)


def test_attestation_key_is_the_reports_signer(tmgr):
    ak = tmgr.get_attestation_key()
    assert ak.fingerprint.startswith("sha256:") and ak.pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert _ready(tmgr).get_integrity_link(b"n").pubkey.decode() == ak.pem
    assert tmgr.get_attestation_key() == ak


def test_attestation_key_without_integrity_says_why(mgr):
    with pytest.raises(bmi.NotSupported, match="integrity=False"):
        mgr.get_attestation_key()


@pytest.mark.parametrize("nonce", [b"", b"x" * 65, "text", None])
def test_bad_nonces(tmgr, nonce):
    pd = _ready(tmgr)
    with pytest.raises(bmi.InvalidArgument):
        pd.get_integrity_link(nonce)


def test_integrity_link_needs_an_image(tmgr):
    pd = tmgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    with pytest.raises(bmi.InvalidState, match="setup_pd"):
        pd.get_integrity_link(b"n")
    with pytest.raises(bmi.InvalidState):
        tmgr.get_controller().get_integrity_link(b"n")


def test_without_integrity_the_calls_say_why(mgr):
    pd = _ready(mgr)
    with pytest.raises(bmi.NotSupported, match="integrity=False"):
        pd.get_integrity_link(b"n")
    with pytest.raises(bmi.NotSupported):
        mgr.seal_credentials(IntegrityPolicy(b"\1" * 32), b"s")


def test_protected_credentials_released_only_to_the_measured_pd(tmgr):
    pd = _ready(tmgr)
    policy = IntegrityPolicy(_digest(busybox_path()))
    blob = tmgr.seal_credentials(policy, b"the secret")
    assert pd.get_protected_credentials(policy, blob) == b"the secret"
    other = tmgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    other.setup_pd(bmi.BytesImage(open(busybox_path(), "rb").read() + b"\0"))     # a different image
    assert other.get_protected_credentials(policy, blob) == b""
    wrong_policy = IntegrityPolicy(_digest(busybox_path()), (ConnectionIntegrityPolicy(ConnectionType.IPC, 3, b"x"),))
    assert pd.get_protected_credentials(wrong_policy, blob) == b""       # policy_validation mismatch
    assert pd.get_protected_credentials(policy, b"garbage") == b""
    assert pd.get_protected_credentials(policy, blob[:-1] + bytes([blob[-1] ^ 1])) == b""


def test_offline_wrapped_credentials(tmgr):
    pd = _ready(tmgr)
    policy = IntegrityPolicy(_digest(busybox_path()))
    blob = bmi.wrap_credentials(policy, b"from afar", tmgr.get_storage_public())
    assert pd.get_protected_credentials(policy, blob) == b"from afar"


def test_credentials_need_the_listed_connections(tmgr):
    pd = _ready(tmgr)
    peer = tmgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    peer_image = open(busybox_path(), "rb").read() + b"peer"
    peer.setup_pd(bmi.BytesImage(peer_image))
    need = ConnectionIntegrityPolicy(ConnectionType.STREAM, bmi.READ, hashlib.sha256(peer_image).digest())
    policy = IntegrityPolicy(_digest(busybox_path()), (need,))
    blob = tmgr.seal_credentials(policy, b"needs a peer")
    assert pd.get_protected_credentials(policy, blob) == b""
    pd.set_allowed_connections(peer.get_pd_id(), [ConnectionPolicy(ConnectionType.IPC, bmi.RW)])
    assert pd.get_protected_credentials(policy, blob) == b""               # wrong type
    pd.set_allowed_connections(peer.get_pd_id(), [ConnectionPolicy(ConnectionType.STREAM, bmi.RW)])
    assert pd.get_protected_credentials(policy, blob) == b"needs a peer"   # RW covers READ
    peer.destroy()
    assert pd.get_protected_credentials(policy, blob) == b""


def test_bad_policy_arguments(tmgr):
    pd = _ready(tmgr)
    with pytest.raises(bmi.InvalidArgument):
        pd.get_protected_credentials("policy", b"blob")
    with pytest.raises(bmi.InvalidArgument):
        pd.get_protected_credentials(IntegrityPolicy(b"x"), "blob")


def test_event_log_records_the_tvl_and_each_pd(tmgr):
    _ready(tmgr)
    events = tmgr.integrity_service().eventlog()
    kinds = [e.get("bmi", {}).get("event") for e in events]
    assert "tvl" in kinds
    assert any(_digest(busybox_path()).hex() in str(e) for e in events)
