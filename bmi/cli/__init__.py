"""The `bmi` command: run measured, isolated PDs and inspect the layer.

Human output by default, `--json` for scripts.  Every command ends through
main(): 0 done, 1 failed, 2 a usage error, 130 after Ctrl-C, quietly on a
closed pipe; with --json a failure is one object on stdout.  Exit status of
`bmi run` is the PD's: its exit status, 128+N when killed by signal N (137
for oom).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Sequence, TextIO
from urllib.parse import urlsplit

from .. import __version__, errors
from ..drivers import DRIVERS
from ..text import printable
from ..uri import is_session, resolve as resolve_uri
from . import device, integrity, keylime, manage, run
from .common import UsageError, _Parser

__all__ = ["main", "program", "build_parser"]


def _uris() -> str:
    """Every driver's URIs (bmi/drivers/__init__.py), as the help lists them."""
    return "".join(f"\n  {d.session_uri} (in-process), {d.system_uri} (bmid --uri {d.system_uri}),"
                   f"\n  {d.remote_scheme}://[user@]host[:port]/system (that bmid on another host, over ssh),"
                   for d in DRIVERS.values())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bmi", description="Create, measure, run and attest isolated protection domains (OpenTC BMI v0.1).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"URIs:{_uris()}\n  pd:/// (inside a PD).\nSet BMI_URI or --uri (default linux:///session).\n"
               "Exit status: 0 done, 1 failed, 2 bad usage, 130 interrupted; `bmi run`: the PD's own.\n"
               "Run `bmi COMMAND --help` for examples.")
    parser.add_argument("--version", action="version", version=f"bmi {__version__} (BMI API v0.1)")
    parser.add_argument("--uri", default=None, help="connection URI (default: $BMI_URI or linux:///session)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for commands in (run, integrity, manage, keylime, device):
        commands.register(sub)
    for command in sub.choices.values():     # `bmi list --uri X` as well as `bmi --uri X list`
        command.add_argument("--uri", default=argparse.SUPPRESS, help="connection URI (as before the command)")
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars")
    for name in ("allow", "connections"):
        sub.choices[name].set_defaults(needs_bmid=True)
    return parser


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _wants_json(argv: Sequence[str]) -> bool:
    """--json among the options (before a `--` that starts the PD's argv); known even when parsing fails."""
    return "--json" in list(argv)[:list(argv).index("--") if "--" in argv else None]


def _error_type(error: BaseException) -> str:
    """The bmi error class a failure is (UsageError is an InvalidArgument), else the Python one."""
    for cls in type(error).__mro__:
        if cls.__name__ in errors.__all__:
            return cls.__name__
    return type(error).__name__


def _fail(error: BaseException, as_json: bool, status: int) -> int:
    """The one way every command reports a failure: a line on stderr, or with --json one object on stdout."""
    message = str(error)
    if isinstance(error, OSError) and error.strerror:
        message = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    if as_json:
        print(json.dumps({"ok": False, "error": {"type": _error_type(error), "message": message}}), flush=True)
    else:
        if isinstance(error, UsageError):
            print(error.usage.rstrip(), file=sys.stderr)
        print(f"bmi: {_error_type(error)}: {_one_line(message)}", file=sys.stderr, flush=True)
    return status


def _one_line(text: str) -> str:
    """A message as one line of plain text: a newline, an ESC or a bidi control in it, escaped.  Messages carry
    words from outside (a remote host's ssh stderr, a PD's values): they must not forge lines of output nor
    drive the admin's terminal.  (--json keeps the text as it is: JSON escapes controls itself.)"""
    return printable(text)


class _PrintableStdout:
    """sys.stdout while a command runs: its text goes out with every control and format character but newline
    and tab escaped.  What commands print comes from outside too -- a config value or /owner a PD gave its
    child, an exit reason, the event names of a report being verified, anything a remote bmid answers -- and
    an ESC, a CR or a bidi override in it would drive the admin's terminal or make the output lie.  The PD's
    own output (`bmi run`, `bmi console`) goes to .buffer as bytes, as the PD wrote it, as in any console."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text, keep="\n\t"))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _run(args: argparse.Namespace) -> int:
    uri = resolve_uri(args.uri)
    if getattr(args, "needs_bmid", False) and is_session(uri):
        system = urlsplit(uri).scheme + ":///system"
        raise errors.NotSupported(f"PDs of {uri} end with this command; use --uri {system} (bmid) to keep them")
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, and turn every failure into a message and an exit status (never a traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = _wants_json(argv)
    stdout, sys.stdout = sys.stdout, _PrintableStdout(sys.stdout)    # type: ignore[assignment]
    try:
        return _run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except errors.InvalidArgument as e:
        return _fail(e, as_json, EXIT_USAGE)
    except (errors.BMIError, OSError) as e:
        return _fail(e, as_json, EXIT_FAILED)
    except Exception as e:      # a bug: say so in one line; BMI_DEBUG=1 shows the traceback
        if os.environ.get("BMI_DEBUG"):
            raise
        return _fail(RuntimeError(f"internal error: {type(e).__name__}: {e} (BMI_DEBUG=1 shows where)"),
                     as_json, EXIT_FAILED)
    finally:
        sys.stdout = stdout


def _silence_stdout() -> None:
    """The reader (`| head`) is gone: nothing more to say, and nothing at exit either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def program() -> int:
    """`bmi` as a program (the console script, `python -m bmi.cli`): main(), and no traceback from a Ctrl-C
    that comes outside main's own handling either: in its first or last lines (status 130), or while the
    interpreter shuts down after it (the output is flushed, then that Ctrl-C leaves at once with main's status)."""
    try:
        status = main()
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except SystemExit as e:         # --help, --version: argparse has printed what it had to
        if not isinstance(e.code, (int, type(None))):
            raise
        status = e.code or 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        status = status or EXIT_BROKEN_PIPE
    except (KeyboardInterrupt, OSError, ValueError):
        pass
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(status))
    return status
