"""The `bmi` console script's first code: a Ctrl-C while the bmi package is still being imported ends the
command quietly with status 130, as it does later on (bmi.cli.program), never in a traceback.

A module of its own, outside the bmi package: with `bmi.cli:main` as the entry point the whole package
(hundreds of milliseconds of imports) would load before any line of the command could take Ctrl-C.
"""
import _signal   # the C module: `signal` imports enum first, and a Ctrl-C in that would be a traceback
import os
import sys

EXIT_INTERRUPTED = 128 + _signal.SIGINT


def _leave(signum: int, frame: object) -> None:
    """Nothing has been done yet: nothing to undo or to say."""
    os._exit(EXIT_INTERRUPTED)


def main() -> int:
    _signal.signal(_signal.SIGINT, _leave)
    try:
        from bmi.cli import program
    except Exception as e:      # a broken installation: one line too (BMI_DEBUG=1 shows where)
        if os.environ.get("BMI_DEBUG"):
            raise
        print(f"bmi: cannot load the bmi package: {type(e).__name__}: {e} (BMI_DEBUG=1 shows where)",
              file=sys.stderr)
        return 1
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)     # the command takes Ctrl-C from here on
    return program()
