# Shared by the rig's stage-2 init scripts (busybox sh, PID 1 in the host
# root after switch_root).  The host reads the last "BMI-RIG-RESULT <rc>"
# line on the console; every path out of an init ends in rig_result, so a
# missing marker means a hang or a crash.
export PATH=/run/rig/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /run/rig/env

rig_result() {
	echo "BMI-RIG-RESULT $1"
	sync
	poweroff -f
	sleep 5   # poweroff -f does not return; never let PID 1 exit (kernel panic)
}

rig_fail() {
	echo "rig: $*" >&2
	rig_result 254
}

# Run a shell command line in the checkout with a clean host environment,
# under the guest-side deadline; returns its exit status (143: timed out).
rig_run() {
	timeout "$RIG_TEST_TIMEOUT" /usr/bin/env -i \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
		$RIG_EXTRA_ENV /bin/sh -c "cd '$RIG_CHECKOUT' && $1"
}
