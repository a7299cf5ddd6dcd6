"""The method table (bmi/channel/methods.py) is the one list: the dispatchers, bmid's roles, the
clients and docs/protocol.md agree with it, and what it promises holds on a real channel."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bmi import PDDescription, PDStatus
from bmi.channel import protocol as p
from bmi.channel.dispatch import Dispatcher
from bmi.channel.methods import METHODS, READ_ONLY, RETURNS_FD
from bmi.errors import NoSuchDomain
from bmi.server import daemon

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20


def handlers(cls: type) -> set[str]:
    return {name[2:] for name in dir(cls) if name.startswith("m_")}


def test_every_handler_has_a_row_and_every_row_a_handler():
    served = {m.name for m in METHODS.values() if not m.server}
    assert handlers(daemon.SystemDispatcher) == served
    assert handlers(Dispatcher) == {m.name for m in METHODS.values() if not m.server and not m.bmid_only}


def test_bmid_takes_its_roles_and_fd_replies_from_the_table():
    assert daemon.READ_ONLY is READ_ONLY
    assert daemon.SystemDispatcher.returns_fd == RETURNS_FD == {"connect", "accept", "status_board"}
    assert not READ_ONLY & {"destroy", "setup_pd", "set_priority", "assign", "request_status_change"}


def client_calls(path: Path) -> list[tuple[str, str, set[str]]]:
    """(method, how, parameter names) of every request a client module sends: x._call("m", a=..),
    x.value("m", a=..) and x.call("m", {"a": ..})."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            continue
        how, name = node.func.attr, node.args[0].value
        if how in ("_call", "value"):
            found.append((name, how, {k.arg for k in node.keywords if k.arg}))
        elif how == "call" and len(node.args) > 1 and isinstance(node.args[1], ast.Dict):
            found.append((name, how, {k.value for k in node.args[1].keys if isinstance(k, ast.Constant)}))
    return found


@pytest.mark.parametrize("module", ["bmi/pd.py", "bmi/system.py"])
def test_the_clients_send_only_what_the_table_has(module):
    calls = client_calls(ROOT / module)
    assert len(calls) > 10
    for name, how, names in calls:
        assert name in METHODS, f"{module} sends {name!r}, which the method table lacks"
        if how == "_call":       # a controller's call: it adds "pd"
            names = names | {"pd"}
        assert names <= METHODS[name].names, f"{module}: {name} with {sorted(names - METHODS[name].names)}"
        assert set(METHODS[name].required) <= names, f"{module}: {name} without {METHODS[name].required}"


def test_the_protocol_page_lists_exactly_the_table():
    page = (ROOT / "docs" / "protocol.md").read_text()
    section = page[page.index("\n## Methods"):page.index("\n## ", page.index("\n## Methods") + 1)]
    in_tables = set(re.findall(r"^\| `(\w+)`", section, re.MULTILINE))
    in_tables |= set(re.findall(r"^\| `\w+` / `(\w+)`", section, re.MULTILINE))
    bmid = section[section.index("`SystemDispatcher`):") + len("`SystemDispatcher`):"):]
    only_bmid = set(re.findall(r"`(\w+)`", bmid[:bmid.index("status memfd")]))
    assert in_tables == {m.name for m in METHODS.values() if not m.bmid_only}
    assert only_bmid == {m.name for m in METHODS.values() if m.bmid_only}


def test_unknown_names_are_refused_from_the_table(mgr, as_pd):
    pd = mgr.allocate_pd(PDDescription(mem=32 * MB))
    client = as_pd(pd)
    with pytest.raises(p.errors.InvalidArgument, match=r"unexpected \['bogus'\]"):
        client._channel.value("get_config_param", name="/boot/cmdline", bogus=1)
    with pytest.raises(p.errors.InvalidArgument, match=r"unexpected \['pd'\]"):
        client._channel.value("list_pd", pd=1)


def test_a_pd_requests_a_status_change_with_an_int_as_the_readme_says(mgr, as_pd):
    parent = mgr.allocate_pd(PDDescription(mem=64 * MB))
    client = as_pd(parent)
    child = client.allocate_pd(PDDescription(mem=16 * MB))
    child.request_status_change(int(PDStatus.DESTROYED))
    with pytest.raises(NoSuchDomain):
        mgr.get_controller(child.get_pd_id())
