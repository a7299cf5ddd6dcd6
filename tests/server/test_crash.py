"""kill -9 of bmid at random points while a client works, many times, with an invariant check after each.

The PDs run the C channel client (tests/images/chanpeer.c): each either
connects to a running peer it is allowed to reach and waits on that
connection, or accepts one connection and waits on it; so there are
accepted and pending connections at every kill.

Every third repetition runs with the state filesystem (a small tmpfs) full:
bmid must refuse changes as `full` without making them, store every change
it acknowledged, and keep what it stored through the kill that follows.
SHUTDOWN requests are part of the workload: one cut off by the kill ends
SHUTDOWN (or is finished after the restart), never CRASHED.

BMI_CRASH_REPS sets the repetitions (default 15), BMI_CRASH_SEED the seed
(printed on failure, so a failing sequence can be replayed).
"""
from __future__ import annotations

import glob
import hashlib
import os
import random
import threading
import time

import pytest

import bmi
from bmi.drivers.linux import cgroups
from tests.channel.progs import build, console
from tests.server.bmid import Bmid, require_root
from tests.server.conftest import SmallFs, small_fs
from tests.server.test_bmid import _records, _running
from tests.server.test_connections import _stored_connections

REPS = int(os.environ.get("BMI_CRASH_REPS", "15"))
MAX_PDS = 6
FULL_EVERY = 3          # every third repetition runs on a full state filesystem
IPC_RW = [bmi.ConnectionPolicy(bmi.ConnectionType.IPC, bmi.RW)]
WAIT = "600000"         # ms: longer than the test


class Model:
    """What the client was told (acknowledged), and the one call that may have been cut off."""

    def __init__(self) -> None:
        self.pds: dict[int, dict] = {}
        self.conns: dict[int, tuple[int, int]] = {}     # listed by bmid: id -> (source, dest)
        self.cut_ids: set[int] = set()                  # cut by an acknowledged call
        self.ended: set[int] = set()                    # PDs shut down: their connections may end any time
        self.inflight: tuple[str, int | None] | None = None
        self.refused = 0                                # calls refused because the state directory was full

    def cut(self, pd_id: int, tid: int | None = None) -> None:
        """Connections of pd_id (towards tid only, when given) were cut by an acknowledged call."""
        for conn_id, ends in list(self.conns.items()):
            if (ends[0] == pd_id and ends[1] == tid) if tid is not None else pd_id in ends:
                del self.conns[conn_id]
                self.cut_ids.add(conn_id)


def _listed(mgr, pd_ids) -> dict[int, tuple[int, int]]:
    """Every connection bmid lists for these PDs (each from both ends, consistently): id -> (source, dest)."""
    seen: dict[int, tuple[int, int]] = {}
    for pd_id in pd_ids:
        for line in filter(None, mgr.get_controller(pd_id).get_runtime_param("/interfaces/connections").split("\n")):
            conn_id, way, peer, *_ = line.split()
            ends = (pd_id, int(peer)) if way == "to" else (int(peer), pd_id)
            assert seen.setdefault(int(conn_id), ends) == ends, f"connection {conn_id} listed as {line!r}"
    return seen


def _cmdline(want: dict, model: Model, rng: random.Random) -> str:
    """Connect to a live peer this PD may reach and wait on it; else accept one connection and wait on it."""
    peers = [t for t, policies in want["policies"].items() if policies == IPC_RW and model.pds[t]["live"]]
    if peers:
        return f"chanpeer connect {rng.choice(peers)} IPC 3 0 + recv {WAIT} + sleep {WAIT}"
    return f"chanpeer accept {WAIT} + recv {WAIT} + sleep {WAIT}"


def _refused_as_full(e: BaseException) -> bool:
    return isinstance(e, bmi.ResourceError) and "state directory" in str(e) and "full" in str(e)


def _work(d: Bmid, model: Model, rng: random.Random, image: bmi.PDImage) -> None:
    """Random valid calls until bmid dies under us; each is recorded before and after.

    A call refused because the state directory is full changed nothing:
    the model stays as it was and the work goes on.
    """
    try:
        with d.open() as mgr:
            while True:
                try:
                    _one_call(mgr, model, rng, image)
                except bmi.BMIError as e:
                    if not _refused_as_full(e):
                        raise
                    model.refused += 1
                    model.inflight = None
    except (bmi.BMIError, OSError):
        return          # bmid was killed: model.inflight is the call it may or may not have done


def _one_call(mgr, model: Model, rng: random.Random, image: bmi.PDImage) -> None:
    ids = sorted(model.pds)
    choice = rng.random()
    if len(ids) < 2 or (choice < 0.2 and len(ids) < MAX_PDS):
        model.inflight = ("allocate", None)
        pd_id = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)).get_pd_id()
        model.pds[pd_id] = {"measured": False, "policies": {}, "priority": 0, "live": False, "shut": False}
        model.inflight = None
        return
    pd_id = rng.choice(ids)
    want = model.pds[pd_id]
    pd = mgr.get_controller(pd_id)
    model.inflight = ("change", pd_id)
    if choice < 0.35 and not want["measured"]:
        pd.setup_pd(image)
        want["measured"] = True
    elif choice < 0.5 and want["measured"] and not want["live"]:
        pd.set_config_param("/boot/cmdline", _cmdline(want, model, rng))
        pd.request_status_change(bmi.PDStatus.RUNNING)
        want.update(live=True, shut=False)
    elif choice < 0.53 and want["live"]:
        model.inflight = ("shutdown", pd_id)
        model.ended.add(pd_id)          # its connections end with it, as its channel's end is noticed
        pd.request_status_change(bmi.PDStatus.SHUTDOWN)
        want.update(live=False, shut=True)
    elif choice < 0.55 and want["live"]:
        pd.request_status_change(rng.choice([bmi.PDStatus.PAUSED, bmi.PDStatus.RUNNING]))
    elif choice < 0.6:
        model.conns.update(_listed(mgr, ids))
    elif choice < 0.75:
        others = [i for i in ids if i != pd_id]
        tid = rng.choice([i for i in others if model.pds[i]["live"]] or others)
        policies = IPC_RW if rng.random() < 0.75 else []
        disable = rng.random() < 0.5
        pd.set_allowed_connections(tid, policies, disable_existing=disable)
        want["policies"][tid] = policies
        if disable and not policies:
            model.cut(pd_id, tid)
    elif choice < 0.85:
        priority = rng.randint(-10, 10)
        pd.set_priority(priority)
        want["priority"] = priority
    elif choice < 0.95:
        model.inflight = ("destroy", pd_id)
        pd.destroy()
        del model.pds[pd_id]
        model.cut(pd_id)
        for other in model.pds.values():
            other["policies"].pop(pd_id, None)
    model.inflight = None


def _bmid_cgroups(bmid_pids: set[int]) -> set[str]:
    """PD cgroups any bmid of this test made that still exist (in the memory hierarchy, or the first one)."""
    trees = cgroups._layout()
    tree = next((t for t in trees if "memory" in t.controllers), trees[0])
    found = set()
    for pid in bmid_pids:
        found.update(os.path.basename(p) for p in glob.glob(os.path.join(tree.own, f"bmid-{pid}-pd*")))
    return found


def _check(d: Bmid, model: Model, digest: bytes, bmid_pids: set[int]) -> None:
    kind, uncertain = model.inflight or ("", None)
    with d.open() as mgr:
        actual = set(mgr.list_pd()[1:])
        extra, missing = actual - set(model.pds), set(model.pds) - actual
        # an allocation cut off may or may not exist; nothing else may appear
        assert len(extra) <= (1 if kind == "allocate" else 0), f"PDs nobody allocated: {extra}"
        # a destroy cut off may or may not be done; nothing else may vanish
        assert missing <= ({uncertain} if kind == "destroy" else set()), f"PDs lost: {missing}"
        for pd_id in missing:
            del model.pds[pd_id]
            for other in model.pds.values():
                other["policies"].pop(pd_id, None)
        for pd_id in extra:
            model.pds[pd_id] = {"measured": False, "policies": {}, "priority": 0, "live": False, "shut": False}
        records = _records(d)
        assert set(records) == actual
        for pd_id, want in model.pds.items():
            pd = mgr.get_controller(pd_id)
            measurement = pd.measurement()
            status = pd.get_current_status()
            record = records[pd_id]
            if pd_id == uncertain or pd_id in extra:
                # the cut-off call either happened or did not: pick up what is true now
                assert measurement in ({}, {"sha256": digest})
                if kind == "shutdown":      # finished after the restart, or done: never CRASHED
                    assert status in (bmi.PDStatus.RUNNING, bmi.PDStatus.PAUSED, bmi.PDStatus.SHUTDOWN), \
                        f"PD {pd_id}: a SHUTDOWN cut off by the kill left it {status.name} " \
                        f"({pd.get_runtime_param('/system/exit-reason')})"
                want.update(measured=bool(measurement), priority=pd.get_priority(),
                            live=status in (bmi.PDStatus.RUNNING, bmi.PDStatus.PAUSED),
                            shut=status is bmi.PDStatus.SHUTDOWN)
                want["policies"] = {t: pd.get_allowed_connections(t) for t in model.pds if t != pd_id}
                continue
            assert measurement == ({"sha256": digest} if want["measured"] else {}), f"PD {pd_id} measurement"
            assert pd.get_priority() == want["priority"], f"PD {pd_id} priority"
            for tid, policies in want["policies"].items():
                assert pd.get_allowed_connections(tid) == policies, f"PD {pd_id} policy towards {tid}"
            if want["live"]:
                assert status in (bmi.PDStatus.RUNNING, bmi.PDStatus.PAUSED), f"PD {pd_id} is {status.name}"
            if want["shut"]:
                assert status is bmi.PDStatus.SHUTDOWN, f"PD {pd_id} was shut down, is {status.name}"
            if status in (bmi.PDStatus.RUNNING, bmi.PDStatus.PAUSED):
                assert _running(record["run"]["pid"]), f"PD {pd_id} is {status.name} but its init is gone"
        _check_connections(mgr, model, uncertain)
        # every PD cgroup a bmid made belongs to a recorded PD (no leak, no double)
        assert _bmid_cgroups(bmid_pids) == {r["cgroup"] for r in records.values()}
    model.inflight = None


def _check_connections(mgr, model: Model, uncertain: int | None) -> None:
    """Every connection listed before is listed still (unless the cut-off call may have cut it); one is revoked."""
    listed = _listed(mgr, model.pds)
    lost = {c: ends for c, ends in model.conns.items()
            if c not in listed and uncertain not in ends and not model.ended & set(ends)}
    assert not lost, f"connections bmid forgot: {lost} (listed now: {listed})"
    again = set(listed) & model.cut_ids
    assert not again, f"connections cut before are listed again (or their ids were given again): {again}"
    model.conns = listed
    if not listed:
        return
    conn_id = max(listed)
    source, dest = listed[conn_id]
    pd = mgr.get_controller(source)
    connected = "connect: ok" in console(pd)        # else its connect's reply was lost with the killed bmid
    pd.set_allowed_connections(dest, [], disable_existing=True)
    model.pds[source]["policies"][dest] = []
    model.cut(source, dest)
    assert conn_id not in _listed(mgr, [source, dest]), f"connection {conn_id} still listed after its revocation"
    if connected and pd.get_current_status() is bmi.PDStatus.RUNNING:
        deadline = time.monotonic() + 10
        while "recv: EOF" not in console(pd):
            assert time.monotonic() < deadline, f"PD {source} did not see its connection {conn_id} cut: {console(pd)}"
            time.sleep(0.05)


@pytest.mark.slow
def test_kill9_at_random_points_keeps_every_pd(tmp_path):
    require_root()
    seed = int(os.environ.get("BMI_CRASH_SEED", str(time.time_ns() % 2**32)))
    rng = random.Random(seed)
    data = build("chanpeer").read_bytes()
    image, digest = bmi.BytesImage(data), hashlib.sha256(data).digest()
    with small_fs(str(tmp_path / "fs"), "48m") as fs:
        d = Bmid(fs.path, socket_dir=str(tmp_path)).start()
        model, bmid_pids = Model(), {d.proc.pid}
        try:
            for rep in range(REPS):
                _repetition(d, model, rng, image, fs, full=rep % FULL_EVERY == FULL_EVERY - 1)
                bmid_pids.add(d.proc.pid)
                try:
                    _check(d, model, digest, bmid_pids)
                except AssertionError as e:
                    raise AssertionError(f"repetition {rep} (BMI_CRASH_SEED={seed}): {e}") from e
        finally:
            fs.free()
            if d.proc is None:
                d.start()
            d.close()
        assert _stored_connections(d) == []
    assert _bmid_cgroups(bmid_pids) == set()
    print(f"crash test: {REPS} kills, {model.refused} calls refused as `full`")


def _repetition(d: Bmid, model: Model, rng: random.Random, image: bmi.PDImage, fs: SmallFs, *, full: bool) -> None:
    """Work until a SIGKILL at a random point (on a full state filesystem when `full`), then start bmid again."""
    if full:
        fs.fill()
    worker = threading.Thread(target=_work, args=(d, model, random.Random(rng.random()), image))
    worker.start()
    time.sleep(rng.uniform(0.02, 0.5) if not full else rng.uniform(0.3, 1.0))
    d.kill()
    worker.join()
    fs.free()
    d.start()
