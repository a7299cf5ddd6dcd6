"""The C PD client's error codes are the protocol's: every BMI_E_* of csrc/client/bmi_client.h is a code
bmi/channel/protocol.py sends, and every code it sends has a BMI_E_* (a C program can tell them apart)."""
from __future__ import annotations

import re

from bmi.channel import protocol as p
from bmi.clientlib import pd_client_dir

HEADER = pd_client_dir() / "bmi_client.h"


def header_codes() -> dict[str, int]:
    found = re.findall(r"^#define\s+(BMI_E_\w+)\s+\((-?\d+)\)", HEADER.read_text(), re.MULTILINE)
    return {name: int(value) for name, value in found}


def test_the_header_names_every_code_the_protocol_sends():
    sent = {p.PARSE_ERROR, p.INVALID_REQUEST, p.METHOD_NOT_FOUND, p.INVALID_PARAMS, p.INTERNAL_ERROR, p.BUSY,
            *p.ERROR_CODES.values()}
    codes = header_codes()
    channel_failed = {name: code for name, code in codes.items() if code == -1}
    assert list(channel_failed) == ["BMI_E_IO"]     # not a wire code: the channel itself failed
    named = {code for code in codes.values() if code != -1}
    assert named == sent, f"only in the header: {sorted(named - sent)}; only in protocol.py: {sorted(sent - named)}"
    assert len(set(codes.values())) == len(codes), "two BMI_E_* names share a code"
