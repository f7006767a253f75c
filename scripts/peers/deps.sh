#!/usr/bin/env bash
# Install the Debian packages the real-peer tests need, from the machine's own release.
#
# Never installs bookworm's qemu-system-x86: that would remove qemu-utils 10 (and with it
# qemu-storage-daemon 10). QEMU 10 itself is unpacked privately by fixtures.sh; this script only
# adds its shared libraries (passed as arguments by fixtures.sh) and the tools below.
# `--no-remove` makes apt abort instead of removing anything.
set -euo pipefail

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# busybox-static, kmod, cpio: guest initramfs. dpdk-dev: dpdk-testpmd (vhost-user-net peer).
# xz-utils/zstd: kernel modules may be compressed. gcc/libc6-dev: static guest helper programs.
# iproute2: the `vdpa` tool in the VDUSE guest.
PKGS=(busybox-static kmod cpio dpdk-dev xz-utils zstd gcc libc6-dev iproute2)
# Operations tests (crates/svqd/tests/ops.rs): virt-xml-validate (+ xmllint) for the libvirt XML,
# promtool for the metrics. systemd-analyze comes with systemd.
PKGS+=(libvirt-clients libxml2-utils prometheus)
PKGS+=("$@")

missing=()
for p in "${PKGS[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done

if [ "${#missing[@]}" -eq 0 ]; then
	echo "peers-deps: all ${#PKGS[@]} packages present"
	exit 0
fi

echo "peers-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be stale or missing on a fresh machine.
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends --no-remove "${missing[@]}"

# qemu-storage-daemon must still be QEMU 10 (the machine image ships qemu-utils 10 from backports).
if ! qemu-storage-daemon --version | head -1 | grep -q 'version 10\.'; then
	echo "peers-deps: qemu-storage-daemon is not version 10 any more:" >&2
	qemu-storage-daemon --version >&2 || true
	exit 1
fi
