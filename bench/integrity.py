"""Benchmark: integrity links against their anchors on the same private swtpm.

1. get_integrity_link (IntegrityService.integrity_link) vs a raw tpm2-pytss
   quote with the same AK, PCRs and qualifying data (goal: ratio <= 1.2).
2. link + offline verify_report (pinned AK) vs `tpm2_quote` + `tpm2_checkquote`
   (stock tpm2-tools, one process each, as a shell script would do).
Runs alternate (A, B, A, B ...) so drift hits both; prints medians and ratios.
Usage: python bench/integrity.py [--n 200] [--tools-n 20]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bmi.integrity.service import IntegrityService  # noqa: E402
from bmi.integrity.tpm import AK_HANDLE  # noqa: E402
from bmi.integrity.verify import verify_report  # noqa: E402
from tpm2_pytss import ESAPI, TCTILdr, TPM2_ALG, TPMT_SIG_SCHEME  # noqa: E402


def alternate(a, b, n: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(n):
        for f, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--tools-n", type=int, default=20)
    opts = ap.parse_args()
    nonce, pd = os.urandom(32), hashlib.sha256(b"bench image").digest()
    qual = hashlib.sha256(nonce + pd).digest()
    with tempfile.TemporaryDirectory(prefix="bmi-bench-") as state, \
            IntegrityService.open(config={"state_dir": state, "tpm": "swtpm"}) as svc:
        sock = svc.describe()["tcti"].split("path=", 1)[1]
        tcti = TCTILdr("swtpm", f"path={sock}")
        esys = ESAPI(tcti)
        try:
            ak = esys.tr_from_tpmpublic(AK_HANDLE)
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)

            def raw_quote():
                esys.quote(ak, svc.selection, qual, scheme)

            ours, raw = alternate(lambda: svc.integrity_link(nonce, pd), raw_quote, opts.n)
            print(f"get_integrity_link      {ours:7.3f} ms   raw tpm2-pytss quote {raw:7.3f} ms   "
                  f"ratio {ours / raw:.2f}  (goal <= 1.2, n={opts.n})")
        finally:
            esys.close()
            tcti.close()

        ak = svc.attestation_key().pem          # pinned, as a verifier does
        report = svc.integrity_link(nonce, pd)
        t0 = time.perf_counter()
        for _ in range(opts.n):
            verify_report(report, nonce=nonce, pd_integrity=pd, ak=ak)
        print(f"verify_report alone     {(time.perf_counter() - t0) / opts.n * 1e3:7.3f} ms")

        if not (shutil.which("tpm2_quote") and shutil.which("tpm2_checkquote")):
            print("tpm2-tools not installed: skipping the tpm2_quote/tpm2_checkquote anchor")
            return 0
        env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:path={sock}", "TSS2_LOG": "all+none"}
        work = os.path.join(state, "tools")
        os.mkdir(work)
        svc.integrity_link(nonce, pd).export_tpm2_tools(work, ak=ak)

        def tools():
            subprocess.run(["tpm2_quote", "-c", hex(AK_HANDLE), "-l", svc.selection, "-q", qual.hex(),
                            "-m", "t.msg", "-s", "t.sig", "-o", "t.pcrs", "-g", "sha256"],
                           cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["tpm2_checkquote", "-u", "ak.pub.pem", "-m", "t.msg", "-s", "t.sig", "-f", "t.pcrs",
                            "-g", "sha256", "-q", qual.hex()], cwd=work, env=env, check=True,
                           stdout=subprocess.DEVNULL)

        def ours_full():
            verify_report(svc.integrity_link(nonce, pd), nonce=nonce, pd_integrity=pd, ak=ak)

        ours, anchor = alternate(ours_full, tools, opts.tools_n)
        print(f"link + verify_report    {ours:7.3f} ms   tpm2_quote + tpm2_checkquote {anchor:7.3f} ms   "
              f"ratio {ours / anchor:.2f}  (n={opts.tools_n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
