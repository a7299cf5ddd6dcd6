"""Where a manager takes its PDs' host ids from (bmi/drivers/linux/uids.py), without PDs."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import bmi
from bmi.drivers.linux.uids import DEFAULT_RANGE, IdPool, parse_range

ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("text", [":", "12", "x:5", "0:10", "100:0", f"{2**31 - 10}:100", "-5:3"])
def test_a_malformed_range_is_refused_by_name(text):
    with pytest.raises(bmi.InvalidArgument, match=r"BMI_UID_RANGE: .* is not start:count"):
        parse_range(text, "BMI_UID_RANGE")


@pytest.mark.skipif(os.geteuid() != 0, reason="the default block is a root manager's")
def test_the_default_block_is_no_users_and_not_systemds():
    start, count = DEFAULT_RANGE
    assert start > 65535 and start + count <= 2**31 - 1     # above 16-bit ids and systemd's dynamic users
    assert IdPool({}).range == DEFAULT_RANGE
    assert IdPool({}).capability() == "yes"


def test_bmi_info_says_whether_pds_have_uids_of_their_own():
    done = subprocess.run([sys.executable, "-m", "bmi.cli", "info"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("per_pd_uid ")]
    assert line.split(None, 1)[1] == IdPool().describe()
    assert line.split(None, 1)[1].startswith("yes (host ids " if os.geteuid() == 0 else ("yes", "no: "))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_manager_without_a_subuid_range_says_why_pds_share_its_uid():
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                           "from bmi.drivers.linux.uids import IdPool; p = IdPool(); "
                           "print(p.capability()); print(p.acquire(1))"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    if "/etc/subuid" not in done.stdout and done.returncode == 0:
        pytest.skip(f"uid 65534 has an /etc/subuid range here: {done.stdout}")
    assert done.returncode == 0, done.stderr
    capability, lease = done.stdout.splitlines()
    assert capability == "no: the manager runs as uid 65534, which has no /etc/subuid and /etc/subgid range"
    assert lease == "IdLease(uid=65534, gid=65534, fd=-1)"      # today's single mapping of its own ids


_IN_A_SMALL_USERNS = ("from bmi.drivers.linux.uids import IdPool; import os; p = IdPool({}); "
                      "print(p.capability()); print(p.acquire(1)); os.environ['BMI_UID_RANGE'] = '100000:10'; "
                      "IdPool()")


def test_a_root_manager_whose_namespace_lacks_the_block_keeps_one_shared_mapping():
    """Root of a container that maps few ids: PDs stay nobody, and the parameter says why."""
    done = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", _IN_A_SMALL_USERNS],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no user namespaces here: {done.stderr.strip()}")
    capability, lease = done.stdout.splitlines()
    assert capability.startswith("no: the default block 1879048192:65536 is not mapped in the manager's user "
                                 "namespace; set BMI_UID_RANGE")
    assert lease == "IdLease(uid=65534, gid=65534, fd=-1)"
    assert "InvalidArgument: BMI_UID_RANGE 100000:10: these ids are not all mapped" in done.stderr
