"""PD launches in the Keylime measurement list and PCR 10, on a real swtpm; the policy writer; agent input."""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import bmi
from bmi.integrity.eventlog import template_data
from bmi.keylime.agent import Agent, AgentConfig, pcr_blob
from bmi.keylime.launches import IMA_PCR, LaunchList
from tests.helpers import busybox_path


def _launch(mgr, name: str | None = None, image: str | None = None):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    pd.setup_pd(bmi.FileImage(image or busybox_path()))
    pd.set_config_param("/boot/cmdline", "busybox true")
    if name is not None:
        pd.set_config_param("/name", name)
    pd.request_status_change(bmi.PDStatus.RUNNING)
    pd.wait(10)
    return pd


def _pcr10(mgr) -> bytes:
    return mgr.integrity_service().tpm.pcr_read("sha256", (IMA_PCR,))[IMA_PCR]


def _replay(lines: list[str]) -> bytes:
    value = bytes(32)
    for line in lines:
        _, template_hash, template, digest, name = line.split(" ")
        data = template_data(bytes.fromhex(digest.removeprefix("sha256:")), name)
        assert template == "ima-ng" and template_hash == hashlib.sha1(data).hexdigest()
        value = hashlib.sha256(value + hashlib.sha256(data).digest()).digest()
    return value


def test_without_keylime_mode_pcr10_is_never_touched(tmgr):
    _launch(tmgr, "web")
    assert _pcr10(tmgr) == bytes(32)
    assert LaunchList(tmgr.integrity_service().tpm).lines() == []


def test_launches_and_restarts_are_listed_and_replay_pcr10(tmgr):
    launches = LaunchList(tmgr.integrity_service().tpm)
    launches.enable()
    digest = hashlib.sha256(Path(busybox_path()).read_bytes()).hexdigest()
    pd = _launch(tmgr, "web")
    _launch(tmgr)                                        # unnamed: listed by its image
    pd.request_status_change(bmi.PDStatus.RESTARTING)    # each restart is a launch
    pd.wait(10)
    lines = launches.lines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        f"sha256:{digest} /bmi/pd/web", f"sha256:{digest} /bmi/image/{digest}", f"sha256:{digest} /bmi/pd/web"]
    assert all(line.startswith("10 ") for line in lines)
    assert _pcr10(tmgr) == _replay(lines)


def test_every_manager_on_the_tpm_appends_to_one_list(tmgr):
    LaunchList(tmgr.integrity_service().tpm).enable()
    _launch(tmgr, "first")
    code = ("import bmi, sys; from tests.keylime.test_launches import _launch\n"
            "with bmi.open() as other: _launch(other, 'second')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr         # another manager, same state directory and swtpm
    lines = LaunchList(tmgr.integrity_service().tpm).lines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["/bmi/pd/first", "/bmi/pd/second"]
    assert _pcr10(tmgr) == _replay(lines)


def test_a_name_that_cannot_be_a_list_path_is_refused_before_the_pd_runs(tmgr):
    LaunchList(tmgr.integrity_service().tpm).enable()
    pd = tmgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    pd.setup_pd(bmi.FileImage(busybox_path()))
    pd.set_config_param("/boot/cmdline", "busybox true")
    pd.set_config_param("/name", "web server")
    with pytest.raises(bmi.InvalidArgument, match="web server"):
        pd.request_status_change(bmi.PDStatus.RUNNING)
    assert pd.get_current_status() is bmi.PDStatus.READY
    assert _pcr10(tmgr) == bytes(32)


def _bmi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "bmi"), *args], capture_output=True, text=True)


def test_policy_allows_named_and_unnamed_images(tmp_path):
    out = tmp_path / "p.json"
    digest = hashlib.sha256(Path(busybox_path()).read_bytes()).hexdigest()
    r = _bmi("keylime-policy", "--image", f"web={busybox_path()}", "--digest", f"db=sha256:{'ab' * 32}",
             "--any-name", busybox_path(), "-o", str(out))
    assert r.returncode == 0, r.stderr
    policy = json.loads(out.read_text())
    assert policy["digests"] == {"/bmi/pd/web": [digest], "/bmi/pd/db": ["ab" * 32],
                                 f"/bmi/image/{digest}": [digest]}
    assert policy["meta"]["version"] == 1 and policy["ima"]["log_hash_alg"] == "sha1"


@pytest.mark.parametrize("args, why", [
    (["--image", "a b=/bin/true"], "NAME=VALUE"),
    (["--digest", "db=1234"], "64 hex"),
    (["--image", "web=/nonexistent"], "No such file"),
])
def test_policy_bad_input_is_one_line(args, why):
    r = _bmi("keylime-policy", *args)
    assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr


def test_pcr_blob_is_tpm2_tools_layout():
    blob = pcr_blob("sha256", {10: b"\1" * 32, 16: b"\2" * 32})
    assert struct.unpack_from("<IHB", blob) == (1, 0x000B, 3)
    assert blob[7:10] == (1 << 10 | 1 << 16).to_bytes(3, "little")
    assert len(blob) == 4 + 16 * 8 + 4 + 4 + 8 * 66
    assert struct.unpack_from("<II", blob, 132) == (1, 2)


def test_agent_quote_binds_the_nonce_and_refuses_bad_input(tmgr):
    from bmi.integrity import wire
    service = tmgr.integrity_service()
    agent = Agent(service, AgentConfig(trusted_client_ca="only read to serve"))
    code, result = agent.handle("GET", "/v2.2/quotes/integrity?nonce=abcDEF0123456789xyzA&mask=0x400&partial=0"
                                       "&ima_ml_entry=0", b"")
    assert code == 200 and result["sign_alg"] == "ecdsa" and result["ima_measurement_list"] == ""
    attest = __import__("base64").b64decode(result["quote"][1:].split(":")[0])
    assert wire.parse_quote(attest).extra_data == b"abcDEF0123456789xyzA"
    pcr16 = service.tpm.pcr_read("sha256", (16,))[16]
    assert pcr16 == hashlib.sha256(bytes(32) + hashlib.sha256(result["pubkey"].encode()).digest()).digest()
    assert agent.handle("GET", "/v2.2/quotes/integrity?nonce=no%20spaces", b"")[0] == 400
    assert agent.handle("GET", "/v2.2/keys/pubkey", b"")[0] == 404
