"""The TPM link itself: keys, sharing, shutdown, event log, self-measurement, failures."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bmi.errors import IntegrityError, InvalidArgument
from bmi.integrity import eventlog, selfmeasure
from bmi.integrity.service import IntegrityService

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")
PD = hashlib.sha256(b"pd").digest()


def _open(state_dir: Path, **extra: str) -> IntegrityService:
    return IntegrityService.open(config={"state_dir": str(state_dir), "tpm": "swtpm", **extra})


def _swtpms_for(state_dir: Path) -> list[int]:
    """Live (non-zombie) swtpm processes serving this state dir."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"swtpm" in cmd and str(state_dir).encode() in cmd and state != b"Z":
            pids.append(int(entry))
    return pids


def _policy():
    from bmi.types import IntegrityPolicy
    return IntegrityPolicy(PD)


def test_keys_persist_across_opens(state_dir):
    with _open(state_dir) as a:
        ak = a.describe()["ak_public_pem"]
        storage = a.storage_public()
    assert _swtpms_for(state_dir) == []                # stopped in between: state came from disk
    with _open(state_dir) as b:
        assert b.describe()["ak_public_pem"] == ak
        assert b.storage_public().split(b'"pcr_selection"')[0] == storage.split(b'"pcr_selection"')[0]


def test_close_leaves_no_transient_handle_and_no_swtpm(state_dir):
    from tpm2_pytss import ESAPI, TCTILdr, TPM2_CAP, TPM2_HC
    holder = _open(state_dir)                          # keeps the swtpm up while we look
    svc = _open(state_dir)
    svc.seal(_policy(), b"x")
    with pytest.raises(IntegrityError):
        svc.unseal(b"BMICRED1" + b"\x01" * 200)
    svc.integrity_link(b"n", PD)
    svc.close()
    svc.close()                                        # idempotent
    sock = holder.describe()["tcti"].split("path=", 1)[1]
    tcti = TCTILdr("swtpm", f"path={sock}")
    esys = ESAPI(tcti)
    try:
        _, data = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        assert list(data.data.handles) == []
    finally:
        esys.close()
        tcti.close()
    assert len(_swtpms_for(state_dir)) == 1
    holder.close()
    assert _swtpms_for(state_dir) == []


_WORKER = textwrap.dedent("""
    import sys
    from bmi.integrity.service import IntegrityService
    from bmi.integrity.verify import verify_report
    from bmi.types import IntegrityPolicy
    pd = bytes(32)
    with IntegrityService.open(config={"state_dir": sys.argv[1], "tpm": "swtpm"}) as s:
        for i in range(15):
            nonce = f"{sys.argv[2]}-{i}".encode()
            verify_report(s.integrity_link(nonce, pd), nonce=nonce, pd_integrity=pd, ak=s.attestation_key())
            assert s.unseal(s.seal(IntegrityPolicy(pd), nonce)).secret == nonce
    print("ok")
""")


def test_two_processes_share_one_swtpm(state_dir):
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(state_dir), str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip() == "ok", err
    assert _swtpms_for(state_dir) == []               # the last one out stopped it


def test_eventlog_records_self_and_pds_and_replays(service):
    desc = service.describe()
    log = service.eventlog()
    assert log[0]["bmi"]["event"] == "tvl" and log[0]["pcr"] == 13
    assert log[0]["bmi"]["measurement"] == desc["tvl_measurement"]
    service.record_pd(1, "pd-one", {"sha256": PD})                  # default: logged, not extended
    assert service.describe()["tvl_pcr_value"] == desc["tvl_pcr_value"]
    service.record_pd(2, "pd-two", {"sha256": PD, "sha384": bytes(48)}, extend=True)
    log = service.eventlog()
    assert [(r["bmi"]["event"], r["pcr"], r["bmi"].get("pd_id")) for r in log] == \
        [("tvl", 13, None), ("pd", None, 1), ("pd", 13, 2)]
    value = bytes.fromhex(service.describe()["tvl_pcr_value"])
    assert value != bytes.fromhex(desc["tvl_pcr_value"])
    assert eventlog.replay(log, 13) == value
    assert service.describe()["eventlog_replays"] is True
    lines = service.ima_lines()
    assert len(lines) == 2 and lines[1].endswith(f"ima-ng sha256:{PD.hex()} pd-two")
    assert lines[0].startswith("13 ")
    with pytest.raises(InvalidArgument, match="PD 4 needs a 32-byte 'sha256' digest"):
        service.record_pd(4, "bad", {"sha384": bytes(48)})


def test_self_measurement_once_per_boot_and_tvl(state_dir):
    with _open(state_dir) as a, _open(state_dir) as b:          # same TVL twice: one extend
        assert len(b.eventlog()) == 1
        assert a.describe()["tvl_pcr_value"] == b.describe()["tvl_pcr_value"]
        with _open(state_dir, mode="other config") as c:         # a different TVL: a second record
            assert [r["bmi"]["event"] for r in c.eventlog()] == ["tvl", "tvl"]
            assert c.describe()["eventlog_replays"]
    with _open(state_dir) as d:                                  # new swtpm boot: a fresh log
        assert len(d.eventlog()) == 1


def test_self_measurement_covers_code_and_config(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "sub" / "b.py").write_text("y = 2\n")
    (root / "notes.txt").write_text("not code")
    base = selfmeasure.measure_tvl({"k": "v"}, root)
    assert base.files == 2
    assert selfmeasure.measure_tvl({"k": "v"}, root) == base
    assert selfmeasure.measure_tvl({"k": "w"}, root).digest != base.digest
    (root / "notes.txt").write_text("still not code")
    assert selfmeasure.measure_tvl({"k": "v"}, root).digest == base.digest
    (root / "sub" / "b.py").write_text("y = 3\n")
    assert selfmeasure.measure_tvl({"k": "v"}, root).digest != base.digest


def test_swtpm_dying_mid_operation_is_integrity_error(state_dir):
    svc = _open(state_dir)
    try:
        [pid] = _swtpms_for(state_dir)
        os.kill(pid, signal.SIGKILL)                     # our own swtpm (this state dir)
        t0 = time.monotonic()
        with pytest.raises(IntegrityError, match="TPM quote failed"):
            svc.integrity_link(b"n", PD)
        assert time.monotonic() - t0 < 5
    finally:
        svc.close()


@pytest.mark.parametrize("pcr", ["7", "16", "23", "24", "x"])
def test_bad_tvl_pcr_config(state_dir, pcr):
    with pytest.raises(InvalidArgument, match=f"tvl_pcr={pcr!r}"):
        _open(state_dir, tvl_pcr=pcr)
    assert _swtpms_for(state_dir) == []


def test_configurable_tvl_pcr(state_dir):
    with _open(state_dir, tvl_pcr="14") as s:
        report = s.integrity_link(b"n", PD)
        assert report.pcr_selection == "sha256:0,1,2,3,4,5,6,7,14" and report.pcr_values[14] != bytes(32)
