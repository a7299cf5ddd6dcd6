"""The `bmi` console script's first code: a Ctrl-C while the bmi package is still being imported ends the
command quietly with status 130, as it does later on (bmi.cli.program), never in a traceback.

A module of its own, outside the bmi package: with `bmi.cli:main` as the entry point the whole package
(hundreds of milliseconds of imports) would load before any line of the command could take Ctrl-C.
"""
import os
import signal

EXIT_INTERRUPTED = 128 + signal.SIGINT


def _leave(signum: int, frame: object) -> None:
    """Nothing has been done yet: nothing to undo or to say."""
    os._exit(EXIT_INTERRUPTED)


def main() -> int:
    signal.signal(signal.SIGINT, _leave)
    from bmi.cli import program
    signal.signal(signal.SIGINT, signal.default_int_handler)     # the command takes Ctrl-C from here on
    return program()
