import os

import pytest

import bmi
from tests.server.bmid import Bmid


def pytest_configure(config):
    config.addinivalue_line("markers", "session_only(reason): the test needs an in-process manager; "
                                       "skipped in the linux:///system run")


@pytest.fixture(scope="session", autouse=True)
def bmid(tmp_path_factory):
    """One real bmid for the system-mode run of the API suite (started before any leak check looks)."""
    if os.geteuid() != 0:
        yield None
        return
    daemon = Bmid(str(tmp_path_factory.mktemp("bmid"))).start()
    yield daemon
    daemon.close()


@pytest.fixture(params=["session", "system"])
def mgr(request, bmid):
    """The same suite against linux:///session (in-process, no TPM link) and linux:///system (bmid).

    Tests of what only an in-process manager has are marked session_only.
    """
    if request.param == "session":
        with bmi.open("linux:///session", integrity=False) as m:
            m.shutdown_grace = 2.0
            yield m
        return
    marker = request.node.get_closest_marker("session_only")
    if marker:
        pytest.skip(f"session mode only: {marker.args[0]}")
    if bmid is None:
        pytest.skip("bmid needs root (namespaces and cgroups for PDs of any user)")
    with bmid.open() as m:
        yield m
    bmid.destroy_all()
