#!/usr/bin/env bash
# Builds the Debian root filesystem the emulated host mounts for the libvirt end-to-end
# test: bookworm minbase with libvirt and QEMU from bookworm-backports (libvirt 11,
# QEMU 10: bookworm's QEMU 7.2 speaks only the VFIO migration protocol v1, which the
# kernel replaced with v2 in 5.18, so its domains cannot migrate with an mdev),
# packed into a raw ext4 image that QEMU attaches with snapshot=on (so it is never
# changed). About a minute and 620 MB; skipped while the image matches this script.
#
# Output: build/images/rootfs.img
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/images
IMG=$OUT/rootfs.img
# dbus and libpam-systemd: without them apt's resolver picks default-dbus-system-bus
# and default-logind alternatives that debootstrap cannot install.
PKGS=dbus,libpam-systemd
BACKPORTS="libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86"
stamp="$PKGS $BACKPORTS $(sha256sum images/rootfs.sh | cut -c1-16)"
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
log "from bookworm-backports: $BACKPORTS"
echo "deb $MIRROR bookworm-backports main" > "$DIR/etc/apt/sources.list.d/backports.list"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$DIR/usr/sbin/policy-rc.d" && chmod +x "$DIR/usr/sbin/policy-rc.d"
mount -t proc proc "$DIR/proc"
trap 'umount "$DIR/proc" 2>/dev/null || true' EXIT
{ chroot "$DIR" apt-get update \
    && chroot "$DIR" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -t bookworm-backports $BACKPORTS; } >> "$OUT/rootfs.log" 2>&1 \
    || { tail -20 "$OUT/rootfs.log" >&2; exit 1; }
umount "$DIR/proc"
rm -f "$DIR/usr/sbin/policy-rc.d"
rm -rf "$DIR"/var/cache/apt/archives/*.deb "$DIR"/var/lib/apt/lists/*
# Room for what the test adds at run time (on the snapshot, never written back).
size=$(( $(du -sm "$DIR" | cut -f1) * 5 / 4 + 64 ))
mkfs.ext4 -q -F -L vfm-root -d "$DIR" "$IMG" "${size}M"
rm -rf "$DIR"
echo "$stamp" > "$IMG.stamp"
log "ready: $IMG (${size} MB)"
