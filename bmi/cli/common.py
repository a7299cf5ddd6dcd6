"""What several `bmi` commands share: option parsers, the PD options of run/create, Ctrl-C holding,
preparing a PD, progress bars, and naming a PD by id or name."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

from .. import errors, params
from ..errors import InvalidArgument, NoSuchDomain
from ..image import FileImage
from ..types import PDDescription, PDStatus

PROGRESS_THRESHOLD = 64 * 1024 * 1024
NAME_PARAM = "/name"


class UsageError(errors.InvalidArgument):
    """The command line itself is wrong: exit status 2, like argparse's own errors."""

    usage = ""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors take main()'s one error path (status 2; one JSON object with --json)."""

    def error(self, message: str) -> NoReturn:
        error = UsageError(f"{self.prog}: {message}")
        error.usage = self.format_usage()
        raise error


def parse_size(text: str) -> int:
    """'64M' -> 67108864; plain numbers are bytes (the parameters' own parser)."""
    try:
        return params.parse_size(text, what="size")
    except errors.InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def parse_hex(text: str) -> str:
    """A hex string (a nonce), checked while parsing so no image is measured for a typo."""
    try:
        bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex") from None
    return text


def parse_env(text: str) -> str:
    """NAME=VALUE, as `env` takes it; a bare NAME is a mistake, not an empty variable."""
    name, sep, _ = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return text


def add_pd_options(parser: argparse.ArgumentParser) -> None:
    """The options `run` and `create` share: resources, priority, environment, capabilities, banks."""
    parser.add_argument("--mem", type=parse_size, default=64 << 20, help="hard memory limit (default 64M)")
    parser.add_argument("--cpus", type=int, default=1, help="number of CPUs (clamped to the host; default 1)")
    parser.add_argument("--performance", type=int, default=100, help="share of those CPUs in percent (1-100)")
    parser.add_argument("--priority", type=int, default=0, help="-10..+10 (nice and CPU weight; default 0)")
    parser.add_argument("--env", action="append", default=[], type=parse_env, metavar="NAME=VALUE",
                        help="environment (repeatable)")
    parser.add_argument("--caps", metavar="LIST", help="capabilities the program keeps in its own namespaces, "
                        "e.g. net_raw,net_bind_service or all (default: none, like bwrap)")
    parser.add_argument("--allow", metavar="LIST", help="kernel surface refused by default that the PD may use: "
                        "io_uring (config /boot/allow)")
    parser.add_argument("--banks", default="sha256", help="digest banks, e.g. sha256,sha384 (default sha256)")
    add_device_options(parser)      # --device, --net


MODES = {"r": 1, "w": 2, "rw": 3}


def parse_mode(text: str) -> int:
    try:
        return MODES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not r, w or rw") from None


def parse_device(text: str) -> tuple[str, int]:
    """DEV[:MODE] -> (path, mode); the mode defaults to rw."""
    path, sep, mode = text.rpartition(":")
    if not sep or mode.lower() not in MODES:
        return text, MODES["rw"]
    return path, MODES[mode.lower()]


def parse_net(text: str) -> dict[str, str]:
    """[IFNAME=]veth:BRIDGE,ADDRESS/PREFIX[,gw=GATEWAY] -> the PD's /net/... config parameters."""
    head, _, rest = text.partition(",")
    name, sep, kind = head.partition("=")
    if not sep:
        name, kind = "eth0", head
    config = {f"/net/{name}": kind}
    for item in filter(None, rest.split(",")):
        if item.startswith("gw="):
            config[f"/net/{name}/gateway"] = item[len("gw="):]
        elif "/" in item:
            config[f"/net/{name}/address"] = item
        else:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is neither ADDRESS/PREFIX nor gw=GATEWAY")
    if ":" not in kind:
        raise argparse.ArgumentTypeError(f"{text!r}: want [IFNAME=]veth:BRIDGE,ADDRESS/PREFIX[,gw=GATEWAY]")
    return config


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --net for `run` and `create` (add_pd_options)."""
    parser.add_argument("--device", action="append", default=[], type=parse_device, metavar="DEV[:MODE]",
                        help="give the PD a host device node, MODE r, w or rw (default rw; repeatable)")
    parser.add_argument("--net", action="append", default=[], type=parse_net,
                        metavar="[IFNAME=]veth:BRIDGE,ADDR/PREFIX[,gw=GW]",
                        help="a network interface in the PD (IFNAME default eth0; repeatable); none by default")


def apply_device_options(mgr: Any, pd: Any, args: argparse.Namespace) -> None:
    """The PD's --net config and --device assignments (before it starts)."""
    for config in getattr(args, "net", []):
        for name, value in config.items():
            pd.set_config_param(name, value)
    devices = mgr.get_device_manager() if getattr(args, "device", []) else None
    for path, mode in getattr(args, "device", []):
        devices.assign(path, pd.get_pd_id(), mode)


@contextlib.contextmanager
def held_interrupts() -> Iterator[Callable[[], None]]:
    """Hold Ctrl-C while a call is in flight and raise it at the next check() this yields.

    A call to bmid cut short leaves its reply on the channel, where the next call (the destroy that cleans
    up) would read it; a PD allocated by bmid but not yet known here would be left behind.  A Ctrl-C that
    comes after the last check is raised on leaving."""
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))

    def check() -> None:
        if pending:
            pending.clear()
            raise KeyboardInterrupt
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()


def prepare_pd(mgr: Any, args: argparse.Namespace, argv: Sequence[str] | None, check: Callable[[], None],
               config: Mapping[str, str] | None = None) -> Any:
    """Allocate a PD and give it the options of add_pd_options, all checked before the image is measured
    (a bad --priority must not wait for a 1 GiB hash); then measure the image into it.

    `check` (held_interrupts) is called between the calls and while the image is copied, so Ctrl-C lands
    where the PD can still be destroyed: on any failure nothing half-built is left behind."""
    pd = mgr.allocate_pd(PDDescription(mem=args.mem, cpu=args.cpus, performance=args.performance))
    try:
        check()
        pd.set_priority(args.priority)
        for key, value in (config or {}).items():
            pd.set_config_param(key, value)
        if argv:
            pd.set_config_param("/boot/cmdline", shlex.join(argv))
        for item in args.env:
            name, _, value = item.partition("=")
            pd.set_config_param(f"/boot/env/{name}", value)
        if args.caps:
            pd.set_config_param("/boot/capabilities", args.caps)
        if args.allow:
            pd.set_config_param("/boot/allow", args.allow)
        apply_device_options(mgr, pd, args)     # --net config, --device assignments
        check()
        image = FileImage(args.image)
        with checked_progress(args, image.get_image_size(), "measuring", check) as copied:
            pd.setup_pd(image, banks=[b.strip() for b in args.banks.split(",") if b.strip()], progress=copied)
        check()
    except BaseException:
        pd.destroy()
        raise
    return pd


def start_pd(pd: Any, args: argparse.Namespace, check: Callable[[], None]) -> None:
    """Start a PD prepare_pd made, with a bar while its root archive is unpacked (Ctrl-C stops that too)."""
    with checked_progress(args, os.path.getsize(args.image), "unpacking", check) as unpacked:
        pd.request_status_change(PDStatus.RUNNING, progress=unpacked)


@contextlib.contextmanager
def checked_progress(args: argparse.Namespace, total: int, desc: str,
                     check: Callable[[], None]) -> Iterator[Callable[[int, int], None]]:
    """The progress callback of a long API call: a bar (progress) where there is one, and a held Ctrl-C
    raised at each report (held_interrupts' check), so the call stops where it can clean up."""
    with progress(args, total, desc) as update:
        def report(done: int, now_total: int) -> None:
            check()
            if update is not None:
                update(done, now_total)
        yield report


@contextlib.contextmanager
def progress(args: argparse.Namespace, total: int | None, desc: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar (tqdm) on stderr for a long step, when stderr is a terminal and not --quiet.

    total None: not known before the step starts.  Yields the callback setup_pd, request_status_change and
    bundle take (done, total), or None when there is no bar.  The bar appears at the first report: a step that
    reports nothing (an ELF image is not unpacked) shows none."""
    if (getattr(args, "quiet", False) or not sys.stderr.isatty()
            or (total is not None and total < PROGRESS_THRESHOLD)):
        yield None
        return
    from tqdm import tqdm
    # shutil's size: $COLUMNS/$LINES, the terminal's, or 80x24 where a terminal reports 0 (tqdm would draw nothing)
    size = shutil.get_terminal_size()
    bar = None

    def update(done: int, now_total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=now_total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                       leave=False, ncols=size.columns, nrows=size.lines)
        if bar.total != now_total:
            bar.total = now_total
        bar.update(done - bar.n)
    try:
        yield update
    finally:
        if bar is not None:
            bar.close()



def connection_rows(text: str) -> list[dict[str, Any]]:
    """/interfaces/connections (`ID to|from PEER TYPE MODE [pending]` per line) as rows."""
    rows = [line.split() for line in text.splitlines()]
    return [{"conn": int(r[0]), "direction": r[1], "peer": int(r[2]), "type": r[3], "mode": r[4],
             "pending": r[-1] == "pending"} for r in rows]


def describe(mgr: Any) -> list[dict[str, Any]]:
    """Every PD as a row; one call to bmid, one per PD in session mode."""
    if hasattr(mgr, "describe"):
        return mgr.describe()
    rows = []
    for pd_id in mgr.list_pd()[1:]:
        pd = mgr.get_controller(pd_id)
        try:
            name = pd.get_config_param(NAME_PARAM)
        except InvalidArgument:
            name = ""
        rows.append({"pd": pd_id, "name": name, "status": pd.get_current_status().name,
                     "sha256": pd.measurement().get("sha256", b"").hex()})
    return rows


def resolve(mgr: Any, ref: str) -> Any:
    """A controller for a PD given by id or name."""
    if ref.isdigit():
        return mgr.get_controller(int(ref))
    matches = [r["pd"] for r in describe(mgr) if r.get("name") == ref]
    if len(matches) != 1:
        why = "no PD has that name" if not matches else f"{len(matches)} PDs have that name: {matches}"
        raise NoSuchDomain(f"{ref!r}: {why}")
    return mgr.get_controller(matches[0])


