"""What a `SCHEME+ssh://[user@]host[:port]/system?options` URI asks of the system's OpenSSH client.

Options, like libvirt's remote URIs:

| option | meaning |
|---|---|
| `keyfile=PATH` | the private key (`ssh -i PATH -o IdentitiesOnly=yes`) |
| `known_hosts=PATH` | the host keys to trust (`-o UserKnownHostsFile=PATH -o StrictHostKeyChecking=yes`) |
| `no_verify=1` | trust any host key (`-o StrictHostKeyChecking=no`, nothing recorded) |
| `socket=PATH` | bmid's socket on the remote host (default: that host's default for the scheme) |
| `timeout=SECONDS` | connecting, and each call's reply (default `$BMI_SSH_TIMEOUT`, else 30) |
"""
from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..errors import InvalidArgument

SUFFIX = "+ssh"
OPTIONS = ("keyfile", "known_hosts", "no_verify", "socket", "timeout")
DEFAULT_TIMEOUT = 30.0
TIMEOUT_VARIABLE = "BMI_SSH_TIMEOUT"
HELPER = "bmi-remote-helper"


def is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme.endswith(SUFFIX)


def base_scheme(scheme: str) -> str:
    """linux+ssh -> linux."""
    return scheme[:-len(SUFFIX)] if scheme.endswith(SUFFIX) else scheme


@dataclass(frozen=True)
class SshTarget:
    uri: str
    scheme: str                 # the driver's: linux, xen
    host: str
    user: str | None
    port: int | None
    keyfile: str | None
    known_hosts: str | None
    no_verify: bool
    socket: str | None
    timeout: float

    @property
    def destination(self) -> str:
        """user@host:port, as messages name it."""
        return f"{self.user + '@' if self.user else ''}{self.host}{f':{self.port}' if self.port else ''}"

    @property
    def system_uri(self) -> str:
        """What the remote bmid serves: linux:///system."""
        return f"{self.scheme}:///system"

    def argv(self, ssh: str = "ssh") -> list[str]:
        """The ssh command line: batch mode (never a prompt), bounded connect, dead links noticed."""
        alive = max(1, math.ceil(self.timeout / 3))
        argv = [ssh, "-T", "-x", "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={max(1, math.ceil(self.timeout))}",
                "-o", f"ServerAliveInterval={alive}", "-o", "ServerAliveCountMax=3"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.user is not None:
            argv += ["-l", self.user]
        if self.keyfile is not None:
            argv += ["-i", self.keyfile, "-o", "IdentitiesOnly=yes"]
        if self.no_verify:
            argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                     "-o", "LogLevel=ERROR"]       # not "Permanently added" on every connection
        elif self.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        else:
            argv += ["-o", "StrictHostKeyChecking=yes"]
        command = [HELPER, "--uri", self.system_uri] + (["--socket", self.socket] if self.socket else [])
        return argv + ["--", self.host, shlex.join(command)]


def parse(uri: str) -> SshTarget:
    """The target of a +ssh URI; InvalidArgument naming what is wrong (bmi.uri checked the option names)."""
    parts = urlsplit(uri)
    what = f"open {uri!r}"
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise InvalidArgument(f"{what}: {e}") from None
    if not host:
        raise InvalidArgument(f"{what}: no host; the form is {parts.scheme}://[user@]host[:port]/system")
    user = parts.username
    for name, value in (("host", host), ("user", user)):
        if value is not None and (value.startswith("-") or not value.isprintable() or " " in value):
            raise InvalidArgument(f"{what}: {name} {value!r} is not a host or user name")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    no_verify = query.get("no_verify", "0")
    if no_verify not in ("0", "1"):
        raise InvalidArgument(f"{what}: no_verify is 1 or 0, not {no_verify!r}")
    if no_verify == "1" and "known_hosts" in query:
        raise InvalidArgument(f"{what}: known_hosts= and no_verify=1 contradict each other")
    for name in ("keyfile", "known_hosts"):
        if name in query and not os.access(query[name], os.R_OK):
            raise InvalidArgument(f"{what}: {name} {query[name]!r} is not a readable file here")
    if "socket" in query and not query["socket"].startswith("/"):
        raise InvalidArgument(f"{what}: socket {query['socket']!r} is not an absolute path on the remote host")
    return SshTarget(uri, base_scheme(parts.scheme), host, user, port, query.get("keyfile"),
                     query.get("known_hosts"), no_verify == "1", query.get("socket"), _timeout(query, what))


def _timeout(query: dict[str, str], what: str) -> float:
    if "timeout" in query:
        raw, source = query["timeout"], "?timeout="
    else:
        raw, source = os.environ.get(TIMEOUT_VARIABLE, ""), f"${TIMEOUT_VARIABLE}"
        if not raw:
            return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value < 86400):
        raise InvalidArgument(f"{what}: {source} {raw!r} is not a number of seconds (0 < s < 86400)")
    return value
