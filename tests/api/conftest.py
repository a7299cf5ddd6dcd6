import os

import pytest

import bmi
from tests.server.bmid import Bmid


def pytest_configure(config):
    config.addinivalue_line("markers", "session_only(reason): the test needs an in-process manager; "
                                       "not collected for the linux:///system run")


def pytest_collection_modifyitems(config, items):
    """A session_only test's system-mode copy does not apply anywhere: deselect it, never skip it."""
    inapplicable = [item for item in items if item.get_closest_marker("session_only")
                    and getattr(item, "callspec", None) and item.callspec.params.get("mgr") == "system"]
    if inapplicable:
        config.hook.pytest_deselected(items=inapplicable)
        items[:] = [item for item in items if item not in inapplicable]


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
    if bmid is None:
        pytest.skip("bmid needs root (namespaces and cgroups for PDs of any user)")
    with bmid.open() as m:
        yield m
    bmid.destroy_all()
