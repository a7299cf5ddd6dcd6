"""Where a manager takes its PDs' host ids from (bmi/drivers/linux/uids.py), without PDs."""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

import bmi
from bmi.drivers.linux.uids import DEFAULT_RANGE, MAP_HELPERS, IdPool, parse_range
from tests.images import build

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


_SPAWN_AS_NOBODY = """
import os, sys
from bmi.drivers.linux import spawn as sp, uids
from tests.images import sealed_memfd
pool = uids.IdPool()
print(pool.capability(), pool.map_helper, pool.range[0])
lease = pool.acquire(1)
console_r, console_w = os.pipe()
status_r, status_w = os.pipe()
image = sealed_memfd(open(sys.argv[1], "rb").read())
child = sp.spawn(image, archive=False, argv=["probe", "uid", "+", "sleep", "30"], env={}, console_fd=console_w,
                 status_fd=status_w, outer_uid=lease.uid, outer_gid=lease.gid, map_helper=pool.map_helper)
os.close(console_w)
print(os.read(console_r, 100).decode().strip())
status = dict(line.split(":", 1) for line in open(f"/proc/{child.pid}/status"))
print(sorted(set(status["Uid"].split() + status["Gid"].split())))
os.kill(child.pid, 9)
os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a test user an /etc/subuid range (in a private "
                    "mount namespace) and to become that user")
def test_a_manager_that_is_not_root_maps_its_subuid_range_with_newuidmap():
    """nobody with an /etc/subuid range (an overlay on /etc, seen only by this test): its PD is a subuid."""
    missing = [tool for tool in ("unshare", "setpriv") if shutil.which(tool) is None]
    missing += [h for h in MAP_HELPERS if not os.access(h, os.X_OK)]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (Debian packages util-linux, uidmap)")
    sub = 0x72000000
    probe = build("probe")
    scratch = tempfile.mkdtemp()
    os.chmod(scratch, 0o755)
    setup = (f"mount -t tmpfs tmpfs {scratch} && mkdir {scratch}/u {scratch}/w {scratch}/run && "
             f"chmod 777 {scratch}/run && mount -t overlay overlay -o lowerdir=/etc,upperdir={scratch}/u,"
             f"workdir={scratch}/w /etc && echo nobody:{sub}:65536 > /etc/subuid && cp /etc/subuid /etc/subgid && "
             f"exec env PYTHONPATH={ROOT} XDG_RUNTIME_DIR={scratch}/run setpriv --reuid=65534 --regid=65534 "
             f"--clear-groups {shlex.join([sys.executable, '-c', _SPAWN_AS_NOBODY, str(probe)])}")
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    finally:
        os.rmdir(scratch)
    if done.returncode != 0 and "overlay" in done.stderr:
        pytest.skip(f"no overlayfs for a private /etc here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"yes True {sub}", "uid: 0 0", f"['{sub}']"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the default block is a root manager's")
def test_the_lock_file_and_its_directory_are_made_on_the_first_take(tmp_path):
    pool = IdPool({})
    pool.lock_file = str(tmp_path / "run" / "bmi" / "uids.lock")
    first = pool.acquire(1)
    second = pool.acquire(2)
    try:
        assert os.stat(pool.lock_file).st_uid == 0 and oct(os.stat(pool.lock_file).st_mode & 0o777) == "0o600"
        assert first.uid == DEFAULT_RANGE[0] and second.uid == first.uid + 1   # a fresh lock file: nothing taken
    finally:
        first.release()
        second.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="the default block is a root manager's")
def test_an_id_let_go_is_the_lowest_free_again_and_a_held_one_is_never_given_twice(tmp_path):
    """acquire() skips the ids its own leases hold without a lock attempt: a released id must come back (the
    lowest free), and one another open of the lock file holds (another manager) must still be skipped."""
    pool = IdPool({})
    pool.lock_file = str(tmp_path / "uids.lock")
    leases = [pool.acquire(i) for i in range(5)]
    other = IdPool({})
    other.lock_file = pool.lock_file
    try:
        assert [x.uid for x in leases] == [DEFAULT_RANGE[0] + i for i in range(5)]
        leases[1].release()
        leases[3].release()
        taken_elsewhere = other.acquire(9)          # another manager's: the lowest free, leases[1]'s old id
        assert taken_elsewhere.uid == DEFAULT_RANGE[0] + 1
        again = pool.acquire(6)
        assert again.uid == DEFAULT_RANGE[0] + 3     # its own skipped set had forgotten it; the lock decides
        leases += [again, taken_elsewhere, pool.acquire(7)]
        assert leases[-1].uid == DEFAULT_RANGE[0] + 5
    finally:
        for lease in leases:
            lease.release()
