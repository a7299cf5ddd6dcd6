"""The main job in one page: a measured, isolated PD, its parameters, and a report.

Run with `make demo` (it installs what is missing first).
"""
import hashlib
import os
import shutil
import sys

import bmi

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def main() -> int:
    with bmi.open() as mgr:                                    # linux:///session
        pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20, cpu=1, performance=50))
        pd.setup_pd(bmi.FileImage(BUSYBOX), banks=("sha256", "sha384"))
        digest = pd.get_runtime_param("/system/measurement/sha256")
        expected = hashlib.sha256(open(BUSYBOX, "rb").read()).hexdigest()
        print(f"PD {pd.get_pd_id()} measured sha256:{digest} (file hashes to the same: {digest == expected})")
        pd.set_config_param("/boot/cmdline",
                            "busybox sh -c 'echo hello from $(hostname) as uid $(id -u); "
                            "echo interfaces: $(ls /sys/class/net 2>/dev/null || cut -d: -f1 /proc/net/dev | tail -n +3); "
                            "echo root: $(ls /); echo processes: $(ls /proc | grep -c \"^[0-9]\"); sleep 30'")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        print("status:", pd.get_current_status().name)
        for cap in pd.list_runtime_params("/system/memory"):
            print(f"  {cap.name:<28} {'rw' if cap.write else 'ro'}  {pd.get_runtime_param(cap.name)}")
        pd.set_runtime_param("/system/memory/current", "16M")
        print("memory limit now", pd.get_runtime_param("/system/memory/current"))
        pd.request_status_change(pd.get_runtime_param("/capability/pause"))
        print("status:", pd.get_current_status().name)
        pd.request_status_change(bmi.PDStatus.RUNNING)
        try:
            ak = mgr.get_attestation_key()      # a verifier enrols this beforehand, over a trusted channel
            print(f"attestation key (under the TPM's EK): {ak.fingerprint}")
            nonce = os.urandom(32)
            report = pd.get_integrity_link(nonce)
            print(f"integrity report from a {report.tpm} TPM: quote over PCRs {report.pcr_selection}")
            bmi.verify_report(report, nonce=nonce, pd_integrity=bytes.fromhex(expected), ak=ak.fingerprint)
            print("verified offline: signature by the pinned AK, nonce and PD measurement match")
        except bmi.NotSupported as e:
            print("integrity:", e)
        pd.request_status_change(bmi.PDStatus.SHUTDOWN)
        print("console:\n" + pd.get_runtime_param("/console/log"))
        print("status:", pd.get_current_status().name, "-", pd.get_runtime_param("/system/exit-reason"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
