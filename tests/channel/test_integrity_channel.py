"""A PD proves its own integrity over its channel (spec 7.4 from inside), against a real swtpm."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest

import bmi
import bmi.pd
from bmi import IntegrityPolicy
from tests.channel.progs import build

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")


def test_a_pd_gets_its_integrity_link_and_its_credentials(tmgr):
    image = str(build("chanpeer"))
    digest = hashlib.sha256(open(image, "rb").read()).digest()
    pd = tmgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    pd.setup_pd(bmi.FileImage(image))
    other = tmgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    fd = tmgr.channels().open(pd.get_pd_id())
    try:
        with bmi.pd.open(fd) as client:
            me = client.get_controller()
            report = me.get_integrity_link(b"from-inside")
            ak = client.get_attestation_key()                  # a PD learns the layer's AK too
            assert ak == tmgr.get_attestation_key()
            bmi.verify_report(report, nonce=b"from-inside", pd_integrity=digest, ak=ak.pem.encode())
            policy = IntegrityPolicy(pd_integrity=digest)
            blob = tmgr.seal_credentials(policy, b"s3cret")
            assert me.get_protected_credentials(policy, blob) == b"s3cret"
            with pytest.raises(bmi.PermissionDenied):
                client.get_controller(other.get_pd_id()).get_integrity_link(b"not-mine")
    finally:
        os.close(fd)
