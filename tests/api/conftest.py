import pytest

import bmi


@pytest.fixture
def mgr():
    """A session manager without the TPM link (integrity tests open their own)."""
    with bmi.open("linux:///session", integrity=False) as m:
        m.shutdown_grace = 2.0
        yield m
