#!/usr/bin/env bash
# A walk-through of vfctl on a fake host tree (no privileges, no QEMU): first
# directly on the host, then through the daemon on a bus of its own, where an mdev
# leased to a running VM changes hands in a live migration (its VMMs stood in for).
set -euo pipefail
V=${VFCTL:-target/release/vfctl}
D=${VFIO_MANAGERD:-$(dirname "$V")/vfio-managerd}
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"' EXIT
step() { printf '\n\033[1m$ vfctl %s\033[0m\n' "$*"; "$V" --direct --fake-kernel --root "$dir/host" --config "$dir/config.toml" "$@" || echo "(exit $?)"; }
say() { printf '\n\033[36m# %s\033[0m\n' "$*"; }
printf 'manage = ["8086:10c9", "1b36:0010"]\n' > "$dir/config.toml"
"$V" fake-host "$dir/host" --layout demo
step check
step list
step enable 0000:3b:00.0
step bind 0000:3b:00.4
step bind 0000:3b:00.0
step bind 0000:3b:00.0 --whole-group
step unbind 0000:3b:00.0 --whole-group
step enable 0000:01:00.0 --vfs 9
step list --output json

command -v dbus-daemon > /dev/null || { say "no dbus-daemon here (Debian package dbus-daemon): the daemon's part is left out"; exit 0; }
say "The daemon, on a fake host with the mdev sample mtty and a D-Bus bus of its own"
"$V" fake-host "$dir/mhost" --layout emulated > /dev/null
cat > "$dir/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path=$dir/bus</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_type="method_call"/>
<allow receive_type="method_return"/><allow receive_type="error"/><allow receive_type="signal"/></policy></busconfig>
CONF
dbus-daemon --config-file="$dir/bus.conf" --nofork --nopidfile 2> /dev/null & pids+=($!)
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$dir/bus
: > "$dir/daemon.toml"
"$D" --fake-kernel --root "$dir/mhost" --config "$dir/daemon.toml" --state-dir "$dir/state" \
    --audit-log "$dir/audit.log" --no-uevents > "$dir/daemon.log" 2>&1 & pids+=($!)
for i in $(seq 1 100); do "$V" leases > /dev/null 2>&1 && break; sleep 0.1; done
run() { printf '\n\033[1m$ vfctl %s\033[0m\n' "$*"; "$V" "$@" || echo "(exit $?)"; }
# vmm PID UUID: process PID holds mdev UUID's VFIO group open, as QEMU does (in
# the fake kernel's /proc); `vmm PID` alone: it quits.
vmm() {
    rm -rf "$dir/mhost/proc/$1"
    [ $# = 2 ] || return 0
    g=$(basename "$(readlink "$dir/mhost/sys/bus/mdev/devices/$2/iommu_group")")
    mkdir -p "$dir/mhost/proc/$1/fd" && echo qemu-system-x86 > "$dir/mhost/proc/$1/comm"
    ln -s "/dev/vfio/$g" "$dir/mhost/proc/$1/fd/20"
}
run provision --vm web1 --profile mtty-2 --request-id web1 --format libvirt
lease=$("$V" leases | awk '/for VM web1/ {print $2; exit}')
src=$("$V" leases | sed -n "/^lease $lease /,\$p" | grep -v '^lease' | grep -o '[0-9a-f]\{8\}-[0-9a-f-]\{27\}' | head -1)
say "VM web1 starts in a VMM (pid 4100) that holds the mdev open"
vmm 4100 "$src"
run migrate plan --vm web1
say "Live migration to a second VMM on this host: the destination's mdev first, checked against the source's"
printf '\n\033[1m$ vfctl migrate prepare-vm --lease %s\033[0m\n' "$lease"
dst=$("$V" migrate prepare-vm --lease "$lease") && echo "$dst"
run migrate plan --vm web1
run migrate commit --lease "$lease"
say "The destination VMM (pid 4101) runs the VM; the source's quits once QEMU's migration completed"
vmm 4101 "$dst"
vmm 4100
run migrate commit --lease "$lease"
run leases
run swaps "$lease"
