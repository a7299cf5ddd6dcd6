"""The pytest plugin (bmi.testing) as a rig author uses it: a pytest run in a subprocess, real PDs.

Each test writes a small test file, runs pytest on it with the plugin loaded
by its entry point (no conftest), and checks the run's outcome and what it
left in bmid or on the host.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bmi
from bmi.testing import build_pd_program, owner_gone, owner_tag
from tests.helpers import busybox_path
from tests.server.bmid import running_bmid

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "rig" / "test_pair.py"
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build PD programs")
needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None, reason="needs swtpm for attestation")


def run_pytest(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """pytest in a subprocess, with the state (TPM, program cache) under tmp_path."""
    env = {**os.environ, "BMI_STATE_DIR": str(tmp_path / "state"), "BMI_TPM": "swtpm",
           "BMI_PROGRAM_CACHE": str(tmp_path / "programs"), "PYTHONPATH": str(REPO)}
    env.pop("BMI_URI", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                           "--rootdir", str(tmp_path), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_test(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "test_inner.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def system_bmid(tmp_path):
    with running_bmid(tmp_path / "bmid", tpm=True) as daemon:
        yield daemon


@needs_gcc
@needs_swtpm
def test_example_passes_in_session_mode(tmp_path):
    done = run_pytest(tmp_path, str(EXAMPLE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


@needs_gcc
@needs_swtpm
def test_example_passes_through_bmid_and_leaves_nothing(tmp_path, system_bmid):
    done = run_pytest(tmp_path, str(EXAMPLE), "--bmi-uri", system_bmid.uri)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    with system_bmid.open() as mgr:
        assert mgr.list_pd() == [0]


def test_factory_destroys_its_pds_when_the_test_fails(tmp_path, system_bmid):
    write_test(tmp_path, f"""
        def test_fails(pd_factory):
            pd_factory({busybox_path()!r}, argv=["busybox", "sleep", "60"])
            pd_factory({busybox_path()!r}, argv=["busybox", "sleep", "60"], mem="32M")
            assert False, "on purpose"
    """)
    done = run_pytest(tmp_path, "test_inner.py", "--bmi-uri", system_bmid.uri)
    assert done.returncode == 1 and "on purpose" in done.stdout, done.stdout + done.stderr
    with system_bmid.open() as mgr:
        assert mgr.list_pd() == [0]


def test_pds_of_a_killed_run_are_destroyed_by_the_next_run(tmp_path, system_bmid):
    write_test(tmp_path, f"""
        import os, signal
        def test_killed(pd_factory):
            pd = pd_factory({busybox_path()!r}, argv=["busybox", "sleep", "600"])
            print("PD", pd.get_pd_id(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = run_pytest(tmp_path, "-s", "test_inner.py", "--bmi-uri", system_bmid.uri)
    assert killed.returncode == -signal.SIGKILL
    orphan = int(killed.stdout.split("PD ", 1)[1].split()[0])
    with system_bmid.open() as mgr:
        assert orphan in mgr.list_pd()
        assert owner_gone(mgr.get_controller(orphan).get_config_param("/owner"))
    write_test(tmp_path, "def test_next(bmi_manager):\n    pass\n")
    done = run_pytest(tmp_path, "test_inner.py", "--bmi-uri", system_bmid.uri)
    assert done.returncode == 0, done.stdout + done.stderr
    with system_bmid.open() as mgr:
        assert orphan not in mgr.list_pd()


def test_cli_lists_owners_and_destroys_the_orphans(tmp_path, system_bmid):
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    with system_bmid.open() as mgr:
        orphan, mine = (mgr.allocate_pd(bmi.PDDescription(mem=32 << 20)) for _ in range(2))
        orphan.set_config_param("/owner", owner_tag(os.getpid()).replace(f":{os.getpid()}:", f":{dead.pid}:"))
        mine.set_config_param("/owner", owner_tag())

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "bmi.cli", "--uri", system_bmid.uri, *args],
                                  capture_output=True, text=True, timeout=60)
        listed = {row["pd"]: row for row in json.loads(cli("list", "--owner", "--json").stdout)}
        assert listed[orphan.get_pd_id()]["owner_gone"] and not listed[mine.get_pd_id()]["owner_gone"]
        assert "(gone)" in cli("list", "--owner").stdout
        assert cli("destroy").returncode == 2                   # neither a PD nor --owner-gone
        done = cli("destroy", "--owner-gone", "--json")
        assert done.returncode == 0 and json.loads(done.stdout) == {"destroyed": [orphan.get_pd_id()]}
        assert mgr.list_pd() == [0, mine.get_pd_id()]


def test_sweep_spares_pds_of_live_owners_and_untagged_pds(tmp_path, system_bmid):
    with system_bmid.open() as mgr:
        mine = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        mine.set_config_param("/owner", owner_tag())
        untagged = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        write_test(tmp_path, "def test_next(bmi_manager):\n    pass\n")
        done = run_pytest(tmp_path, "test_inner.py", "--bmi-uri", system_bmid.uri)
        assert done.returncode == 0, done.stdout + done.stderr
        assert {mine.get_pd_id(), untagged.get_pd_id()} <= set(mgr.list_pd())


def test_no_leaks_fails_a_test_that_leaves_a_pd(tmp_path, system_bmid):
    write_test(tmp_path, """
        import pytest, bmi
        @pytest.mark.bmi_no_leaks
        def test_leaks(bmi_manager):
            bmi_manager.allocate_pd(bmi.PDDescription(mem=32 << 20))
        def test_clean(bmi_manager, bmi_no_leaks):
            bmi_manager.allocate_pd(bmi.PDDescription(mem=32 << 20)).destroy()
    """)
    done = run_pytest(tmp_path, "test_inner.py", "--bmi-uri", system_bmid.uri)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "bmi_no_leaks: PDs left" in done.stdout and "2 passed, 1 error" in done.stdout


def test_no_leaks_option_fails_a_leaked_host_process(tmp_path):
    write_test(tmp_path, """
        import subprocess
        def test_leaks():
            subprocess.Popen(["sleep", "30"])
    """)
    done = run_pytest(tmp_path, "test_inner.py", "--bmi-no-leaks")
    assert done.returncode == 1 and "host processes left" in done.stdout, done.stdout + done.stderr


@needs_gcc
@needs_swtpm
def test_attest_names_the_failed_check(tmp_path):
    write_test(tmp_path, f"""
        def test_wrong_digest(pd_factory, bmi_attest):
            pd = pd_factory({busybox_path()!r}, argv=["busybox", "sleep", "30"])
            bmi_attest(pd, expect_digest="00" * 32)
    """)
    done = run_pytest(tmp_path, "test_inner.py")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "bmi_attest: PD 1 does not attest" in done.stdout and "sha256:" in done.stdout


@needs_gcc
def test_pd_program_is_cached_and_reports_compile_errors(tmp_path):
    first = build_pd_program("int main(void) { return 0; }\n", cache_dir=tmp_path)
    assert first == build_pd_program("int main(void) { return 0; }\n", cache_dir=tmp_path)
    assert first.read_bytes()[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in first.read_bytes()[:4096]
    with pytest.raises(bmi.InvalidArgument, match="does not build"):
        build_pd_program("int main(void) { return nope; }\n", cache_dir=tmp_path)


@needs_gcc
@needs_swtpm
def test_fixtures_under_xdist(tmp_path):
    pytest.importorskip("xdist")
    write_test(tmp_path, f"""
        import pytest
        from bmi.testing import wait_console
        @pytest.mark.parametrize("n", range(4))
        def test_many(pd_factory, bmi_attest, n):
            pd = pd_factory({busybox_path()!r}, argv=["busybox", "sh", "-c", f"echo hi {{n}}; sleep 5"])
            wait_console(pd, f"hi {{n}}")
            bmi_attest(pd, expect_image={busybox_path()!r})
    """)
    done = run_pytest(tmp_path, "-n", "2", "test_inner.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
