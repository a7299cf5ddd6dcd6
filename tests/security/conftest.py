"""The hostile-PD suite: every test is one attack; the tally goes into the terminal summary."""
import pytest

import bmi

_tally = {"attacks": 0, "blocked": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if "tests/security/" not in report.nodeid.replace("\\", "/"):
        return
    if report.when == "call":
        _tally["attacks"] += 1
        _tally["blocked"] += report.passed
    elif report.when == "setup" and report.skipped:
        _tally["skipped"] += 1


def pytest_terminal_summary(terminalreporter):
    if _tally["attacks"] or _tally["skipped"]:
        skipped = f", {_tally['skipped']} skipped" if _tally["skipped"] else ""
        terminalreporter.write_line(f"security: {_tally['attacks']} attacks, {_tally['blocked']} blocked{skipped}")


@pytest.fixture
def mgr():
    with bmi.open("linux:///session", integrity=False) as m:
        m.shutdown_grace = 1.0
        yield m
