"""A private swtpm per test (own state dir): tests may extend PCRs and kill it."""
from __future__ import annotations

import shutil

import pytest

from bmi.integrity.service import IntegrityService

needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")


@pytest.fixture
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bmi")


@pytest.fixture
def service(state_dir):
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    svc = IntegrityService.open(config={"state_dir": str(state_dir), "tpm": "swtpm"})
    yield svc
    svc.close()
