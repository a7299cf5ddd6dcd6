"""The `bmid` command: run the daemon in the foreground (systemd: systemd/bmid.service, systemd/bmid-xen.service)."""
from __future__ import annotations

import argparse
import grp
import logging
import os
import signal
import sys
from typing import Sequence

from ..errors import BMIError
from ..store import DEFAULT_STATE_DIR, StateError
from ..drivers import BMIDS
from ..system import LINUX_URI, default_socket
from ..text import printable
from .daemon import Daemon

EXIT_STATE = 78     # EX_CONFIG: the state cannot be used until the operator acts (the message says how)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmid", description="Own the protection domains of one system URI across restarts; serve "
                                 "`bmi --uri URI` and bmi.open(URI).  One bmid per URI (driver).")
    others = [uri for uri in BMIDS if uri != LINUX_URI]
    parser.add_argument("--uri", default=LINUX_URI, choices=list(BMIDS),
                        help=f"what to serve (default {LINUX_URI}; {', '.join(others)} where its hypervisor runs)")
    sockets = "; ".join(f"for {d.scheme} {d.socket}, ${d.socket_variable}" for d in BMIDS.values())
    parser.add_argument("--socket", help=f"the Unix socket to listen on (default {sockets}; root-only)")
    subdirs = ", ".join(f"for {d.scheme} its {d.state_subdir}/ subdirectory" for d in BMIDS.values() if d.state_subdir)
    parser.add_argument("--state-dir", help=f"where the SQLite state and the fd keeper live (default "
                                            f"$BMID_STATE_DIR or {DEFAULT_STATE_DIR}; {subdirs})")
    parser.add_argument("--group", help="a group whose members may make read-only calls (socket mode 0660)")
    parser.add_argument("--no-integrity", action="store_true", help="run without the TPM link")
    parser.add_argument("--shutdown-grace", type=float, default=None,
                        help="seconds a PD gets to end after SHUTDOWN before it is killed (default 5)")
    parser.add_argument("--keylime", nargs="?", const="", metavar="CONFIG",
                        help="also run the Keylime agent on bmid's TPM (config default /etc/bmi/keylime.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("bmid: %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    if os.geteuid() != 0:
        print("bmid: must run as root (it creates namespaces and cgroups for other users' PDs)", file=sys.stderr)
        return 1
    try:
        group = grp.getgrnam(args.group).gr_gid if args.group and not args.group.isdigit() else (
            int(args.group) if args.group else None)
    except KeyError:
        print(f"bmid: no group {args.group!r}", file=sys.stderr)
        return 1
    state_dir = args.state_dir or os.environ.get("BMID_STATE_DIR") or DEFAULT_STATE_DIR
    if args.state_dir is None and BMIDS[args.uri].state_subdir:
        state_dir = os.path.join(state_dir, BMIDS[args.uri].state_subdir)     # its own store, lock and keeper
    socket_path = args.socket or default_socket(args.uri)
    try:
        daemon = Daemon(state_dir=state_dir, uri=args.uri, socket_path=socket_path, group=group,
                        integrity=not args.no_integrity, shutdown_grace=args.shutdown_grace)
        daemon.listen()
        if args.keylime is not None:
            from ..keylime.agent import run_in_bmid
            run_in_bmid(daemon.mgr.integrity_service(), args.keylime or None)
    except StateError as e:         # restarting will not help: systemd's RestartPreventExitStatus
        print(_one_line(e), file=sys.stderr)
        return EXIT_STATE
    except BMIError as e:
        print(_one_line(e), file=sys.stderr)
        return 1
    except Exception as e:          # never a traceback: one line saying what, where and what to do
        print(_one_line(f"bmid: start in {state_dir}: unexpected {type(e).__name__}: {e}; run `bmid -v` for "
                        f"details and report it"), file=sys.stderr)
        logging.getLogger("bmi.bmid").debug("start failed", exc_info=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    logging.getLogger("bmi.bmid").info("serving %d PDs of %s on %s (state in %s)", len(daemon.mgr.list_pd()) - 1,
                                       args.uri, socket_path, state_dir)
    print("READY", flush=True)
    daemon.serve_forever()
    # The PDs keep running; skip interpreter teardown, which would run the driver's finalizers.
    daemon.mgr.close_integrity()
    daemon.store.close()
    daemon.ledger.close()
    daemon.board.close()
    os._exit(0)


class OneLineFormatter(logging.Formatter):
    """Each record one line of printable text, a traceback included.  Messages carry words from outside (a
    client's request id, a Keylime peer's path, a registrar's reply, a state path) and bmid's stderr is its
    journal, read a line at a time: a newline in them would forge a record of bmid's, an ESC drive the terminal
    of whoever reads it."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _one_line(e: BaseException | str) -> str:
    """`bmid: <what> <where>: <why>; <what to do>` (messages from deeper down may already start with bmid:), as
    one line of printable text: a state path or a driver's words in it cannot drive the admin's terminal."""
    text = printable(" ".join(str(e).split()))
    return text if text.startswith("bmid: ") else f"bmid: {text}"


if __name__ == "__main__":
    sys.exit(main())
