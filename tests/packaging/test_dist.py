"""The sdist and the wheel, built out of the checkout and each installed into a fresh venv.

`python -m build` runs on a copy of the source tree (the checkout gets no
build/ or egg-info), makes the sdist and builds the wheel from it (in this
venv, which has the build requirements: --no-isolation saves two build
environments); each is then pip-installed into its own empty venv outside
the tree (the sdist through pip's isolated build, as a user's would be),
whose `bmi` must report the layer and run a measured PD.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import busybox_path

ROOT = Path(__file__).resolve().parents[2]
# build output and local state that a source tree may hold but a build must not see
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "out", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis", ".build", "*.so", "*.o")
# what the wheel carries besides the code: the C PD client, the protocol, the units, the licence
DATA = ["bmi/data/bmi_client.c", "bmi/data/bmi_client.h", "bmi/data/protocol.md",
        "bmi/data/bmid.service", "bmi/data/bmid-xen.service"]
PLATFORM = sysconfig.get_platform().replace("-", "_").replace(".", "_")
# libbmi.so links this interpreter's libpython: the wheel is for this CPython, not abi3 (setup.py TaggedWheel)
CPYTHON = f"cp{sys.version_info.major}{sys.version_info.minor}"
WHEEL_TAG = f"{CPYTHON}-{CPYTHON}-{PLATFORM}"
TIMEOUT = 600

pytestmark = pytest.mark.slow


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without a path or venv of ours, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")},
            **(extra or {})}


def _run(*argv, cwd: Path, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """Run outside the checkout, with no path or venv of ours leaking in (`env`: variables to add)."""
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=_env(env), capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)


def _check(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{' '.join(done.args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _checkout_entries() -> set[str]:
    """Where a build in the checkout would leave its output: the top level and the package."""
    return {p.relative_to(ROOT).as_posix() for p in (*ROOT.iterdir(), *(ROOT / "bmi").iterdir())}


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("build", reason="the `build` package (test extra: pip install -e '.[test]') is missing")
    work = tmp_path_factory.mktemp("dist")
    src = work / "src"
    before = _checkout_entries()
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCE)
    _check(_run(sys.executable, "-m", "build", "--no-isolation", "--outdir", work / "out", src, cwd=work))
    sdists, wheels = sorted((work / "out").glob("bmi-*.tar.gz")), sorted((work / "out").glob("bmi-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted((work / "out").iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0], "work": work, "litter": _checkout_entries() - before}


@pytest.fixture(scope="module")
def venvs(dists) -> dict[str, Path]:
    """One fresh venv per artifact, installed side by side by this venv's pip (pip's cache serves both)."""
    def install(kind: str) -> Path:
        venv = dists["work"] / f"venv-{kind}"
        _check(_run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=dists["work"]))
        _check(_run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", dists[kind],
                    cwd=dists["work"]))
        return venv
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(("sdist", "wheel"), pool.map(install, ("sdist", "wheel"))))


def test_checkout_gets_no_build_litter(dists):
    assert not dists["litter"]


def test_wheel_carries_the_data_and_libbmi_and_is_tagged_for_this_cpython(dists):
    wheel = dists["wheel"]
    assert wheel.name == f"bmi-0.1.0-{WHEEL_TAG}.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tags = [line.split(": ", 1)[1] for line in zf.read("bmi-0.1.0.dist-info/WHEEL").decode().splitlines()
                if line.startswith("Tag: ")]
        assert zf.read("bmi/data/bmi_client.h") == (ROOT / "csrc" / "client" / "bmi_client.h").read_bytes()
        assert zf.read("bmi/data/bmid.service") == (ROOT / "systemd" / "bmid.service").read_bytes()
    assert tags == [WHEEL_TAG]
    for name in DATA + ["bmi-0.1.0.dist-info/licenses/LICENSE", "bmi/embed/bmi.h", "bmi/embed/libbmi.so"]:
        assert name in names
    shims = [n for n in names if n.endswith(".so") and n != "bmi/embed/libbmi.so"]
    assert "bmi/_spawn.abi3.so" in shims and "bmi/_measure.abi3.so" in shims
    assert all(n.endswith(".abi3.so") for n in shims), shims
    assert not [n for n in names if n.startswith("bmi/_build/")]


@pytest.mark.parametrize("kind", ["sdist", "wheel"])
def test_installed_bmi_runs_a_pd(venvs, dists, kind):
    venv, cwd = venvs[kind], dists["work"]
    where = _check(_run(venv / "bin" / "python", "-c",
                        "import bmi, importlib.resources as r; print(bmi.__file__);"
                        "print(r.files('bmi').joinpath('data/bmi_client.h').read_text(), end='')", cwd=cwd))
    path, header = where.stdout.split("\n", 1)
    assert Path(path).is_relative_to(venv)
    assert header == (ROOT / "csrc" / "client" / "bmi_client.h").read_text()

    info = json.loads(_check(_run(venv / "bin" / "bmi", "info", "--json", cwd=cwd)).stdout)
    assert info["driver"] == "linux"

    busybox = busybox_path()
    done = _run(venv / "bin" / "bmi", "run", busybox, "--", "busybox", "sh", "-c", "echo hi from a PD; exit 3",
                cwd=cwd)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hi from a PD\n"
    assert "sha256:" + hashlib.sha256(Path(busybox).read_bytes()).hexdigest() in done.stderr

    # libbmi from the installed package: a C program linked by its flags runs with no environment at all
    if shutil.which("cc") is None or shutil.which("swtpm") is None:
        pytest.skip("the C example needs cc and swtpm (it attests)")
    flags = _check(_run(venv / "bin" / "python", "-m", "bmi.embed", "--cflags", "--libs", cwd=cwd)).stdout.split()
    exe = cwd / f"toolstack-{kind}"
    _check(_run("cc", ROOT / "examples" / "toolstack.c", *flags, "-o", exe, cwd=cwd))
    done = subprocess.run([exe, busybox], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
                          env={"PATH": "/usr/bin:/bin", "BMI_STATE_DIR": str(cwd / f"state-{kind}"), "BMI_TPM": "swtpm"})
    assert done.returncode == 0 and "console: hello from a PD" in done.stdout, done.stdout + done.stderr


def test_pytest_plugin_from_the_wheel_alone(venvs, dists):
    """A rig's test file outside any source tree, with only the wheel (and pytest) installed: the plugin
    autoloads by its entry point, in session mode and against a bmid started from that venv."""
    if shutil.which("cc") is None or shutil.which("swtpm") is None:
        pytest.skip("the example builds a C PD program and attests it: needs cc and swtpm")
    venv, work = venvs["wheel"], dists["work"]
    _check(_run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "pytest",
                cwd=work))
    rig = work / "rig"
    rig.mkdir()
    for name in ("test_pair.py", "pair.c"):
        shutil.copy(ROOT / "examples" / "rig" / name, rig / name)
    env = {"BMI_STATE_DIR": str(work / "plugin-state"), "BMI_TPM": "swtpm",
           "BMI_PROGRAM_CACHE": str(work / "programs")}

    def pytest_run(*args: str) -> subprocess.CompletedProcess:
        return _run(venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_pair.py", *args,
                    cwd=rig, env=env)

    done = pytest_run()
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    socket_path = work / "bmid.sock"
    bmid = subprocess.Popen([str(a) for a in (venv / "bin" / "bmid", "--socket", socket_path, "--state-dir",
                                              work / "bmid-state", "--shutdown-grace", "2")], cwd=work, env=_env(env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if socket_path.exists() or bmid.poll() is not None:
                break
            time.sleep(0.05)
        assert bmid.poll() is None, bmid.stderr.read().decode()
        done = pytest_run(f"--bmi-uri=linux:///system?socket={socket_path}")
        assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
        listed = _check(_run(venv / "bin" / "bmi", "--uri", f"linux:///system?socket={socket_path}", "list",
                             "--json", cwd=work))
        assert json.loads(listed.stdout) == [], listed.stdout     # the factory destroyed what it made
    finally:
        bmid.terminate()
        bmid.wait(timeout=60)
        bmid.stderr.close()
