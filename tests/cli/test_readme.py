"""README.md is true: every example block runs as written, or says just before it why no test runs it.

A block is the lines between ``` fences.  `<!-- not run: REASON -->` on the line before a block marks
it; every other block is run here: python blocks by the venv's python, sh blocks by bash -e with the venv's
`bmi` first on PATH, in a scratch directory.  Whole-line comments right after a command (`# {"ok": ...`)
are output the block promises, and must appear.  A block that talks to linux:///system gets a bmid of the
test's own: `bmi` is then a shell function that adds `--uri` of that bmid (the block's own
`export BMI_URI=linux:///system` would reach /run/bmi/bmid.sock, this machine's).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.helpers import busybox_path
from tests.server.bmid import running_bmid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    line: int           # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def expected_output(self) -> list[str]:
        """Whole-line comments after the block's first command: what it promises to print."""
        lines = self.code.splitlines()
        first = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), len(lines))
        return [line[2:] for line in lines[first:] if line.startswith("# ")]


def blocks(path: str = README) -> list[Block]:
    """Every fenced block of a Markdown file, with its not-run mark if the line before has one."""
    with open(path) as f:
        lines = f.read().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            mark = NOT_RUN.search(lines[i - 1]) if i else None
            found.append(Block(i + 1, lines[i][3:].strip(), "\n".join(lines[i + 1:end]) + "\n",
                               mark.group(1) if mark else None))
            i = end
        i += 1
    return found


RUN = [b for b in blocks() if b.not_run is None]


def test_the_readme_stands_alone_and_keeps_its_quick_start():
    with open(README) as f:
        text = f.read()
    assert re.search(r"^## Quick start\b", text, re.M)
    assert "../" not in text, "README.md points outside the repository"
    for name in os.listdir(os.path.join(ROOT, "docs")):
        with open(os.path.join(ROOT, "docs", name)) as f:
            assert "../shared" not in f.read(), f"docs/{name} points outside the repository"
    for path in re.findall(r"`((?:docs|csrc|bench|rig|tests)/[\w/-]+\.(?:md|c|h|py|sh))`", text):
        assert os.path.exists(os.path.join(ROOT, path)), f"README.md names {path}, which does not exist"


def test_every_block_is_run_or_says_why_not():
    everything = blocks()
    assert RUN and len(RUN) < len(everything)
    for block in everything:
        assert block.lang in ("sh", "python"), f"README.md:{block.line}: a block of unknown language {block.lang!r}"
        assert block.not_run is None or len(block.not_run) > 10, f"README.md:{block.line}: say why it is not run"


def test_a_mark_is_recognised_only_right_before_its_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- not run: a daemon in the foreground -->\n```sh\nbmid\n```\n\n"
                    "<!-- not run: too far away -->\n\n```sh\nbmi info\n```\n")
    first, second = blocks(str(page))
    assert first.not_run == "a daemon in the foreground" and first.code == "bmid\n"
    assert second.not_run is None


@pytest.fixture
def scratch(tmp_path):
    """A working directory, an environment with the venv's bmi first on PATH, a private swtpm state."""
    busybox_path()          # the examples run busybox: skip where there is none
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               BMI_STATE_DIR=str(tmp_path / "tpm"), BMI_TPM="swtpm")
    env.pop("BMI_URI", None)
    work = tmp_path / "work"
    work.mkdir()
    return work, env


@pytest.mark.parametrize("block", RUN, ids=[f"line{b.line}" for b in RUN])
def test_example_block(block, scratch, tmp_path):
    work, env = scratch
    needs_tpm = "integrity_link" in block.code or "bmi attest" in block.code
    if needs_tpm and shutil.which("swtpm") is None:
        pytest.skip("the example attests: swtpm is not installed")
    if block.lang == "python":
        done = subprocess.run([sys.executable, "-c", block.code], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
    elif "linux:///system" in block.code:
        with running_bmid(tmp_path / "bmid", tpm=needs_tpm) as daemon:
            wrapper = f'bmi() {{ command bmi --uri "{daemon.uri}" "$@"; }}\n'
            if daemon.tpm_dir:      # `bmi tpm` opens the TPM bmid uses, as on a machine with one
                env["BMI_STATE_DIR"] = daemon.tpm_dir
            done = subprocess.run(["bash", "-e", "-c", wrapper + block.code], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=300)
    else:
        done = subprocess.run(["bash", "-e", "-c", block.code], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, f"README.md:{block.line} failed:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    for line in block.expected_output:
        assert line in done.stdout.splitlines(), f"README.md:{block.line} promises {line!r}; got:\n{done.stdout}"
