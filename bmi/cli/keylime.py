"""`bmi keylime-agent` and `bmi keylime-policy` (registered into bmi's CLI by register())."""
from __future__ import annotations

import argparse
import json
import signal
import threading



def cmd_agent(args: argparse.Namespace) -> int:
    from ..integrity.service import IntegrityService
    from ..keylime.agent import Agent, AgentConfig
    from ..keylime.launches import LaunchList
    config = {"tcti": args.tcti} if args.tcti else {}
    with IntegrityService.open(config=config) as service:
        launches = LaunchList(service.tpm)
        launches.enable()
        if args.enable:
            _say(args, {"ok": True, "tpm": service.tpm_kind, "list": str(launches.path)},
                 f"Keylime mode enabled for the {service.tpm_kind} TPM ({service.tpm.tcti}): PD launches go "
                 f"to {launches.path} and PCR 10")
            return 0
        host, _, port = (args.contact or "").rpartition(":")
        agent = Agent(service, AgentConfig.load(args.config, {
            "uuid": args.uuid, "registrar": args.registrar, "ip": host or None, "port": int(port) if port else None,
            "tls_dir": args.tls_dir, "trusted_client_ca": args.trusted_client_ca}))
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        agent.register()
        agent.start()
        try:
            url = f"https://{agent.config.ip}:{agent.config.port}"
            _say(args, {"ok": True, "uuid": agent.uuid, "url": url}, f"keylime agent {agent.uuid} serving {url}")
            done.wait()
        finally:
            agent.stop()
    return 0


def _say(args: argparse.Namespace, doc: dict, text: str) -> None:
    print(json.dumps(doc) if args.json else text, flush=True)


def cmd_policy(args: argparse.Namespace) -> int:
    from ..keylime.policy import runtime_policy, write
    write(runtime_policy(args.image, args.digest, args.any_name), args.output)
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    agent = sub.add_parser("keylime-agent", help="a Keylime pull-mode agent on bmi's TPM (PD launches in its list)",
                           description="Register with a Keylime registrar and answer the verifier's quotes; "
                                       "PD launches on this TPM are recorded as ima-ng entries in PCR 10.")
    agent.add_argument("--config", help="TOML file (default /etc/bmi/keylime.toml when it exists)")
    agent.add_argument("--enable", action="store_true", help="only turn Keylime mode on for this TPM, then exit")
    agent.add_argument("--uuid", help="agent UUID (default: derived from the EK)")
    agent.add_argument("--registrar", help="registrar HOST:PORT (its non-TLS agent port; default 127.0.0.1:8890)")
    agent.add_argument("--contact", help="HOST:PORT the verifier reaches this agent on (default 127.0.0.1:9002)")
    agent.add_argument("--tls-dir", help="where the agent's key and self-signed certificate live")
    agent.add_argument("--trusted-client-ca", help="CA certificate (PEM) of the verifier and tenant")
    agent.add_argument("--tcti", help="the TPM (default: /dev/tpmrm0, $BMI_TPM_TCTI, bmi's swtpm)")
    agent.add_argument("--json", action="store_true", help="machine-readable output")
    agent.set_defaults(func=cmd_agent)
    policy = sub.add_parser("keylime-policy", help="write a Keylime runtime policy allowing given PD images",
                            description="The JSON `keylime-policy create runtime` makes, for PD launches.")
    policy.add_argument("--image", action="append", default=[], metavar="NAME=FILE",
                        help="allow FILE as the PD named NAME (/bmi/pd/NAME)")
    policy.add_argument("--digest", action="append", default=[], metavar="NAME=HEX",
                        help="allow the sha256 measurement HEX as the PD named NAME")
    policy.add_argument("--any-name", action="append", default=[], metavar="FILE",
                        help="allow FILE as an unnamed PD (/bmi/image/<sha256>)")
    policy.add_argument("-o", "--output", help="file to write (default: stdout)")
    policy.add_argument("--json", action="store_true", help="failures as one JSON object (the policy is JSON)")
    policy.set_defaults(func=cmd_policy)

