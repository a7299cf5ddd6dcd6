"""libbmi from C: real programs compiled against bmi.h and libbmi.so through pkg-config, run as subprocesses.

The programs run with a bare environment (no PYTHONPATH, no
LD_LIBRARY_PATH): the run paths in bmi.pc and libbmi's own sys.path set-up
are what make them work.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest

import bmi
from bmi import embed
from bmi.channel.protocol import ERROR_CODES
from tests.helpers import busybox_path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DYNAMIC_ELF = "/usr/bin/true"
CODES = {cls.__name__: code for cls, code in ERROR_CODES.items()}

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("pkg-config") is None,
                                reason="needs a C compiler and pkg-config")


def bare_env(**extra: str) -> dict[str, str]:
    """What a C tool's environment may be: PATH and nothing of Python's."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **extra}


@pytest.fixture(scope="module")
def pkg_config_dir(tmp_path_factory):
    """bmi.pc as `make demo` installs it, in a directory of its own (the machine's may be another checkout's)."""
    if not os.path.exists(embed.LIBRARY):
        from bmi.embed.build import build
        build(python=sys.executable)
    directory = tmp_path_factory.mktemp("pkgconfig")
    done = subprocess.run([sys.executable, "-m", "bmi.embed", "--pc"], capture_output=True, text=True, check=True)
    (directory / "bmi.pc").write_text(done.stdout)
    return directory


def compile_c(pkg_config_dir, out_dir, *sources: str, extra: tuple[str, ...] = ()) -> str:
    """cc SOURCES $(pkg-config --cflags --libs bmi); the path of the program."""
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "bmi"], capture_output=True, text=True, check=True,
                           env=bare_env(PKG_CONFIG_PATH=str(pkg_config_dir))).stdout.split()
    exe = os.path.join(out_dir, os.path.splitext(os.path.basename(sources[0]))[0])
    subprocess.run(["cc", "-Wall", "-Wextra", "-Werror", *sources, *extra, *flags, "-lpthread", "-o", exe],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def probe(pkg_config_dir, tmp_path_factory):
    return compile_c(pkg_config_dir, tmp_path_factory.mktemp("probe"), os.path.join(HERE, "probe.c"))


def run(exe: str, *args: str, env: dict[str, str] | None = None, ok: bool = True, timeout: float = 120):
    done = subprocess.run([exe, *args], capture_output=True, text=True, env=env or bare_env(), timeout=timeout)
    assert (done.returncode == 0) == ok, f"{exe} {args}: rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def fields(out: str) -> dict[str, str]:
    """key=value lines, and 'name rc=.. code=.. message=..' lines as name -> the rest."""
    result = {}
    for line in out.splitlines():
        key, sep, value = line.partition(" " if " rc=" in line else "=")
        if sep:
            result[key] = value
    return result


def misuse(line: str) -> tuple[int, int, str]:
    rc, code, message = line.split(" ", 2)
    return int(rc[3:]), int(code[5:]), message[len("message="):]


def test_a_pd_runs_to_completion_with_its_exit_status(probe):
    out = fields(run(probe, "run", "linux:///session", busybox_path(), "busybox sh -c 'echo from-c; exit 7'"))
    with open(busybox_path(), "rb") as f:
        assert out["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert out["version"] == "1"
    assert int(out["status"]) == bmi.PDStatus.SHUTDOWN
    assert out["exit"] == "7"
    assert out["console"] == "from-c"
    assert out["listed"] == "2 first=0"         # the count, even above the capacity; 0 first
    assert out["cmdline"].startswith("busybox sh -c")
    assert out["after_destroy"] == f"-1 code={CODES['NoSuchDomain']}"


def test_killed_pd_has_no_exit_status(probe):
    out = fields(run(probe, "run", "linux:///session", busybox_path(), "busybox sh -c 'kill -9 $$'"))
    assert int(out["status"]) in (bmi.PDStatus.SHUTDOWN, bmi.PDStatus.CRASHED)
    assert out["exit"] == "-1"


def test_each_error_code_is_reached_by_a_real_misuse(probe):
    if not os.path.exists(DYNAMIC_ELF) or open(DYNAMIC_ELF, "rb").read(4) != b"\x7fELF":
        pytest.skip(f"{DYNAMIC_ELF} is not an ELF here")
    out = fields(run(probe, "errors", DYNAMIC_ELF))
    expected = {
        "bad_uri": ("InvalidArgument", "unknown URI 'nosuch:///session'"),
        "priority_11": ("InvalidArgument", "11 is outside -10..+10"),
        "unknown_pd": ("NoSuchDomain", "bmi_get_current_status: PD 4242 does not exist"),
        "run_before_setup": ("InvalidState", "has no image yet"),
        "dynamic_elf": ("ImageError", "dynamically linked"),
        "tiny_pd": ("InvalidArgument", "below the minimum"),
        "null_manager": ("InvalidArgument", "bmi_get_current_status: NULL"),
        "closed_manager": ("InvalidArgument", "not an open bmi_manager"),
    }
    for name, (kind, text) in expected.items():
        rc, code, message = misuse(out[name])
        assert (rc, code) == (-1, CODES[kind]), (name, out[name])
        assert text in message, (name, message)
    assert out["priority"] == "-3"


def test_codes_in_bmi_h_are_the_protocols(pkg_config_dir):
    """bmi.h's BMI_E_* and the PD protocol's codes are one table (and the header is the cdef)."""
    from bmi.embed.build import declarations
    defines = dict(line.split()[1:] for line in declarations()[0].splitlines() if line.startswith("#define"))
    names = {"InvalidArgument": "INVALID_ARGUMENT", "InvalidState": "INVALID_STATE", "NoSuchDomain": "NO_SUCH_DOMAIN",
             "PermissionDenied": "PERMISSION_DENIED", "NotSupported": "NOT_SUPPORTED", "ResourceError": "RESOURCE",
             "ImageError": "IMAGE", "IntegrityError": "INTEGRITY", "DriverUnavailable": "DRIVER_UNAVAILABLE",
             "BMIError": "BMI"}
    assert {names[k]: v for k, v in CODES.items()} == {k[6:]: int(v) for k, v in defines.items()
                                                       if k.startswith("BMI_E_") and k not in ("BMI_E_OK",
                                                                                              "BMI_E_INTERNAL")}
    assert {int(defines[f"BMI_STATUS_{s.name}"]) for s in bmi.PDStatus} == {s.value for s in bmi.PDStatus}


def test_file_buffer_and_callback_images_measure_the_same(probe):
    out = fields(run(probe, "images", busybox_path()))
    assert out["file"] == out["buffer"] == out["callback"] and len(out["file"]) == 64
    rc, code, message = misuse(out["broken_callback"])
    assert (rc, code) == (-1, CODES["ImageError"])
    assert "get_data at offset 0 returned -1" in message


def test_four_threads_at_once_each_with_its_own_last_error(probe):
    out = fields(run(probe, "threads", busybox_path()))
    assert [out[f"thread{i}"] for i in range(4)] == ["ok"] * 4
    assert out["left"] == "1"                   # only PD 0: every thread destroyed its PDs
    assert out["main_thread_code"] == "0"       # the workers' errors are not the main thread's


def test_connection_policies_from_c(probe):
    out = fields(run(probe, "connections"))
    assert out["allowed"] == "0" and out["none"] == "0"
    for name, text in (("bad_type", "types[0] = 9 is not a BMI_CONN_*"), ("bad_mode", "mode 7 is not READ"),
                       ("to_itself", "no connection to itself")):
        rc, code, message = misuse(out[name])
        assert (rc, code) == (-1, CODES["InvalidArgument"]), (name, out[name])
        assert text in message, (name, message)


def _processes_with(marker: str) -> list[int]:
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(path.split("/")[2]))
        except OSError:
            continue
    return found


def test_a_process_that_never_closes_leaves_no_session_pd(probe):
    marker = f"{os.getpid()}.{time.monotonic_ns() % 100000}"
    out = fields(run(probe, "keep", "linux:///session", busybox_path(), f"busybox sleep {marker}"))
    assert out["pd"] == "1"
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == [], "the PD outlived the process that made it"


def test_headers_of_libbmi_and_the_pd_client_go_together(pkg_config_dir, tmp_path):
    client_h = os.path.join(os.path.dirname(bmi.__file__), "data", "bmi_client.h")
    client_c = os.path.join(os.path.dirname(bmi.__file__), "data", "bmi_client.c")
    if not os.path.exists(client_h):
        found = glob.glob(os.path.join(ROOT, "**", "bmi_client.h"), recursive=True)
        client_h = next(p for p in found if ".venv" not in p)
        client_c = client_h[:-1] + "c"
    source = tmp_path / "both.c"
    source.write_text(
        '#include <bmi.h>\n#include "bmi_client.h"\n#include <bmi.h>\n#include <stdio.h>\n'
        "int main(void) {\n"
        "    char out[64];\n"
        "    printf(\"%d %d\\n\", BMI_E_NOT_SUPPORTED == -32005, BMI_E_RESOURCE == -32006);\n"
        "    printf(\"%d\\n\", bmi_channel_fd() < 0 ? bmi_last_error_code() : "
        "bmi_pd_get_config_param(bmi_channel_fd(), \"/boot/cmdline\", out, sizeof out));\n"
        "    return bmi_get_config_param(NULL, 1, \"/x\") == NULL && bmi_last_error_code() == "
        "BMI_E_INVALID_ARGUMENT ? 0 : 1;\n}\n")
    exe = compile_c(pkg_config_dir, str(tmp_path), str(source), client_c,
                    extra=("-I", os.path.dirname(client_h), "-pedantic"))
    assert run(exe) == "1 1\n0\n"


@pytest.fixture
def foreign_pem(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_attestation_from_c_verifies_with_the_pinned_key_only(probe, foreign_pem, tmp_path):
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    env = bare_env(BMI_STATE_DIR=str(tmp_path / "state"), BMI_TPM="swtpm", HOME=str(tmp_path))
    out = fields(run(probe, "attest", busybox_path(), foreign_pem, env=env))
    assert out["fingerprint"].startswith("sha256:")
    assert out["by_fingerprint"] == "0" and out["by_pem"] == "0"
    for name, text in (("wrong_nonce", "nonce"), ("foreign_key", ""), ("other_digest", "")):
        rc, code, message = misuse(out[name])
        assert (rc, code) == (-1, CODES["IntegrityError"]), (name, out[name])
        assert text in message


def test_a_pd_made_from_c_in_system_mode_is_seen_from_python(probe, tmp_path):
    from tests.server.bmid import running_bmid
    with running_bmid(str(tmp_path)) as daemon:
        out = fields(run(probe, "keep", daemon.uri, busybox_path(), "busybox sleep 30"))
        with bmi.open(daemon.uri) as mgr:
            pd = mgr.get_controller(int(out["pd"]))
            assert pd.get_current_status() == bmi.PDStatus.RUNNING
            assert pd.measurement()["sha256"].hex() == out["sha256"]
            pd.destroy()


def test_example_toolstack_builds_runs_and_prints_its_attested_digest(pkg_config_dir, tmp_path):
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    source = os.path.join(ROOT, "examples", "toolstack.c")
    with open(source) as f:
        assert len(f.readlines()) < 80
    exe = compile_c(pkg_config_dir, str(tmp_path), source)
    out = run(exe, busybox_path(), env=bare_env(BMI_STATE_DIR=str(tmp_path / "state"), BMI_TPM="swtpm"))
    with open(busybox_path(), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert "console: hello from a PD" in out
    assert f": sha256:{digest}\n" in out.splitlines()[-1] + "\n" and out.splitlines()[-1].startswith("attested by sha256:")


def _own_errors(xml_path: str, objects: tuple[str, ...]) -> list[str]:
    """Valgrind errors whose innermost frame (past valgrind's own malloc/str* replacements) is in `objects`."""
    import xml.etree.ElementTree as ET
    found = []
    for error in ET.parse(xml_path).getroot().iter("error"):
        frames = [(f.findtext("obj") or "", f.findtext("fn") or "?") for f in error.find("stack").iter("frame")]
        frames = [f for f in frames if "vgpreload" not in f[0]]
        if frames and os.path.basename(frames[0][0]) in objects:
            found.append(f"{error.findtext('kind')} in {frames[0][1]}: {error.findtext('what')}")
    return found


@pytest.mark.slow
def test_valgrind_finds_no_invalid_access_in_libbmi(probe, tmp_path):
    """The error paths (no PD is spawned: valgrind cannot follow the in-process CLONE_VM spawn)."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (Debian package valgrind)")
    xml = tmp_path / "valgrind.xml"
    done = subprocess.run(["valgrind", "--error-exitcode=1", "--leak-check=no", "--xml=yes", f"--xml-file={xml}",
                           probe, "errors", DYNAMIC_ELF], capture_output=True, text=True, timeout=900,
                          env=bare_env(PYTHONMALLOC="malloc"))
    assert "closed_manager rc=-1" in done.stdout, done.stdout + done.stderr
    assert _own_errors(str(xml), ("libbmi.so", os.path.basename(probe))) == []
