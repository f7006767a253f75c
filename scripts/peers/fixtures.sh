#!/usr/bin/env bash
# Build (or reuse) every fixture the real-peer tests need, outside the repository:
#   $SVQ_FIXTURES (default ~/.cache/svq-fixtures)/
#     qemu/       QEMU 10 from <codename>-backports, unpacked with dpkg -x (never installed)
#     kroot/      a Debian kernel package unpacked with dpkg -x
#     guest/      vmlinuz + initramfs.gz (busybox-static, virtio modules, /init workloads)
#     cargo/bin/  vhost-device-rng, vhost-device-vsock (cargo install --locked)
#     vduse/      a 6.12 kernel (VDUSE, vhost-vdpa) + initramfs for the vDPA tests (vduse.sh)
#     env         shell fragment with the paths (sourced by scripts, read by the Rust harness)
# Idempotent: each step is skipped when its output is already there. Safe to re-run.
# Options (env): SVQ_PEERS_NO_CARGO=1 skips the cargo-installed backends, SVQ_PEERS_NO_VDUSE=1 the
# VDUSE guest.
# With --print-env, all progress goes to stderr and stdout carries only `export VAR=value` lines
# for the test suite (eval "$(scripts/peers/fixtures.sh --print-env)").
set -euo pipefail
PRINT_ENV=0
if [ "${1:-}" = "--print-env" ]; then
	PRINT_ENV=1
	exec 3>&1 1>&2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FIX="${SVQ_FIXTURES:-$HOME/.cache/svq-fixtures}"
mkdir -p "$FIX"
FIX="$(cd "$FIX" && pwd)"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
. /etc/os-release
CODENAME="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
BPO="$CODENAME-backports"
T0=$(date +%s)
# The tests hold this lock while they run: never rebuild fixtures under a running test.
exec 9>"$FIX/.peers.lock"
flock 9
log() { echo "fixtures[$(($(date +%s) - T0))s]: $*"; }
die() { echo "fixtures: ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- private apt config (backports)
# A private apt directory with its own sources, lists and cache: the system's apt state is not
# touched. The backports source is derived from the machine's own first Debian source.
APT="$FIX/apt"
. "$HERE/apt-backports.sh"

# ---------------------------------------------------------------- QEMU 10 (dpkg -x)
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
QROOT="$FIX/qemu"
QEMU_BIN="$QROOT/usr/bin/qemu-system-x86_64"
if [ ! -x "$QEMU_BIN" ] || [ ! -f "$FIX/qemu.deps" ]; then
	log "downloading QEMU from $BPO"
	derive_backports_source
	apt-get "${APT_OPTS[@]}" -q update >/dev/null
	rm -rf "$APT/debs" "$QROOT"
	mkdir -p "$APT/debs" "$QROOT"
	(cd "$APT/debs" && apt-get "${APT_OPTS[@]}" -q download "${QEMU_PKGS[@]/%//$BPO}")
	for d in "$APT/debs"/*.deb; do dpkg -x "$d" "$QROOT"; done
	# Shared libraries QEMU needs, from the machine's own release: Depends minus qemu/firmware.
	{
		for d in "$APT"/debs/qemu-system-x86_*.deb "$APT"/debs/qemu-system-common_*.deb; do
			dpkg-deb -f "$d" Depends
		done
	} | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//; s/[[:space:]]//g' | grep -v '^$' |
		grep -Ev '^(qemu-|seabios|ipxe-qemu)' | sort -u >"$FIX/qemu.deps"
fi

# ---------------------------------------------------------------- Debian packages
log "checking Debian packages"
# shellcheck disable=SC2046
bash "$HERE/deps.sh" $(cat "$FIX/qemu.deps")

export QEMU_MODULE_DIR="$QROOT/usr/lib/x86_64-linux-gnu/qemu"
if ldd "$QEMU_BIN" | grep 'not found'; then
	die "QEMU 10 misses shared libraries (listed above)"
fi
"$QEMU_BIN" -L "$QROOT/usr/share/qemu" -L "$QROOT/usr/share/seabios" --version | head -1 | grep -q 'version 10\.' ||
	die "unpacked QEMU is not version 10"

# ---------------------------------------------------------------- kernel (dpkg -x)
KROOT="$FIX/kroot"
if ! ls "$KROOT"/boot/vmlinuz-* >/dev/null 2>&1; then
	log "downloading the kernel"
	KPKG="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
	[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64"
	rm -rf "$FIX/kdeb" "$KROOT"
	mkdir -p "$FIX/kdeb" "$KROOT"
	(cd "$FIX/kdeb" && apt-get -q download "$KPKG")
	dpkg -x "$FIX"/kdeb/*.deb "$KROOT"
	rm -rf "$FIX/kdeb"
fi
KVER="$(basename "$(ls -d "$KROOT"/lib/modules/* | head -1)")"

# ---------------------------------------------------------------- guest initramfs
GUEST="$FIX/guest"
INIT_SRC="$HERE/guest/init.sh"
VSOCK_SRC="$HERE/guest/vsock-echo.c"
MODS=(virtio_pci virtio_blk virtio_net virtio_rng vmw_vsock_virtio_transport virtio_console)
STAMP="$( (cat "$INIT_SRC" "$VSOCK_SRC"; echo "${MODS[*]}") | md5sum | cut -c1-16)-$KVER"
if [ "$(cat "$GUEST/stamp" 2>/dev/null)" != "$STAMP" ]; then
	log "building the initramfs"
	NEW="$GUEST.new"
	rm -rf "$NEW"
	mkdir -p "$NEW/root"/{bin,sbin,dev,proc,sys,tmp,mnt,modules}
	R="$NEW/root"
	cp /bin/busybox "$R/bin/busybox"
	for a in $(/bin/busybox --list); do
		# `busybox --list` includes busybox itself: a self-symlink would loop (error -40).
		[ "$a" = busybox ] && continue
		ln -sf busybox "$R/bin/$a"
	done
	depmod -b "$KROOT" "$KVER"
	: >"$R/modules/order"
	for m in "${MODS[@]}"; do
		modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'
	done | awk '!seen[$0]++' | while read -r ko; do
		b="$(basename "$ko")"
		case "$b" in
		*.ko.xz) xz -dc "$ko" >"$R/modules/${b%.xz}"; b="${b%.xz}" ;;
		*.ko.zst) zstd -qdc "$ko" >"$R/modules/${b%.zst}"; b="${b%.zst}" ;;
		*) cp "$ko" "$R/modules/$b" ;;
		esac
		echo "$b" >>"$R/modules/order"
	done
	grep -q '^virtio_ring.ko$' "$R/modules/order" || die "virtio_ring not in module order"
	gcc -static -O2 -o "$R/bin/vsock-echo" "$VSOCK_SRC"
	cp "$INIT_SRC" "$R/init"
	chmod +x "$R/init"
	(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1 >"$NEW/initramfs.gz")
	cp "$KROOT/boot/vmlinuz-$KVER" "$NEW/vmlinuz"
	echo "$STAMP" >"$NEW/stamp"
	rm -rf "$GUEST"
	mv "$NEW" "$GUEST"
fi

# ---------------------------------------------------------------- vhost-device-* backends
CROOT="$FIX/cargo"
if [ "${SVQ_PEERS_NO_CARGO:-0}" != 1 ]; then
	for c in vhost-device-rng vhost-device-vsock; do
		if [ ! -x "$CROOT/bin/$c" ]; then
			log "cargo install $c"
			CARGO_TARGET_DIR="$FIX/cargo-target" cargo install -q --locked --root "$CROOT" "$c"
		fi
	done
	rm -rf "$FIX/cargo-target"
fi

# ---------------------------------------------------------------- VDUSE guest (vhost-vdpa tests)
# A bookworm-backports 6.12 kernel with VDUSE + vhost-vdpa and an initramfs with qemu-storage-daemon
# and the vdpa tool. Optional: without it the VDUSE tests skip and say why.
VDUSE_KERNEL="" VDUSE_INITRD=""
if [ "${SVQ_PEERS_NO_VDUSE:-0}" != 1 ]; then
	if SVQ_FIXTURES="$FIX" bash "$HERE/vduse.sh"; then
		VDUSE_KERNEL="$FIX/vduse/vmlinuz"
		VDUSE_INITRD="$FIX/vduse/initramfs.gz"
	else
		log "WARNING: the VDUSE fixture could not be built (see above); the VDUSE tests will skip"
	fi
fi

# ---------------------------------------------------------------- env file
cat >"$FIX/env" <<EOF
SVQ_QEMU=$QEMU_BIN
SVQ_QEMU_DATA=$QROOT/usr/share/qemu
SVQ_QEMU_BIOS=$QROOT/usr/share/seabios
QEMU_MODULE_DIR=$QEMU_MODULE_DIR
SVQ_KERNEL=$GUEST/vmlinuz
SVQ_INITRD=$GUEST/initramfs.gz
SVQ_QSD=$(command -v qemu-storage-daemon)
SVQ_TESTPMD=$(command -v dpdk-testpmd || true)
SVQ_VHOST_RNG=$([ -x "$CROOT/bin/vhost-device-rng" ] && echo "$CROOT/bin/vhost-device-rng")
SVQ_VHOST_VSOCK=$([ -x "$CROOT/bin/vhost-device-vsock" ] && echo "$CROOT/bin/vhost-device-vsock")
SVQ_VDUSE_KERNEL=$VDUSE_KERNEL
SVQ_VDUSE_INITRD=$VDUSE_INITRD
EOF
log "ready in $FIX"
if [ "$PRINT_ENV" = 1 ]; then
	echo "export SVQ_FIXTURES=$(printf %q "$FIX")" >&3
fi
