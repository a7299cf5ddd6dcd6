"""The `bmi` pytest plugin: managers, PDs, C PD programs and attestation as fixtures.

Registered through the `pytest11` entry point, so `pip install bmi` makes
these fixtures available with no conftest:

    bmi_manager      an open manager (URI from --bmi-uri or @pytest.mark.bmi_uri), closed after the test
    pd_factory       pd_factory(image, *, argv=None, mem="64M", cpus=1, start=True, name=None, env=None,
                     connections=None) -> PDController; every PD it made is destroyed after the test
    bmi_pd_program   bmi_pd_program(source_or_path) -> Path of a static ELF built with the PD client library
    bmi_attest       bmi_attest(pd, *, expect_image=None, expect_digest=None) -> IntegrityReport, verified
                     against the manager's attestation key, pinned once per test run
    bmi_no_leaks     fails a test that leaves a PD, host process, cgroup or fd of bmi's behind
                     (opt in: @pytest.mark.bmi_no_leaks or --bmi-no-leaks)

In system mode (bmid) each PD the factory makes carries config /owner =
host:pid:starttime of the pytest process; at the start of a run the
plugin destroys the PDs whose owner process has ended, so a SIGKILLed run
leaves nothing behind after the next one.
"""
from __future__ import annotations

import os
import re
import shlex
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import bmi

from . import OWNER_PARAM, build_pd_program, child_processes, destroy_orphans, file_digest, owner_tag

DEFAULT_URI = "linux:///session"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bmi", "bmi protection domains")
    group.addoption("--bmi-uri", default=None,
                    help="URI of the manager bmi_manager opens (default: $BMI_URI or linux:///session); "
                         "e.g. linux:///system to run the same tests against bmid")
    group.addoption("--bmi-no-leaks", action="store_true", default=False,
                    help="check every test for PDs, processes, cgroups and fds of bmi's left behind")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bmi_uri(uri): the URI bmi_manager opens for this test")
    config.addinivalue_line("markers", "bmi_no_leaks: fail the test if it leaves PDs, processes, cgroups "
                                       "or fds of bmi's behind")
    config.pluginmanager.register(_PinnedKeys(), "bmi-pinned-keys")


def _uri(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("bmi_uri")
    if marker:
        return marker.args[0]
    return request.config.getoption("--bmi-uri") or os.environ.get("BMI_URI") or DEFAULT_URI


def _is_system(uri: str) -> bool:
    return "/system" in uri.split("?", 1)[0]


_SWEPT: set[str] = set()
_SWEEP_LOCK = threading.Lock()


def _sweep_orphans(mgr: Any, uri: str) -> None:
    """Once per run and URI: destroy bmid's PDs whose owner (an earlier pytest) has ended."""
    with _SWEEP_LOCK:
        if uri in _SWEPT:
            return
        _SWEPT.add(uri)
    destroy_orphans(mgr)


@pytest.fixture
def bmi_manager(request: pytest.FixtureRequest) -> Iterator[bmi.PDManagement]:
    """An open bmi manager for this test, closed afterwards (session-mode PDs end with it)."""
    uri = _uri(request)
    try:
        mgr = bmi.open(uri)
    except bmi.BMIError as e:
        pytest.fail(f"bmi_manager: cannot open {uri}: {e}", pytrace=False)
    try:
        if _is_system(uri):
            _sweep_orphans(mgr, uri)
        yield mgr
    finally:
        mgr.close()


def _as_image(image: Any) -> Any:
    if isinstance(image, (str, os.PathLike)):
        return bmi.FileImage(os.fspath(image))
    return image


class PDFactory:
    """Makes PDs for one test and destroys them all, newest first, when the test ends."""

    def __init__(self, mgr: bmi.PDManagement, owner: str | None):
        self.mgr, self.owner = mgr, owner
        self.made: list[bmi.PDController] = []

    def __call__(self, image: Any, *, argv: list[str] | None = None, mem: int | str = "64M", cpus: int = 1,
                 start: bool = True, name: str | None = None, env: dict[str, str] | None = None,
                 connections: dict[Any, list[bmi.ConnectionPolicy]] | None = None) -> bmi.PDController:
        pd = self.mgr.allocate_pd(bmi.PDDescription(mem=mem, cpu=cpus))
        self.made.append(pd)
        if self.owner:
            pd.set_config_param(OWNER_PARAM, self.owner)
        if name is not None:
            pd.set_config_param("/name", name)
        pd.setup_pd(_as_image(image))
        if argv is not None:
            pd.set_config_param("/boot/cmdline", shlex.join(argv))
        for key, value in (env or {}).items():
            pd.set_config_param(f"/boot/env/{key}", value)
        for peer, policies in (connections or {}).items():
            pd.set_allowed_connections(peer.get_pd_id() if hasattr(peer, "get_pd_id") else peer, policies)
        if start:
            pd.request_status_change(bmi.PDStatus.RUNNING)
        return pd

    def destroy_all(self) -> None:
        while self.made:
            try:
                self.made.pop().destroy()
            except bmi.NoSuchDomain:
                pass        # the test destroyed it already


@pytest.fixture
def pd_factory(bmi_manager: bmi.PDManagement, request: pytest.FixtureRequest) -> Iterator[PDFactory]:
    """pd_factory(image, *, argv, mem, cpus, start, name, env, connections) -> PDController."""
    factory = PDFactory(bmi_manager, owner_tag() if _is_system(_uri(request)) else None)
    try:
        yield factory
    finally:
        factory.destroy_all()


@pytest.fixture
def bmi_pd_program(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str | os.PathLike[str]], Path]:
    """bmi_pd_program(source_or_path) -> Path of a static ELF that may use bmi_client.h (cached)."""
    def build(source_or_path: str | os.PathLike[str]) -> Path:
        try:
            return build_pd_program(source_or_path)
        except bmi.NotSupported as e:
            pytest.skip(str(e))
    return build


class _PinnedKeys:
    """The attestation key of each URI, taken at its first use in this run and pinned from then on."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.lock = threading.Lock()

    def pin(self, uri: str, mgr: Any) -> Any:
        with self.lock:
            if uri not in self.keys:
                self.keys[uri] = mgr.get_attestation_key()
            return self.keys[uri]


def _expected_digest(pd: Any, expect_image: Any, expect_digest: Any) -> bytes:
    if expect_digest is not None:
        return bytes.fromhex(expect_digest) if isinstance(expect_digest, str) else bytes(expect_digest)
    if isinstance(expect_image, (str, os.PathLike)):
        return file_digest(expect_image)
    if expect_image is not None:
        import hashlib
        digest, size, offset = hashlib.sha256(), expect_image.get_image_size(), 0
        while offset < size:
            chunk = expect_image.get_data(offset, min(1 << 20, size - offset))
            digest.update(chunk)
            offset += len(chunk)
        return digest.digest()
    return pd.measurement()["sha256"]      # only that the report speaks for the PD's own measurement


@pytest.fixture
def bmi_attest(bmi_manager: bmi.PDManagement, request: pytest.FixtureRequest) -> Callable[..., bmi.IntegrityReport]:
    """bmi_attest(pd, *, expect_image=None, expect_digest=None) -> the PD's verified IntegrityReport."""
    pinned = request.config.pluginmanager.get_plugin("bmi-pinned-keys")
    uri = _uri(request)

    def attest(pd: bmi.PDController, *, expect_image: Any = None, expect_digest: Any = None) -> bmi.IntegrityReport:
        ak = pinned.pin(uri, bmi_manager)
        nonce = os.urandom(32)
        expected = _expected_digest(pd, expect_image, expect_digest)
        report = pd.get_integrity_link(nonce)
        try:
            bmi.verify_report(report, nonce=nonce, pd_integrity=expected, ak=ak.pem)
        except bmi.IntegrityError as e:
            pytest.fail(f"bmi_attest: PD {pd.get_pd_id()} does not attest (key {ak.fingerprint}): {e}",
                        pytrace=False)
        return report
    return attest


def _bmi_fds() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if re.match(r"/memfd:bmi|socket:|pipe:|anon_inode:\[pidfd\]", target) and \
                not target.startswith("/memfd:bmi-init"):   # made once per process, by design
            found[int(name)] = target
    return found


def _cgroups() -> set[str]:
    from ..drivers.linux.cgroups import groups_of_this_process
    return groups_of_this_process(f"bmi-{os.getpid()}-")


@pytest.fixture
def bmi_no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test when it leaves a PD, a host process, a cgroup or an fd of bmi's behind."""
    mgr = request.getfixturevalue("bmi_manager") if "bmi_manager" in request.fixturenames else None
    before_pds = set(mgr.list_pd()) if mgr else set()
    children, groups, fds = child_processes(), _cgroups(), _bmi_fds()
    yield
    import time
    deadline = time.monotonic() + 3
    while True:
        problems = []
        if mgr is not None:
            try:
                extra = set(mgr.list_pd()) - before_pds
            except bmi.BMIError:
                extra = set()
            if extra:
                problems.append(f"PDs left: {sorted(extra)}")
        if extra_children := child_processes() - children:
            problems.append(f"host processes left: {sorted(extra_children)}")
        if extra_groups := _cgroups() - groups:
            problems.append(f"cgroups left: {sorted(extra_groups)}")
        now = _bmi_fds()
        if extra_fds := {fd: t for fd, t in now.items() if fds.get(fd) != t}:
            problems.append(f"fds left: {extra_fds}")
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if problems:
        pytest.fail("bmi_no_leaks: " + "; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _bmi_no_leaks_opt_in(request: pytest.FixtureRequest) -> None:
    """--bmi-no-leaks or @pytest.mark.bmi_no_leaks turn bmi_no_leaks on for a test."""
    if request.config.getoption("--bmi-no-leaks") or request.node.get_closest_marker("bmi_no_leaks"):
        request.getfixturevalue("bmi_no_leaks")
