#!/bin/sh
# Guest /init (busybox sh) of the VDUSE guest: loads vduse + vhost_vdpa, serves one raw image in
# tmpfs through qemu-storage-daemon's VDUSE blk export(s), binds every VDUSE device to vhost_vdpa,
# then runs the test script the host appended to the initramfs (/svq/run.sh) and powers off.
# Lines for the host harness start with "SVQ-". Kernel command line parameters:
#   svq.disks=N      VDUSE blk devices, all exporting the same image (default 1)
#   svq.disk_mib=M   image size (default 64)
#   svq.qsize=Q      queue size of every device (default 256)
# /svq/run.sh gets SVQ_VDPA_DEVS (space-separated /dev/vhost-vdpa-N, in device order), SVQ_DISK
# (the image) and SVQ_QSD_LOG.
export PATH=/svq:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /run && mount -t tmpfs run /run
echo "SVQ-VDUSE-BOOT kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) uptime=$(cut -d' ' -f1 /proc/uptime)"

QSD=""
off() {
	[ -n "$QSD" ] && kill "$QSD" 2>/dev/null
	echo "SVQ-VDUSE-END uptime=$(cut -d' ' -f1 /proc/uptime)"
	sync
	poweroff -f
}
fail() {
	echo "SVQ-FAIL vduse-guest: $*"
	[ -f /run/qsd.log ] && { echo "--- qemu-storage-daemon log"; cat /run/qsd.log; }
	echo "--- dmesg tail"
	dmesg | tail -n 30
	off
}

DISKS=1 DISK_MIB=64 QSIZE=256
for a in $(cat /proc/cmdline); do
	case "$a" in
	svq.disks=*) DISKS=${a#svq.disks=} ;;
	svq.disk_mib=*) DISK_MIB=${a#svq.disk_mib=} ;;
	svq.qsize=*) QSIZE=${a#svq.qsize=} ;;
	esac
done

while read -r m; do
	insmod "/modules/$m" || fail "insmod $m"
done </modules/order
[ -c /dev/vduse/control ] || fail "no /dev/vduse/control after loading $(tr '\n' ' ' </modules/order)"

# A sparse raw image in tmpfs; every export serves it (as shared storage for a migration).
dd if=/dev/zero of=/run/disk.img bs=1M count=0 seek="$DISK_MIB" 2>/dev/null || fail "image"
set --
i=0
while [ $i -lt "$DISKS" ]; do
	# serial: 20 bytes or more, so GET_ID fills the whole 20-byte id field.
	set -- "$@" --export "type=vduse-blk,id=exp$i,node-name=disk0,name=vduse$i,num-queues=1,queue-size=$QSIZE,writable=on,serial=svq-vduse-blk-serial-$i"
	i=$((i + 1))
done
qemu-storage-daemon --blockdev "driver=file,filename=/run/disk.img,node-name=disk0" "$@" >/run/qsd.log 2>&1 &
QSD=$!

DEVS=""
i=0
while [ $i -lt "$DISKS" ]; do
	n=0
	while [ ! -c "/dev/vduse/vduse$i" ] && [ $n -lt 300 ]; do
		kill -0 "$QSD" 2>/dev/null || fail "qemu-storage-daemon exited"
		sleep 0.1
		n=$((n + 1))
	done
	[ -c "/dev/vduse/vduse$i" ] || fail "no /dev/vduse/vduse$i"
	vdpa dev add name "vduse$i" mgmtdev vduse || fail "vdpa dev add vduse$i"
	d=/sys/bus/vdpa/devices/vduse$i
	drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
	[ "$drv" = vhost_vdpa ] || fail "vduse$i bound to '${drv:-nothing}', not vhost_vdpa"
	vd=$(basename "$(ls -d "$d"/vhost-vdpa-* 2>/dev/null | head -1)")
	n=0
	while [ ! -c "/dev/$vd" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
	[ -n "$vd" ] && [ -c "/dev/$vd" ] || fail "no vhost-vdpa char device for vduse$i"
	DEVS="$DEVS /dev/$vd"
	i=$((i + 1))
done
DEVS=${DEVS# }
echo "SVQ-VDUSE-READY devs=$DEVS uptime=$(cut -d' ' -f1 /proc/uptime)"

if [ -x /svq/run.sh ]; then
	SVQ_VDPA_DEVS="$DEVS" SVQ_DISK=/run/disk.img SVQ_QSD_LOG=/run/qsd.log /svq/run.sh
	echo "SVQ-VDUSE-RUN rc=$?"
else
	echo "SVQ-FAIL vduse-guest: no /svq/run.sh in the initramfs"
fi
if [ -s /run/qsd.log ]; then
	echo "--- qemu-storage-daemon log"
	cat /run/qsd.log
fi
dmesg | grep -iE 'vduse|vdpa|vhost' | tail -n 20 | sed 's/^/SVQ-DMESG /'
off
