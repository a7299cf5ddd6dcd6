"""Fixtures of the bmid tests."""
from __future__ import annotations

import pytest

from tests.server.bmid import running_bmid


@pytest.fixture
def daemon(tmp_path):
    """A bmid of this test's own (state and socket under tmp_path, no TPM link)."""
    with running_bmid(tmp_path) as d:
        yield d
