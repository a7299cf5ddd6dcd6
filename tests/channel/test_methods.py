"""The method table (bmi/channel/methods.py) is the one list: the dispatchers, bmid's roles, the
clients and docs/protocol.md agree with it, and what it promises holds on a real channel."""
from __future__ import annotations

import ast
import inspect
import pydoc
import re
from pathlib import Path

import pytest

from bmi import PDDescription, PDStatus
from bmi.channel import protocol as p
from bmi.channel.client import remote
from bmi.channel.dispatch import Dispatcher
from bmi.channel.methods import METHODS, READ_ONLY, RETURNS_FD
from bmi.errors import InvalidArgument, NoSuchDomain
from bmi.pd import PDClient, RemoteController
from bmi.server import daemon
from bmi.system import SystemClient, SystemController, SystemDeviceManager

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
def test_the_hand_written_client_methods_send_only_what_the_table_has(module):
    calls = client_calls(ROOT / module)
    assert len(calls) >= 2
    for name, how, names in calls:
        assert name in METHODS, f"{module} sends {name!r}, which the method table lacks"
        if how == "_call":       # a controller's call: it adds "pd"
            names = names | {"pd"}
        assert names <= METHODS[name].names, f"{module}: {name} with {sorted(names - METHODS[name].names)}"
        assert set(METHODS[name].required) <= names, f"{module}: {name} without {METHODS[name].required}"


CLIENTS = (PDClient, RemoteController, SystemClient, SystemController, SystemDeviceManager)
#: Rows whose client methods are written by hand, and why.
HAND_WRITTEN = {
    "get_controller": "answers a controller object, from the status board when it can",
    "allocate_pd": "takes a PDDescription",
    "list_pd": "SystemClient reads bmid's status board",
    "get_current_status": "SystemController reads bmid's status board",
    "connect": "the reply carries an fd", "accept": "the reply carries an fd",
    "setup_pd": "the request carries an fd", "status_board": "the reply carries an fd",
    "read_console": "None means no waiting; answers (offset, bytes)",
    "subscribe": "a stream of events (SystemClient.events)",
}


def test_every_row_has_a_client_method_built_from_it():
    """Adding a method is a row and a handler: its client method is built from the row (remote())."""
    built = {}
    for cls in CLIENTS:
        for name, value in vars(cls).items():
            if hasattr(value, "row"):
                assert value.row is METHODS[name], f"{cls.__name__}.{name} is built from another row"
                built.setdefault(name, []).append(cls)
    assert set(built) | set(HAND_WRITTEN) == set(METHODS)
    assert not set(built) & {"connect", "accept", "setup_pd", "status_board", "subscribe"}


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(HAND_WRITTEN)))
def test_a_built_method_shows_the_rows_parameters(name):
    row = METHODS[name]
    owner = next(cls for cls in CLIENTS if name in vars(cls))
    method = getattr(owner, name)
    params = list(inspect.signature(method).parameters.values())[1:]
    built = [s for s in row.specs if not s.optional or s.has_default]     # "name?:type": hand-written overrides only
    assert [x.name for x in params] == ["pd_id" if s.name == "pd" else s.name for s in built]
    assert [x.default for x in params if x.default is not inspect.Parameter.empty] == \
        [s.default for s in built if s.optional]
    assert all(x.annotation is not inspect.Parameter.empty for x in params)
    assert method.__doc__.startswith(row.doc) and method.__qualname__ == f"{owner.__name__}.{name}"
    assert pydoc.render_doc(method).count(name) >= 1


def test_a_row_with_an_fd_cannot_be_built():
    for name in ("setup_pd", "connect", "status_board", "subscribe"):
        with pytest.raises(TypeError, match="by hand"):
            remote(name)


def test_a_built_method_checks_its_arguments_before_sending(mgr, as_pd):
    """The argument conversions of the row's types run in the client: a bad policy never reaches the layer."""
    parent = mgr.allocate_pd(PDDescription(mem=32 * MB))
    child = as_pd(parent).allocate_pd(PDDescription(mem=16 * MB))
    with pytest.raises(InvalidArgument, match=r"set_allowed_connections of PD \d+: 'RW' is not a ConnectionPolicy"):
        child.set_allowed_connections(parent.get_pd_id(), ["RW"])
    with pytest.raises(InvalidArgument, match=r"get_integrity_link of PD \d+: nonce: expected bytes, got str"):
        child.get_integrity_link("nonce")
    assert child.list_runtime_params("/capability") == mgr.get_controller(child.get_pd_id()).list_runtime_params(
        "/capability")


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
