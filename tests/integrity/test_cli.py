"""The integrity subcommands, driven through argparse as `bmi` would, on a private swtpm."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil

import pytest

from bmi.errors import IntegrityError, InvalidArgument
from bmi.cli import integrity as cli
from bmi.integrity.service import IntegrityService

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")


@pytest.fixture
def bmi(monkeypatch, state_dir):
    monkeypatch.setenv("BMI_STATE_DIR", str(state_dir))
    monkeypatch.setenv("BMI_TPM", "swtpm")
    parser = argparse.ArgumentParser(prog="bmi")
    cli.register(parser.add_subparsers(required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        return args.func(args)
    return run


def test_tpm_and_eventlog(bmi, capsys, tmp_path):
    assert bmi("tpm", "--json", "--storage-public-out", str(tmp_path / "sp.json")) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "software" and info["tvl_pcr"] == 13 and "sha256" in info["pcr_banks"]
    with IntegrityService.open() as svc:
        ak = svc.attestation_key()
    assert (info["ak_fingerprint"], info["ak_public_pem"]) == (ak.fingerprint, ak.pem)
    assert info["ek_public_pem"] == ak.ek_pem and info["ek_public_area"] == ak.ek_public_area.hex()
    assert info["ek_certificate"] is None                  # our swtpm has no EK certificate in NV
    assert bmi("tpm") == 0
    text = capsys.readouterr().out
    assert f"ak_fingerprint    {ak.fingerprint}" in text and ak.pem in text and ak.ek_pem in text
    assert json.loads((tmp_path / "sp.json").read_text())["pcr_selection"] == info["pcr_selection"]
    assert bmi("eventlog", "--ima") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("13 ") and line.endswith(f"sha256:{info['tvl_measurement']} bmi-tvl")
    assert bmi("eventlog", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["content_type"] == "ima_template"


def test_seal_local_and_offline(bmi, capsys, tmp_path, state_dir):
    digest = hashlib.sha256(b"img").hexdigest()
    (tmp_path / "policy.json").write_text(json.dumps(
        {"pd_integrity": digest, "pd_connections": [{"con_type": "ipc", "mode": "RW", "dest": digest}]}))
    (tmp_path / "secret").write_bytes(b"top secret")
    assert bmi("tpm", "--storage-public-out", str(tmp_path / "sp.json")) == 0
    common = ["--policy", str(tmp_path / "policy.json"), "--secret-file", str(tmp_path / "secret")]
    assert bmi("seal", *common, "-o", str(tmp_path / "local.blob")) == 0
    assert bmi("seal", *common, "-o", str(tmp_path / "remote.blob"), "--storage-public", str(tmp_path / "sp.json")) == 0
    with IntegrityService.open() as svc:     # the commands' config: the same TVL
        for name in ("local.blob", "remote.blob"):
            assert svc.unseal((tmp_path / name).read_bytes()).secret == b"top secret"
    (tmp_path / "bad.json").write_text('{"pd_integrity": "zz"}')
    with pytest.raises(InvalidArgument, match="policy .*bad.json: pd_integrity"):
        bmi("seal", "--policy", str(tmp_path / "bad.json"), "--secret-file", str(tmp_path / "secret"), "-o", "x")


def test_verify(bmi, capsys, tmp_path, state_dir):
    image = tmp_path / "image"
    image.write_bytes(b"\x7fELF pretend")
    digest = hashlib.sha256(image.read_bytes()).digest()
    with IntegrityService.open() as svc:     # the commands' config: the same TVL
        report = svc.integrity_link(b"\x01\x02", digest)
        ak = svc.attestation_key()
    (tmp_path / "r.json").write_text(report.to_json())
    (tmp_path / "ak.pem").write_text(ak.pem)
    pin = ("--ak", str(tmp_path / "ak.pem"))
    assert bmi("verify", str(tmp_path / "r.json"), "--nonce", "0102", "--expect-image", str(image), *pin) == 0
    assert capsys.readouterr().out.startswith("OK: PD")
    assert bmi("verify", str(tmp_path / "r.json"), "--nonce", "0102", "--expect-image", str(image),
               "--ak", ak.fingerprint, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["trusted_report_key"] is False and out["ak_fingerprint"] == ak.fingerprint
    with pytest.raises(IntegrityError, match="nonce check failed"):     # bmi/cli main reports it (exit 1)
        bmi("verify", str(tmp_path / "r.json"), "--nonce", "0103", "--expect-digest", digest.hex(), "--json", *pin)
    with pytest.raises(IntegrityError, match="PCR value check failed"):
        bmi("verify", str(tmp_path / "r.json"), "--nonce", "0102", "--expect-digest", digest.hex(),
            "--pcr", f"13={'00' * 32}", *pin)
    with pytest.raises(InvalidArgument, match="--ak: cannot read .*nowhere.pem: No such file.*give the AK.s PEM file"):
        bmi("verify", str(tmp_path / "r.json"), "--nonce", "0102", "--expect-image", str(image),
            "--ak", str(tmp_path / "nowhere.pem"))
    with pytest.raises(InvalidArgument, match="not a fingerprint"):
        bmi("verify", str(tmp_path / "r.json"), "--nonce", "0102", "--expect-image", str(image), "--ak", "sha256:12")


def test_verify_unpinned(bmi, capsys, tmp_path, state_dir):
    """Without --ak a genuine report is refused, saying how to pin; --trust-report-key accepts it loudly."""
    digest = hashlib.sha256(b"img").digest()
    with IntegrityService.open() as svc:
        (tmp_path / "r.json").write_text(svc.integrity_link(b"\x01", digest).to_json())
    args = ("verify", str(tmp_path / "r.json"), "--nonce", "01", "--expect-digest", digest.hex())
    with pytest.raises(IntegrityError, match="--ak FILE\\|FINGERPRINT"):
        bmi(*args)
    assert "WARNING" not in capsys.readouterr().err
    assert bmi(*args, "--trust-report-key") == 0
    out = capsys.readouterr()
    assert "signed by the UNPINNED key" in out.out and out.err.startswith("WARNING: trusted the attestation key")
    assert bmi(*args, "--trust-report-key", "--json") == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["trusted_report_key"] is True and out.err.startswith("WARNING: ")
