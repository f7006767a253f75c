#!/usr/bin/env bash
# Builds (or reuses) the VDUSE guest for the vhost-vdpa tests, in $SVQ_FIXTURES/vduse/:
#   vmlinuz        a bookworm-backports 6.12 kernel (Debian's 6.1 has CONFIG_VDPA unset; 6.12 has
#                  VDPA, VDPA_USER (VDUSE) and VHOST_VDPA as modules), unpacked with dpkg -x
#   modules/       vduse, vhost_vdpa and their dependencies (decompressed) + `order`
#   initramfs.gz   busybox-static, qemu-storage-daemon and vdpa (iproute2) with every library ldd
#                  names, the modules, and scripts/peers/vduse-guest/init.sh as /init
# The test harness (peers/src/vduse.rs) appends a second cpio archive with the test binaries and
# /svq/run.sh at run time, so a rebuilt svqd never needs a rebuilt fixture.
# Called by fixtures.sh; idempotent; SVQ_VDUSE_KPKG names the kernel package (default: the newest
# linux-image-6.12.*-amd64-unsigned in backports).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FIX="${SVQ_FIXTURES:-$HOME/.cache/svq-fixtures}"
VD="$FIX/vduse"
mkdir -p "$VD"
VD="$(cd "$VD" && pwd)"
. /etc/os-release
CODENAME="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
BPO="$CODENAME-backports"
T0=$(date +%s)
log() { echo "vduse[$(($(date +%s) - T0))s]: $*"; }
die() { echo "vduse: ERROR: $*" >&2; exit 1; }
APT="$VD/apt"
. "$HERE/apt-backports.sh"

# ---------------------------------------------------------------- kernel 6.12 + its modules
MODS=(vduse vhost_vdpa)
if [ ! -f "$VD/vmlinuz" ] || [ ! -s "$VD/modules/order" ]; then
	derive_backports_source
	log "apt-get update ($BPO, private lists)"
	apt-get "${APT_OPTS[@]}" -q update >/dev/null
	KPKG="${SVQ_VDUSE_KPKG:-$(apt-cache "${APT_OPTS[@]}" search --names-only '^linux-image-6\.12\..*-amd64-unsigned$' |
		awk '{print $1}' | grep -Ev -- '-(cloud|rt)-amd64' | sort -V | tail -1)}"
	[ -n "$KPKG" ] || die "no linux-image-6.12.*-amd64-unsigned in $BPO"
	log "downloading $KPKG"
	rm -rf "$VD/debs" "$VD/kroot" "$VD/modules" "$VD/vmlinuz"
	mkdir -p "$VD/debs" "$VD/kroot"
	(cd "$VD/debs" && apt-get "${APT_OPTS[@]}" -q download "$KPKG/$BPO")
	ls "$VD"/debs/*.deb >/dev/null 2>&1 || die "download of $KPKG failed"
	dpkg -x "$VD"/debs/*.deb "$VD/kroot"
	# The private lists name the mirror: keep none of them once the kernel is here.
	rm -rf "$APT" "$VD/debs"
	KR="$VD/kroot"
	KVER="$(basename "$(ls -d "$KR"/lib/modules/* | head -1)")"
	for o in CONFIG_VDPA CONFIG_VDPA_USER CONFIG_VHOST_VDPA; do
		grep -Eq "^$o=[ym]" "$KR/boot/config-$KVER" || die "$KVER: $o is not set"
	done
	# Only the modules the guest loads are kept (decompressed: busybox insmod), in modprobe's
	# dependency order; the rest of the package (hundreds of MB) is dropped.
	depmod -b "$KR" "$KVER"
	mkdir -p "$VD/modules.new"
	: >"$VD/modules.new/order"
	for m in "${MODS[@]}"; do
		modprobe -d "$KR" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'
	done | awk '!seen[$0]++' | while read -r ko; do
		b="$(basename "$ko")"
		case "$b" in
		*.ko.xz) xz -dc "$ko" >"$VD/modules.new/${b%.xz}"; b="${b%.xz}" ;;
		*.ko.zst) zstd -qdc "$ko" >"$VD/modules.new/${b%.zst}"; b="${b%.zst}" ;;
		*) cp "$ko" "$VD/modules.new/$b" ;;
		esac
		echo "$b" >>"$VD/modules.new/order"
	done
	for m in vduse vhost_vdpa; do
		grep -q "^$m.ko\$" "$VD/modules.new/order" || die "$m not in the module order"
	done
	echo "$KVER" >"$VD/modules.new/kver"
	cp "$KR/boot/vmlinuz-$KVER" "$VD/vmlinuz.new"
	rm -rf "$KR" "$VD/modules"
	mv "$VD/modules.new" "$VD/modules"
	mv "$VD/vmlinuz.new" "$VD/vmlinuz"
fi
KVER="$(cat "$VD/modules/kver")"
log "kernel $KVER, modules: $(tr '\n' ' ' <"$VD/modules/order")"

# ---------------------------------------------------------------- initramfs
QSD="$(command -v qemu-storage-daemon || true)"
VDPA="$(command -v vdpa || echo /usr/sbin/vdpa)"
[ -x "$QSD" ] || die "qemu-storage-daemon not found (package qemu-utils)"
[ -x "$VDPA" ] || die "vdpa not found (package iproute2)"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "no $BUSYBOX (package busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked: install busybox-static"; fi
INIT="$HERE/vduse-guest/init.sh"
STAMP="$( (cat "$INIT" "${BASH_SOURCE[0]}" "$VD/modules/order"; "$QSD" --version | head -1; "$VDPA" -V
	md5sum "$BUSYBOX") | md5sum | cut -c1-16)-$KVER"
if [ "$(cat "$VD/stamp" 2>/dev/null)" != "$STAMP" ] || [ ! -f "$VD/initramfs.gz" ]; then
	log "building the initramfs"
	R="$VD/root"
	rm -rf "$R"
	mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,modules,svq}
	cp "$BUSYBOX" "$R/bin/busybox"
	for a in $("$BUSYBOX" --list); do
		# `busybox --list` includes busybox itself: a self-symlink would loop.
		[ "$a" = busybox ] && continue
		ln -sf busybox "$R/bin/$a"
	done
	cp "$QSD" "$R/usr/bin/qemu-storage-daemon"
	cp "$VDPA" "$R/usr/sbin/vdpa"
	# Every library ldd names (and the loader), at its host path.
	for b in "$QSD" "$VDPA"; do
		ldd "$b" | awk '$2=="=>" && $3 ~ /^\//{print $3} $1 ~ /^\//{print $1}'
	done | sort -u | while read -r lib; do
		mkdir -p "$R$(dirname "$lib")"
		cp -L "$lib" "$R$lib"
	done
	cp "$VD"/modules/*.ko "$VD/modules/order" "$R/modules/"
	cp "$INIT" "$R/init"
	chmod +x "$R/init"
	(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1 >"$VD/initramfs.gz.new")
	rm -rf "$R"
	mv "$VD/initramfs.gz.new" "$VD/initramfs.gz"
	echo "$STAMP" >"$VD/stamp"
fi
log "ready: $VD/vmlinuz, $VD/initramfs.gz ($(du -h "$VD/initramfs.gz" | cut -f1))"
