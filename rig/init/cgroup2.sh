# Stage 2 of the cgroup2 rig: a pure cgroup v2 host (cgroup_no_v1=all) with
# the cpu, cpuset, memory and pids controllers enabled for children of the
# root, then the Linux driver's resource, status and device tests.
. /run/rig/common.sh
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || rig_fail "cannot mount cgroup2"
echo "+cpu +cpuset +memory +pids" >/sys/fs/cgroup/cgroup.subtree_control \
	|| rig_fail "cannot enable cpu cpuset memory pids in the root's subtree_control"
echo "rig: cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
# what udev's rules make it on a Debian host (devtmpfs alone leaves 0600): the device tests'
# reopen attack then meets the PD's device program, not the node's mode
chmod 666 /dev/net/tun || rig_fail "no /dev/net/tun (the tun module)"
rig_run "$RIG_TEST_CMD"
rig_result $?
