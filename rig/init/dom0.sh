# Stage 2 of the Xen rig, in dom0: the toolstack (xenfs, xenstored,
# xen-init-dom0, xenconsoled), a swtpm for the integrity calls, an `xl`
# smoke check, then the Xen driver's tests (pytest -m xen).
. /run/rig/common.sh
X=/usr/lib/xen-4.17/bin
mount -t xenfs xenfs /proc/xen || rig_fail "cannot mount xenfs on /proc/xen"
mkdir -p /run/xen /run/xenstored /var/lib/xenstored /var/log/xen /var/lib/xen
$X/xenstored --pid-file /run/xenstored.pid || rig_fail "xenstored did not start"
n=0
until xenstore-read -s / >/dev/null 2>&1; do
	n=$((n + 1)); [ $n -lt 60 ] || rig_fail "xenstored not answering after 30 s"; sleep 0.5
done
$X/xen-init-dom0 >/dev/null || rig_fail "xen-init-dom0 failed"
$X/xenconsoled --pid-file=/run/xenconsoled.pid || rig_fail "xenconsoled did not start"
mkdir -p /run/rig/tpm
swtpm socket --tpm2 --tpmstate dir=/run/rig/tpm --server type=unixio,path=/run/rig/tpm/sock \
	--ctrl type=unixio,path=/run/rig/tpm/sock.ctrl --flags not-need-init,startup-clear -d \
	|| rig_fail "swtpm did not start"
echo "rig: dom0 toolstack up after $(cut -d' ' -f1 /proc/uptime) s"
rig_run "xl info | grep -E '^(xen_version|nr_cpus|total_memory|free_memory|xen_caps)' && xl list" \
	|| rig_fail "xl info / xl list failed in dom0"
rig_run "tpm2_getrandom -T \$BMI_TPM_TCTI --hex 8 && echo ' (swtpm answers)'" || rig_fail "the dom0 swtpm does not answer"
rig_run "$RIG_TEST_CMD"
rig_result $?
