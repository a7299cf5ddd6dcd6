"""`bmi verify`, `bmi seal`, `bmi eventlog`, `bmi tpm`: the integrity commands.

bmi/cli/__init__.py calls register(subparsers); each handler returns the exit status
(BMIError is reported by its main).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from ..files import MAX_DOCUMENT, read_bytes, read_text, sha256_of
from ..text import printable
from ..types import ConnectionIntegrityPolicy, ConnectionType, IntegrityPolicy

POLICY_HELP = """\
POLICY.json:
  {"pd_integrity": "<hex SHA-256 of the PD image>",
   "pd_connections": [{"con_type": "IPC"|"STREAM"|"SHM"|"EVENT",
                       "mode": "READ"|"WRITE"|"RW" (or 1|2|3),
                       "dest": "<hex measurement of the peer PD>"}, ...]}
  pd_connections may be omitted.  The blob releases the secret only to a
  PD with that measurement, with each listed connection allowed towards a
  PD of the listed measurement, while the TVL PCRs are unchanged.

examples:
  bmi seal --policy policy.json --secret-file key.bin -o creds.blob
  bmi tpm --storage-public-out storage.json      # on the machine
  bmi seal --policy policy.json --secret-file key.bin -o creds.blob \\
           --storage-public storage.json          # anywhere, no TPM needed
"""
_MODES = {"READ": 1, "WRITE": 2, "RW": 3}


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{what}: {text!r} is not hex") from None


def load_policy(path: str) -> IntegrityPolicy:
    """Parse POLICY.json (format in POLICY_HELP); InvalidArgument naming the bad field."""
    text = read_text(path, "policy", MAX_DOCUMENT)
    try:
        doc = json.loads(text)
        conns = []
        for i, c in enumerate(doc.get("pd_connections", [])):
            ctype = c["con_type"]
            ctype = ConnectionType[ctype.upper()] if isinstance(ctype, str) else ConnectionType(ctype)
            mode = _MODES[c["mode"].upper()] if isinstance(c["mode"], str) else int(c["mode"])
            conns.append(ConnectionIntegrityPolicy(ctype, mode, _hex(c["dest"], f"pd_connections[{i}].dest")))
        return IntegrityPolicy(_hex(doc["pd_integrity"], "pd_integrity"), tuple(conns))
    except InvalidArgument as e:
        raise InvalidArgument(f"policy {path}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidArgument(f"policy {path}: {type(e).__name__}: {e}") from None


def _emit(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def cmd_verify(args: argparse.Namespace) -> int:
    from ..integrity.keys import fingerprint, load_pem, resolve
    from ..types import IntegrityReport
    from ..integrity.verify import UnpinnedKeyWarning, verify_report
    report = IntegrityReport.from_json(read_text(args.report, "verify: the report", MAX_DOCUMENT))
    if args.expect_image:
        expected = sha256_of(args.expect_image, "verify: --expect-image")
    else:
        expected = _hex(args.expect_digest, "--expect-digest")
    pcrs = {}
    for item in args.pcr:
        index, sep, value = item.partition("=")
        if not sep or not index.isdigit():
            raise InvalidArgument(f"verify: --pcr {item!r} is not N=HEX")
        pcrs[int(index)] = _hex(value, f"--pcr {index}")
    ak = _pinned_key(args.ak)
    trusted = bool(args.trust_report_key)
    # a failed check is an IntegrityError: bmi.cli's main reports it like every other error (exit 1)
    with warnings.catch_warnings():      # said below, once, in the CLI's own words
        warnings.simplefilter("ignore", UnpinnedKeyWarning)
        verify_report(report, nonce=_hex(args.nonce, "--nonce"), pd_integrity=expected, pcrs=pcrs, ak=ak,
                      trust_report_key=trusted)
    signer = resolve(ak, "verify").fingerprint if ak else fingerprint(load_pem(report.pubkey, "verify"))
    if trusted:
        print(f"WARNING: trusted the attestation key inside the report ({signer}); anyone can make such a "
              "report. Pin the machine's AK with --ak FILE|FINGERPRINT (from `bmi tpm` at enrolment).",
              file=sys.stderr)
    _emit({"ok": True, "pd_integrity": expected.hex(), "tpm": report.tpm, "pcr_selection": report.pcr_selection,
           "ak_fingerprint": signer, "trusted_report_key": trusted},
          args.json, f"OK: PD {expected.hex()} on a {report.tpm} TPM, quoted {report.pcr_selection}, "
                     f"signed by {'the UNPINNED key ' if trusted else 'the pinned AK '}{signer}")
    return 0


def _pinned_key(value: str | None, what: str = "verify") -> str | None:
    """--ak: a fingerprint as is, else the PEM in that file."""
    if value is None or value.strip().lower().startswith("sha256:"):
        return value
    try:
        return read_text(value, f"{what}: --ak", MAX_DOCUMENT)
    except InvalidArgument as e:
        raise InvalidArgument(f"{e}; give the AK's PEM file or its fingerprint sha256:<hex>") from None


def cmd_seal(args: argparse.Namespace) -> int:
    from ..integrity.credentials import MAX_SECRET
    policy = load_policy(args.policy)
    secret = read_bytes(args.secret_file, "seal: --secret-file", MAX_SECRET)
    storage = read_bytes(args.storage_public, "seal: --storage-public", MAX_DOCUMENT) if args.storage_public else None
    if storage is not None:
        from ..integrity.verify import wrap_credentials
        blob = wrap_credentials(policy, secret, storage)
    else:
        from ..integrity.service import IntegrityService
        with IntegrityService.open() as service:
            blob = service.seal(policy, secret)
    Path(args.output).write_bytes(blob)
    print(f"wrote {len(blob)} bytes to {args.output}", file=sys.stderr)
    return 0


def cmd_eventlog(args: argparse.Namespace) -> int:
    from ..integrity.service import IntegrityService
    with IntegrityService.open() as service:
        records = service.eventlog()
        lines = service.ima_lines()
    if args.json:
        print(json.dumps(records, indent=2))
    elif args.ima:
        print("\n".join(lines))
    else:
        for r in records:
            b = r["bmi"]
            pcr = "-" if r["pcr"] is None else r["pcr"]
            print(f"{r['recnum']:>4} pcr {pcr:>2} {b['event']:<3} {b['measurement']} {printable(str(b['name']))}")
    return 0


def cmd_tpm(args: argparse.Namespace) -> int:
    from ..integrity.service import IntegrityService
    with IntegrityService.open() as service:
        info = service.describe()
        if args.storage_public_out:
            Path(args.storage_public_out).write_bytes(service.storage_public())
    long = ("ak_public_pem", "ak_public_area", "ek_public_pem", "ek_public_area", "ek_certificate")
    text = "\n".join(f"{k:<17} {v}" for k, v in info.items() if k not in long)
    text += "\nAK (pin this: `bmi verify --ak`):\n" + info["ak_public_pem"]
    text += "EK:\n" + info["ek_public_pem"]
    text += f"EK certificate:  {'in NV (see --json)' if info['ek_certificate'] else 'none in NV'}"
    _emit(info, args.json, text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the integrity subcommands to `bmi`."""
    raw = argparse.RawDescriptionHelpFormatter
    verify = sub.add_parser("verify", help="check an integrity report offline (no TPM needed)",
                            description="Verify REPORT.json (from `bmi run --attest`): the TPM signature by "
                                        "the pinned attestation key (--ak), the nonce, the PD measurement and "
                                        "the quoted PCRs. Exit 0 if it holds, 1 naming the failed check "
                                        "(IntegrityError).")
    verify.add_argument("report", metavar="REPORT.json")
    verify.add_argument("--nonce", required=True, metavar="HEX", help="the nonce the report was asked with")
    want = verify.add_mutually_exclusive_group(required=True)
    want.add_argument("--expect-image", metavar="FILE", help="the image the PD must run (its SHA-256)")
    want.add_argument("--expect-digest", metavar="HEX", help="the SHA-256 the PD must have")
    verify.add_argument("--pcr", action="append", default=[], metavar="N=HEX", help="expected PCR value (repeatable)")
    pin = verify.add_mutually_exclusive_group()
    pin.add_argument("--ak", metavar="FILE|FINGERPRINT",
                     help="the machine's attestation key, obtained beforehand (`bmi tpm` shows its PEM and "
                          "fingerprint): a PEM file or sha256:<hex>. Required unless --trust-report-key")
    pin.add_argument("--trust-report-key", action="store_true",
                     help="accept the key inside the report (anyone can forge such a report; says so)")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=cmd_verify)

    seal = sub.add_parser("seal", help="make a protected-credentials blob", formatter_class=raw,
                          epilog=POLICY_HELP,
                          description="Seal a secret to this machine's TPM and TVL PCRs, or with "
                                      "--storage-public wrap it offline for another machine.")
    seal.add_argument("--policy", required=True, metavar="POLICY.json", help="the IntegrityPolicy (format below)")
    seal.add_argument("--secret-file", required=True, metavar="F", help="the secret (at most 1 MiB)")
    seal.add_argument("-o", "--output", required=True, metavar="BLOB", help="where to write the blob")
    seal.add_argument("--storage-public", metavar="FILE",
                      help="the target's `bmi tpm --storage-public-out` file: wrap offline, no local TPM")
    seal.set_defaults(func=cmd_seal)

    log = sub.add_parser("eventlog", help="show the measurement event log of this TPM boot")
    log.add_argument("--ima", action="store_true", help="IMA-ng style lines (PCR template-hash ima-ng digest name)")
    log.add_argument("--json", action="store_true", help="CEL-JSON records")
    log.set_defaults(func=cmd_eventlog)

    tpm = sub.add_parser("tpm", help="show the TPM bmi uses (kind, PCR banks, TVL PCR value, AK and EK)")
    tpm.add_argument("--json", action="store_true", help="machine-readable output")
    tpm.add_argument("--storage-public-out", metavar="FILE",
                     help="also write the storage public part for `bmi seal --storage-public`")
    tpm.set_defaults(func=cmd_tpm)
