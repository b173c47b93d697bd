#!/usr/bin/env bash
# Builds the emulated GPU host from Debian packages only: the bookworm 6.12 kernel
# and the modules the tests need, a busybox initramfs, and (with --mtty) the mdev
# sample mtty.ko built against the matching headers. Up-to-date steps are skipped.
# The kernel version follows the linux-image-6.12-amd64 meta package, so a version
# that left the archive is replaced by the current one.
#
# Output (under build/images): vmlinuz, initramfs.cpio.gz, KVER, and mtty.ko.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/images
mkdir -p "$OUT/dl"
log() { echo "images: $*" >&2; }

kver() {
    apt-cache depends linux-image-6.12-amd64 2>/dev/null | grep -o 'linux-image-6\.12\.[0-9][^ ]*-amd64' | head -1 | sed 's/^linux-image-//'
}

KVER=$(kver)
if [ -z "$KVER" ]; then
    apt-get update -qq
    KVER=$(kver)
fi
[ -n "$KVER" ] || { log "cannot resolve linux-image-6.12-amd64 in apt"; exit 1; }
KROOT=$OUT/kernel-$KVER

fetch() { # package -> unpacks into $2
    local pkg=$1 dest=$2
    [ -e "$dest/.done-$pkg" ] && return
    log "fetching $pkg"
    (cd "$OUT/dl" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null)
    mkdir -p "$dest"
    dpkg -x "$OUT"/dl/"${pkg}"_*.deb "$dest"
    touch "$dest/.done-$pkg"
}

# 1. Kernel and modules.
fetch "linux-image-$KVER" "$KROOT"
if [ ! -e "$KROOT/lib/modules/$KVER/modules.dep" ] || [ ! -s "$KROOT/lib/modules/$KVER/modules.dep" ]; then
    depmod -b "$KROOT" "$KVER"
fi
cp -u "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "$KVER" > "$OUT/KVER"

# 2. mtty.ko (optional): the kernel's mdev sample with VFIO migration, built out of tree.
if [ "${1:-}" = "--mtty" ] && [ ! -e "$OUT/mtty-$KVER.ko" ]; then
    srcver=${KVER%%+*}                      # 6.12.117
    common=${KVER%-amd64}                   # 6.12.117+deb12
    fetch "linux-headers-$KVER" "$OUT/hdr"
    fetch "linux-headers-$common-common" "$OUT/hdr"
    fetch "linux-kbuild-6.12.${srcver##*.}+deb12" "$OUT/hdr" 2>/dev/null || fetch "linux-kbuild-6.12" "$OUT/hdr"
    fetch "linux-source-6.12" "$OUT/src"
    mkdir -p "$OUT/mtty"
    tar -xf "$OUT"/src/usr/src/linux-source-6.12.tar.xz -C "$OUT/mtty" --strip-components=1 --wildcards '*/samples/vfio-mdev/mtty.c'
    cp "$OUT/mtty/samples/vfio-mdev/mtty.c" "$OUT/mtty/"
    echo 'obj-m := mtty.o' > "$OUT/mtty/Makefile"
    hdr=$(realpath "$OUT/hdr/usr/src/linux-headers-$KVER")
    # Debian's arch headers include the common tree by its absolute /usr/src path.
    sed -i "s|^include /usr/src/|include $(realpath "$OUT/hdr/usr/src")/|" "$hdr/Makefile"
    make -s -C "$hdr" M="$(realpath "$OUT/mtty")" CC=gcc-12 CONFIG_DEBUG_INFO_BTF_MODULES= modules
    cp "$OUT/mtty/mtty.ko" "$OUT/mtty-$KVER.ko"
fi

# 3. Debian's mdevctl, the peer tool the mediated path is measured against, with the
#    libraries it links (the guest has no libc).
fetch mdevctl "$OUT/mdevctl"
if [ ! -e "$OUT/mdevctl/libs/.done" ]; then
    mkdir -p "$OUT/mdevctl/libs"
    ldd "$OUT/mdevctl/usr/bin/mdevctl" | grep -o '/[^ ]*' | xargs -I{} cp -L {} "$OUT/mdevctl/libs/"
    touch "$OUT/mdevctl/libs/.done"
fi

# 4. Initramfs: busybox, the modules (decompressed: busybox insmod cannot read .xz), init.
#    initramfs NAME INIT MODULES...: the emulated host's, and the nested VM's that
#    the host starts with a leased VF (kvm_amd: -cpu max under TCG offers AMD SVM).
initramfs() {
    local name=$1 init=$2 ir=$OUT/$1
    shift 2
    local stamp
    stamp="$KVER $* $(sha256sum "$init" images/build.sh | sha256sum | cut -c1-16)"
    [ "$(cat "$OUT/$name.stamp" 2>/dev/null)" = "$stamp" ] && return
    log "building $name for $KVER"
    rm -rf "$ir"
    mkdir -p "$ir"/{bin,sbin,proc,sys,dev,tmp,mnt/host,lib/modules,etc,root}
    cp /bin/busybox "$ir/bin/busybox"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$ir/bin/$a"; done
    : > "$ir/etc/modules.order"
    for m in "$@"; do
        modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '/^insmod/ {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        local base
        base=$(basename "$ko" .xz)
        xz -dc "$ko" > "$ir/lib/modules/$base"
        echo "$base" >> "$ir/etc/modules.order"
    done
    cp "$init" "$ir/init"
    chmod +x "$ir/init"
    (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/$name.cpio.gz"
    echo "$stamp" > "$OUT/$name.stamp"
}
# virtio_blk, ext4 and crc32c (a soft dependency modprobe does not name): the root
# filesystem of the libvirt run (images/rootfs.sh).
# vhost_vsock: the nested VM's agent speaks to the daemon over virtio-vsock.
# aer_inject: the kernel's own PCIe error injector (QEMU delivers no correctable error).
initramfs initramfs images/init vfio vfio_iommu_type1 vfio-pci mdev igb igbvf e1000e nvme 9p 9pnet_virtio kvm_amd \
    virtio_blk crc32c_generic ext4 vhost_vsock aer_inject
initramfs nested-initramfs images/nested-init igbvf vmw_vsock_virtio_transport
log "ready: kernel $KVER, $(du -h "$OUT/initramfs.cpio.gz" | cut -f1) initramfs"
