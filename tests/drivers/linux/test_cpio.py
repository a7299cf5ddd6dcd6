"""The one cpio parser (csrc/cpio/cpio.c): setup_pd's check (bmi._cpio through cffi) and bmi-init (the PD's
pid 1, fed the archive directly) give the same verdict, because they run the same C code.

Every hostile archive is refused by both, with the same sentence; every archive the check accepts is
unpacked by bmi-init and its /init runs.
"""
from __future__ import annotations

import os
import stat

import pytest

from bmi import _cpio
from bmi.drivers.cpio import check_archive, iter_cpio
from bmi.errors import ImageError
from tests.drivers.linux.test_spawn import PD, run
from tests.images import build, newc, newc_entry

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is x86_64-only")

S_DIR, S_REG, S_LNK = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777


@pytest.fixture(scope="module")
def probe() -> bytes:
    return build("probe").read_bytes()


def _init(probe: bytes) -> tuple:
    return ("init", S_REG, probe)


def _field(entry: bytes, index: int, value: bytes) -> bytes:
    """The entry with header field `index` (0 = ino .. 12 = check) replaced by 8 raw bytes."""
    at = 6 + 8 * index
    return entry[:at] + value + entry[at + 8:]


def _crc_entry(name: str, data: bytes, check: int) -> bytes:
    """A 070702 entry whose checksum field says `check`."""
    entry = b"070702" + newc_entry(name, S_REG, data)[6:]
    return _field(entry, 12, b"%08x" % check)


def _trailer() -> bytes:
    return newc_entry("TRAILER!!!", 0)


HOSTILE = {  # case: archive built around the probe program (as /init where the case needs one)
    # the cpio cases of tests/api/test_images.py and tests/drivers/linux/test_spawn.py
    "truncated cpio": lambda p: b"070701" + b"0" * 50,
    "without init": lambda p: newc([("bin", S_DIR), ("bin/x", S_REG, b"x")]),
    "block device": lambda p: newc([_init(p), ("dev/sda", stat.S_IFBLK | 0o600)]),
    "escaping": lambda p: newc([_init(p), ("../../etc/bmi-escape", S_REG, b"x")]),
    "proc symlink": lambda p: newc([_init(p), ("proc", S_LNK, b"/etc")]),
    "absolute": lambda p: newc([("/etc/bmi-escape", S_REG, b"x"), _init(p)]),
    "file over dev": lambda p: newc([("dev", S_REG, b"x"), _init(p)]),
    "reserved dev node": lambda p: newc([("dev/null", S_REG, b"x"), _init(p)]),
    "char device": lambda p: newc([("console", stat.S_IFCHR | 0o600), _init(p)]),
    "fifo": lambda p: newc([("fifo", stat.S_IFIFO | 0o600), _init(p)]),
    "no trailer": lambda p: newc([_init(p)], trailer=False),
    "bad magic": lambda p: b"07070X" + newc([_init(p)])[6:],
    # more: '..' deeper in, odd components, symlink targets, lying sizes, checksums, hard links
    "dotdot inside": lambda p: newc([("bin", S_DIR), ("bin/../../bmi-escape", S_REG, b"x"), _init(p)]),
    "empty component": lambda p: newc([("bin", S_DIR), ("bin//x", S_REG, b"x"), _init(p)]),
    "dot component": lambda p: newc([("bin", S_DIR), ("bin/./x", S_REG, b"x"), _init(p)]),
    "long component": lambda p: newc([("a" * 256, S_REG, b"x"), _init(p)]),
    "socket": lambda p: newc([("sock", stat.S_IFSOCK | 0o600), _init(p)]),
    "tmp symlink": lambda p: newc([("tmp", S_LNK, b"/tmp"), _init(p)]),
    "init is a directory": lambda p: newc([("init", S_DIR)]),
    "empty symlink target": lambda p: newc([("x", S_LNK, b""), _init(p)]),
    "symlink target with NUL": lambda p: newc([("x", S_LNK, b"a\0b"), _init(p)]),
    "truncated header": lambda p: newc([_init(p)])[:len(newc([_init(p)])) - 60],
    "name size zero": lambda p: newc_entry("init", S_REG, p, namesize=0) + _trailer(),
    "name size too long": lambda p: newc_entry("init", S_REG, b"", namesize=4097) + _trailer(),
    "name size lies short": lambda p: newc_entry("init", S_REG, p, namesize=3) + _trailer(),
    "name size lies long": lambda p: newc_entry("init", S_REG, b"x", namesize=40) + _trailer(),
    "name size past the end": lambda p: newc_entry("init", S_REG, b"", namesize=4000),
    "huge file size": lambda p: _field(newc_entry("init", S_REG, p), 6, b"ffffffff") + _trailer(),
    "file size past the end": lambda p: _field(newc_entry("init", S_REG, p), 6, b"%08x" % (len(p) + 8)),
    "non-hex field": lambda p: _field(newc_entry("init", S_REG, p), 1, b"0000g1ed") + _trailer(),
    "checksum mismatch": lambda p: _crc_entry("init", p, sum(p) + 1) + _trailer(),
    "too many hard links": lambda p: newc([_init(p)] + [(f"h{i}", S_REG, b"", {"ino": 10 + i, "nlink": 2})
                                                       for i in range(1025)]),
}


def _check_says(archive: bytes) -> str | None:
    """The check's refusal (the C sentence after the "what: " prefix), or None when it accepts."""
    try:
        check_archive(archive, what="W")
    except ImageError as e:
        assert str(e).startswith("W: ")
        return str(e)[3:]
    return None


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_check_and_init_refuse_alike(probe, case):
    archive = HOSTILE[case](probe)
    why = _check_says(archive)
    assert why, f"the check accepted the hostile archive {case!r}"
    with pytest.raises(ImageError) as refused:
        PD(archive, ["/init"], archive=True, pd_id=7)
    assert why in str(refused.value), "bmi-init refused for another reason than the check"
    assert not os.path.exists("/etc/bmi-escape") and not os.path.exists("/bmi-escape")


def test_every_truncation_is_refused_by_both(probe):
    good = newc([("bin", S_DIR), ("bin/x", S_REG, b"abc"), _init(b"\x7fELF")])
    assert _check_says(good) is None
    for cut in range(len(good)):
        assert _check_says(good[:cut]), f"a prefix of {cut} bytes was accepted"
    for cut in (1, 109, 110, 115, len(good) // 2, len(good) - 1):
        with pytest.raises(ImageError, match="archive"):
            PD(good[:cut], ["/init"], archive=True)


ACCEPTED = {  # case: archive the check accepts; bmi-init unpacks it and /init (the probe) runs
    "plain": lambda p: newc([_init(p)]),
    "root entry and ./ names": lambda p: newc([(".", S_DIR), ("./bin", S_DIR), ("./bin/probe", S_REG, p),
                                               ("./init", S_LNK, b"bin/probe")]),
    "hard links": lambda p: newc([("a", S_REG, b"", {"ino": 3, "nlink": 2}), ("init", S_REG, p, {"ino": 3, "nlink": 2})]),
    "070702 with its checksum": lambda p: _crc_entry("init", p, sum(p) & 0xFFFFFFFF) + _trailer(),
    "own files in dev and tmp": lambda p: newc([("dev", S_DIR), ("dev/mine", S_REG, b"x"), ("tmp", S_DIR),
                                                _init(p)]),
    "not UTF-8 name": lambda p: newc([(b"caf\xe9", S_REG, b"x"), _init(p)]),
    "1024 hard-linked files": lambda p: newc([_init(p)] + [(f"h{i}", S_REG, b"", {"ino": 10 + i, "nlink": 2})
                                                          for i in range(1024)]),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_what_the_check_accepts_init_unpacks(probe, case):
    archive = ACCEPTED[case](probe)
    assert _check_says(archive) is None
    out, status, _ = run(archive, ["/init", "echo", "unpacked"], archive=True)
    assert "unpacked" in out and status == ("exit", 0)


def test_entries_come_from_the_c_parser():
    archive = newc([(".", S_DIR), ("./bin", S_DIR), ("bin/sh", S_REG, b"#!"), ("dev/console", stat.S_IFCHR | 0o600)])
    entries = list(iter_cpio(archive, what="W"))
    assert [e.name for e in entries] == ["", "bin", "bin/sh", "dev/console"]   # no PD-root rules here
    sh = entries[2]
    assert archive[sh.data_offset:sh.data_offset + sh.size] == b"#!" and stat.S_ISREG(sh.mode)
    with pytest.raises(ImageError, match="W: .*'\\.\\.' component"):
        iter_cpio(newc([("a/../../b", S_REG)]), what="W")


def test_error_codes_are_distinct_and_named():
    """Each refusal has its own code in the cdef, so C and Python speak of the same thing."""
    codes = {name: getattr(_cpio.lib, name) for name in dir(_cpio.lib) if name.startswith("BMI_CPIO_E")}
    assert len(codes) >= 15 and len(set(codes.values())) == len(codes)
    err = _cpio.ffi.new("char[]", 200)
    data = newc([("dev/null", S_REG, b"x")])
    assert _cpio.lib.bmi_cpio_check(data, len(data), err, len(err)) == -_cpio.lib.BMI_CPIO_EMOUNTPOINT
    assert b"dev/null" in _cpio.ffi.string(err)
