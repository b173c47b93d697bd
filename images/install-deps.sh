#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian bookworm machine.
# Idempotent: packages already present are skipped by apt. Needs root.
set -euo pipefail

need_backports() {
    # QEMU >= 8 (the emulated igb device) comes from bookworm-backports. Reuse the
    # mirror the machine already uses for bookworm rather than naming one here.
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    local uri
    uri=$(grep -hs -m1 '^URIs:' /etc/apt/sources.list.d/debian.sources | awk '{print $2}')
    if [ -z "$uri" ]; then
        uri=$(grep -hs -m1 -E '^deb .* bookworm main' /etc/apt/sources.list | awk '{print $2}')
    fi
    [ -n "$uri" ] || { echo "install-deps: cannot find the bookworm apt mirror to add backports" >&2; exit 1; }
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    echo "install-deps: added bookworm-backports from $uri"
}

# dbus-daemon and busctl (systemd) for the daemon tests; promtool (prometheus) checks the metrics.
base_pkgs=(pkg-config libudev-dev kmod cpio busybox-static xz-utils zstd dbus dbus-daemon systemd prometheus openssl)
missing=()
for p in "${base_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null || return 1
    local v
    v=$(qemu-system-x86_64 --version | head -1 | sed -E 's/.*version ([0-9]+).*/\1/')
    [ "${v:-0}" -ge 8 ]
}

libvirt_ok() {
    command -v libvirtd >/dev/null && command -v virsh >/dev/null && command -v virt-xml-validate >/dev/null
}

if [ ${#missing[@]} -gt 0 ] || ! qemu_ok || ! libvirt_ok; then
    need_backports
    apt-get update -qq
    [ ${#missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    qemu_ok || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-system-x86
    # libvirt for the hook's tests: the daemon, its QEMU driver and virsh/virt-xml-validate.
    libvirt_ok || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
fi
echo "install-deps: ok ($(qemu-system-x86_64 --version | head -1))"
