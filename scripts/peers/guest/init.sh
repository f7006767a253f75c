#!/bin/sh
# Guest /init for the real-peer tests (busybox sh). The workload is chosen on the kernel command
# line with mode=...; the host harness reads the console (ttyS0) for lines starting with "SVQ-".
#   mode=blk-dirty  loop forever: O_DIRECT and page-cache reads of the known data region (the
#                   device writes guest RAM), a write + read-back of the scratch region; one
#                   "SVQ-ITER n ok" line per iteration, "SVQ-FAIL ..." on any mismatch
#   mode=verify     check the known data region once, print SVQ-VERIFY ok|FAIL, power off
#   mode=net        bring eth0 up and send ARP requests; print "SVQ-NET tx=.. rx=.." each second
#   mode=rng        read /dev/hwrng; "SVQ-RNG ok bytes=N" lines, then SVQ-DONE (stays up)
#   mode=vsock      run a vsock echo server on port 1234, print SVQ-VSOCK-READY
# Parameters: dmib=<MiB of known data at offset 0>, dmd5=<its md5>, smib=<scratch MiB after it>.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
# Load order matters (virtio_ring before virtio): modules/order is modprobe's dependency order.
while read -r m; do insmod "/modules/$m" 2>/dev/null; done </modules/order

MODE=shell DMIB=16 DMD5=none SMIB=4
for a in $(cat /proc/cmdline); do
	case "$a" in
	mode=*) MODE=${a#mode=} ;;
	dmib=*) DMIB=${a#dmib=} ;;
	dmd5=*) DMD5=${a#dmd5=} ;;
	smib=*) SMIB=${a#smib=} ;;
	esac
done
echo "SVQ-BOOT mode=$MODE uptime=$(cut -d' ' -f1 /proc/uptime)"

off() {
	sync
	poweroff -f
}

wait_dev() {
	i=0
	while [ ! -b "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	[ -b "$1" ] || { echo "SVQ-FAIL no $1"; off; }
}

case "$MODE" in
blk-dirty)
	wait_dev /dev/vda
	n=0
	while :; do
		n=$((n + 1))
		st=ok
		# O_DIRECT: the device DMAs straight into this process's fresh buffer pages.
		d=$(dd if=/dev/vda bs=256k count=$((DMIB * 4)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
		[ "$d" = "$DMD5" ] || { st=FAIL; echo "SVQ-FAIL iter=$n direct md5=$d want=$DMD5"; }
		# Page cache: dropped caches make the device fill recycled pages (init_on_alloc=0).
		echo 3 >/proc/sys/vm/drop_caches
		c=$(dd if=/dev/vda bs=1M count="$DMIB" 2>/dev/null | md5sum | cut -d' ' -f1)
		[ "$c" = "$DMD5" ] || { st=FAIL; echo "SVQ-FAIL iter=$n cached md5=$c want=$DMD5"; }
		# Scratch region: what was written must read back (across migrations too).
		if [ -f /tmp/w.md5 ]; then
			r=$(dd if=/dev/vda bs=1M skip="$DMIB" count="$SMIB" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
			[ "$r" = "$(cat /tmp/w.md5)" ] || { st=FAIL; echo "SVQ-FAIL iter=$n scratch md5=$r want=$(cat /tmp/w.md5)"; }
		fi
		dd if=/dev/urandom of=/tmp/w bs=1M count="$SMIB" 2>/dev/null
		dd if=/tmp/w of=/dev/vda bs=1M seek="$DMIB" oflag=direct conv=fsync 2>/dev/null
		md5sum </tmp/w | cut -d' ' -f1 >/tmp/w.md5
		echo "SVQ-ITER $n $st"
	done
	;;
verify)
	wait_dev /dev/vda
	d=$(dd if=/dev/vda bs=1M count="$DMIB" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
	if [ "$d" = "$DMD5" ]; then echo "SVQ-VERIFY ok"; else echo "SVQ-VERIFY FAIL md5=$d want=$DMD5"; fi
	off
	;;
net)
	i=0
	while [ ! -d /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	ip link set eth0 up
	ip addr add 10.0.2.15/24 dev eth0
	S=/sys/class/net/eth0/statistics
	# Receive load: testpmd reflects these echo requests to us (dropped by IP: not our address),
	# so the device keeps writing 1.2 KB frames into guest RAM, also during a migration.
	arp -i eth0 -s 10.0.2.2 02:00:00:00:00:02
	ping -q -i 0.002 -s 1200 10.0.2.2 >/dev/null 2>&1 &
	while :; do
		# testpmd (macswap) reflects every frame: each ARP request comes back as one rx packet.
		arping -q -c 4 -w 1 -I eth0 10.0.2.2 >/dev/null 2>&1
		echo "SVQ-NET tx=$(cat $S/tx_packets) rx=$(cat $S/rx_packets)"
	done
	;;
rng)
	i=0
	while [ ! -c /dev/hwrng ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	echo "SVQ-RNG current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
	for k in 1 2 3 4 5; do
		b=$(dd if=/dev/hwrng bs=64 count=16 2>/dev/null | wc -c)
		echo "SVQ-RNG ok bytes=$b"
	done
	echo "SVQ-DONE"
	# Stay up so the host can query svqd while the device is live; the host ends QEMU.
	while :; do sleep 1000; done
	;;
vsock)
	vsock-echo 1234 &
	sleep 0.5
	echo "SVQ-VSOCK-READY"
	wait
	;;
*)
	echo "SVQ-SHELL"
	exec sh
	;;
esac
