#!/bin/sh
# /init of every rig initramfs: load the modules, mount the host root (9p,
# read-only) under a tmpfs overlay so the guest can write anywhere without
# touching the host, and switch_root into it.  switch_root rather than
# chroot: a chrooted process may not create user namespaces (EPERM), and
# the PDs under test need them.  Stage 2 ($RIG_STAGE2) runs as PID 1 there.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
. /etc/rig/env
fail() { echo "rig: $*"; echo "BMI-RIG-RESULT 254"; poweroff -f; sleep 5; }
echo "rig: kernel up after $(cut -d' ' -f1 /proc/uptime) s"
for m in $(cat /etc/rig/modules); do
	insmod "/lib/modules/$m" || fail "insmod $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
	|| fail "cannot mount the host root (9p)"
mount -t tmpfs -o mode=0755 rw /run
mkdir -p /run/upper /run/work
mount -t overlay -o lowerdir=/host,upperdir=/run/upper,workdir=/run/work overlay /newroot \
	|| fail "cannot mount the overlay over the host root"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
for d in /tmp /run /var/tmp /dev/shm; do
	mount -t tmpfs -o mode=1777 tmpfs "/newroot$d"
done
# A checkout under one of those (CI clones anywhere, /tmp included) would be
# hidden by its tmpfs: lay its own overlay of the host's copy over it again.
case "$RIG_CHECKOUT/" in
/tmp/*|/run/*|/var/tmp/*|/dev/shm/*)
	mkdir -p "/newroot$RIG_CHECKOUT" /run/checkout/upper /run/checkout/work
	mount -t overlay -o "lowerdir=/host$RIG_CHECKOUT,upperdir=/run/checkout/upper,workdir=/run/checkout/work" \
		overlay "/newroot$RIG_CHECKOUT" || fail "cannot mount the checkout $RIG_CHECKOUT"
	;;
esac
mkdir -p /newroot/run/rig/bin
cp /bin/busybox /etc/rig/* /newroot/run/rig/
exec switch_root /newroot /run/rig/busybox sh -c \
	"/run/rig/busybox --install -s /run/rig/bin && exec /run/rig/busybox sh /run/rig/$RIG_STAGE2"
