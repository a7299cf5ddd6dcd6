"""A rig test with the bmi pytest plugin: two PDs from one C program, connected, one attested.

    pytest examples/rig/test_pair.py                           # linux:///session
    pytest examples/rig/test_pair.py --bmi-uri linux:///system  # the same through bmid
"""
from pathlib import Path

import bmi
from bmi.testing import wait_console, wait_status

PAIR = Path(__file__).with_name("pair.c")
IPC_READ = [bmi.ConnectionPolicy(bmi.ConnectionType.IPC, bmi.READ)]


def test_pair(pd_factory, bmi_pd_program, bmi_attest):
    program = bmi_pd_program(PAIR)                  # static ELF, cached by content hash
    server = pd_factory(program, argv=["pair", "serve"])
    report = bmi_attest(server, expect_image=program)   # verified against the pinned AK
    assert report.pd_integrity == bmi.testing.file_digest(program)
    client = pd_factory(program, argv=["pair", "ask", str(server.get_pd_id())],
                        connections={server: IPC_READ})
    wait_console(client, f"got: hello from {server.get_pd_id()}")
    wait_console(server, f"served {client.get_pd_id()}")
    wait_status(client, bmi.PDStatus.SHUTDOWN)
