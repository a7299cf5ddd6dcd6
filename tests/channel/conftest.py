import pytest

import bmi


@pytest.fixture
def mgr():
    """A session manager without the TPM link."""
    with bmi.open("linux:///session", integrity=False) as m:
        m.shutdown_grace = 1.0
        yield m


@pytest.fixture
def as_pd(mgr):
    """as_pd(controller) -> a bmi.pd client speaking on that PD's real channel from this process.

    The layer cannot tell this apart from the PD's own program: the channel
    socket is the identity.  Used where a Python client is the point.
    """
    import os

    import bmi.pd
    clients = []

    def make(pd: bmi.PDController) -> bmi.pd.PDClient:
        fd = mgr.channels().open(pd.get_pd_id())
        try:
            client = bmi.pd.open(fd)
        finally:
            os.close(fd)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()
