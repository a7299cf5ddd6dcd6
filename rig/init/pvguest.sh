#!/bin/sh
# /init of the tiny PV guest the Xen tests may boot ($BMI_XEN_GUEST_RAMDISK in
# dom0): say so on hvc0, power off when the toolstack asks (the kernel runs
# /sbin/poweroff; PID 1 is a plain shell, so power off directly), and keep
# onlining the vCPUs `xl vcpu-set` hot-adds (no udev here to do it).
# With /bin/xsclient in the ramdisk (tests/images/xsclient.c, added by the
# test that needs it) it also reports, from the guest's side, what it reads
# of its bmi home in xenstore and whether its writes there were refused,
# and with /lib/modules/xen-netfront.ko too it brings up eth0 (a vif) with
# the address of its /net/eth0/address config.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/hvc0 >/dev/hvc0 2>&1
. /etc/rig/env
printf '#!/bin/busybox sh\nexec /bin/busybox poweroff -f\n' >/sbin/poweroff
chmod 755 /sbin/poweroff
echo "$BMI_GUEST_MARKER pd=$(cat /proc/cmdline) cpus=$(grep -c ^processor /proc/cpuinfo)"
if [ -x /bin/xsclient ]; then
	echo "BMI-GUEST-XS-DEVICES $(ls /dev/xen 2>&1 | tr '\n' ' ')"
	for key in bmi/pd-id bmi/config/app/mode; do
		echo "BMI-GUEST-XS-READ $key=$(xsclient read $key 2>&1)"
	done
	for key in bmi/config/app/mode bmi/written-by-guest; do
		echo "BMI-GUEST-XS-WRITE $(xsclient write $key guest 2>&1 && echo "$key: accepted")"
	done
	echo "BMI-GUEST-XS-DONE"
fi
if [ -x /bin/xsclient ] && [ -f /lib/modules/xen-netfront.ko ]; then
	# a vif from bmi (tests/drivers/xen/test_network.py): its address from the PD's config in xenstore
	address=$(xsclient read bmi/config/net/eth0/address 2>&1)
	insmod /lib/modules/xen-netfront.ko
	n=0
	until [ -e /sys/class/net/eth0 ] || [ $n -ge 200 ]; do n=$((n + 1)); sleep 0.1; done
	if ip addr add "$address" dev eth0 && ip link set eth0 up; then
		echo "BMI-GUEST-NET-UP eth0 $address"
	else
		echo "BMI-GUEST-NET-FAILED eth0 $address"
	fi
fi
while :; do
	for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
		[ -f "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 >"$f" && echo "BMI-CPU-ONLINE $f"
	done
	sleep 0.5
done
