"""A PD's config parameters seen from inside its Xen guest (rig/rig.py xen).  Skipped outside dom0.

test_domains.py checks the guest's xenstore home from dom0; here the guest
itself reads it with a static xenstore client (tests/images/xsclient.c, on
its xenbus device) and tries to write there, and rig/init/pvguest.sh prints
what happened on its console.
"""
from __future__ import annotations

import re

import pytest

import bmi
from tests import images

from .conftest import GUEST_UP, MiB, domid, guest_bundle, wait_console

pytestmark = [pytest.mark.xen, pytest.mark.slow]
GUEST_KEYS_WRITTEN = ("bmi/config/app/mode", "bmi/written-by-guest")   # what pvguest.sh tries


def test_guest_reads_its_config_and_cannot_write_its_bmi_home(xen_mgr, no_leftover_domains):
    xen = no_leftover_domains
    bundle = guest_bundle(extra={"bin/xsclient": images.build("xsclient").read_bytes()})
    pd = xen_mgr.allocate_pd(bmi.PDDescription(mem=128 * MiB, cpu=1, performance=100))
    try:
        mode = f"seen from guest of PD {pd.get_pd_id()}"       # only this PD's config holds it
        pd.setup_pd(bmi.BytesImage(bundle))
        pd.set_config_param("/app/mode", mode)
        pd.request_status_change(bmi.PDStatus.RUNNING)
        wait_console(pd, "BMI-GUEST-XS-DONE")
        _, console = pd.read_console(0, timeout=0)
        report = [line.strip() for line in console.decode(errors="replace").splitlines()
                  if line.startswith("BMI-GUEST-XS")]
        assert GUEST_UP.encode() in console
        assert f"BMI-GUEST-XS-READ bmi/pd-id={pd.get_pd_id()}" in report, report
        assert f"BMI-GUEST-XS-READ bmi/config/app/mode={mode}" in report, report
        for key in GUEST_KEYS_WRITTEN:
            refused = re.compile(rf"BMI-GUEST-XS-WRITE {re.escape(key)}: (EACCES|EPERM)")
            assert any(refused.fullmatch(line) for line in report), f"the guest's write of {key}: {report}"

        # and dom0 sees the home as bmi left it
        home = f"/local/domain/{domid(pd)}/bmi"
        assert xen.xs_read(f"{home}/config/app/mode", what="t") == mode
        assert xen.xs_read(f"{home}/written-by-guest", what="t") is None
    finally:
        pd.destroy()
