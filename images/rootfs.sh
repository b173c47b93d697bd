#!/usr/bin/env bash
# Builds the Debian root filesystem the emulated host mounts for the libvirt end-to-end
# test: bookworm minbase with libvirt and QEMU, packed into a raw ext4 image that
# QEMU attaches with snapshot=on (so it is never changed). About 90 s and 500 MB;
# skipped while the image matches this script.
#
# Output: build/images/rootfs.img
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/images
IMG=$OUT/rootfs.img
# dbus and libpam-systemd: without them apt's resolver picks default-dbus-system-bus
# and default-logind alternatives that debootstrap cannot install.
PKGS=libvirt-daemon-system,qemu-system-x86,dbus,libpam-systemd
stamp="$PKGS $(sha256sum images/rootfs.sh | cut -c1-16)"
log() { echo "rootfs: $*" >&2; }

[ -e "$IMG" ] && [ "$(cat "$IMG.stamp" 2>/dev/null)" = "$stamp" ] && { log "up to date"; exit 0; }

mirror() { # the bookworm mirror the machine already uses: no host is named here
    grep -hs -m1 -B3 -A3 -E '^Suites: bookworm( |$)' /etc/apt/sources.list.d/*.sources | awk '/^URIs:/ {print $2; exit}'
    grep -hs -m1 -E '^deb .* bookworm main' /etc/apt/sources.list | awk '{print $2}' || true
}
MIRROR=$(mirror | head -1)
[ -n "$MIRROR" ] || { log "cannot find the bookworm apt mirror in /etc/apt"; exit 1; }
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap

DIR=$OUT/rootfs
rm -rf "$DIR" "$IMG"
log "debootstrap bookworm ($PKGS) from $MIRROR"
debootstrap --variant=minbase --include="$PKGS" bookworm "$DIR" "$MIRROR" > "$OUT/rootfs.log" 2>&1 \
    || { tail -20 "$OUT/rootfs.log" >&2; exit 1; }
rm -rf "$DIR"/var/cache/apt/archives/*.deb "$DIR"/var/lib/apt/lists/*
# Room for what the test adds at run time (on the snapshot, never written back).
size=$(( $(du -sm "$DIR" | cut -f1) * 5 / 4 + 64 ))
mkfs.ext4 -q -F -L vfm-root -d "$DIR" "$IMG" "${size}M"
rm -rf "$DIR"
echo "$stamp" > "$IMG.stamp"
log "ready: $IMG (${size} MB)"
