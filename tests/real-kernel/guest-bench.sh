#!/bin/sh
# `make bench-real-kernel`: provisioning and mdev operations on the real kernel, the
# project beside the bare sysfs writes and beside Debian's mdevctl, in one boot.
# Binaries run from tmpfs (an exec over 9p costs ~0.9 s under TCG).
cp /mnt/host/bin/bench-ops /mnt/host/bin/vfctl /tmp/
cp -r /mnt/host/mdevctl /tmp/mdevctl
# mdevctl needs its script directories.
mkdir -p /etc/mdevctl.d/scripts.d/callouts /etc/mdevctl.d/scripts.d/notifiers
# The VF and mdev rows first, with nothing else running: the daemon re-reads sysfs
# on the uevents each bind and unbind raises, which would land
# inside the next timing.
/tmp/bench-ops / 10 vfs || echo "GUEST-FAIL bench-ops vfs"
/tmp/bench-ops / 10 mdev || echo "GUEST-FAIL bench-ops mdev"
# The daemon on a real dbus-daemon, for the D-Bus rows.
cp /mnt/host/bin/vfio-managerd /tmp/
. /mnt/host/guest-lib.sh
start_bus bus
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/bus/socket
printf 'manage = ["8086:10c9", "0000:04:00.0"]\n' > /tmp/daemon.toml
/tmp/vfio-managerd --config /tmp/daemon.toml --state-dir /tmp/state --audit-log /tmp/state/audit.log > /tmp/daemon.log 2>&1 &
for i in $(seq 1 100); do /tmp/vfctl leases > /dev/null 2>&1 && break; sleep 0.1; done
/tmp/bench-ops / 10 dbus || echo "GUEST-FAIL bench-ops dbus"
# PCIe errors: N non-fatal errors injected into the virtio-rng on virtio-pci (which
# has no error handler: each recovery fails). The kernel's recovery, from the error
# message to its verdict (dmesg), beside the daemon's reaction, from the uevent to the
# device held back (its log).
n=20
rng=0000:04:00.0
for i in $(seq 1 $n); do
    inject e$i "pcie_aer_inject_error rng0 0x4000" > /dev/null
    for t in $(seq 1 100); do [ "$(grep -c 'handled .* after its uevent' /tmp/daemon.log)" -ge "$i" ] && break; sleep 0.1; done
    /tmp/vfctl clear $rng > /dev/null 2>&1
done
pct() { sort -n | awk -v p=$1 '{v[NR] = $1} END {i = int(NR * p / 100 + 0.999); if (i < 1) i = 1; printf "%.1f", v[i]}'; }
dmesg | awk -v dev=$rng '{t = substr($0, 2, index($0, "]") - 2) + 0}
    $0 ~ ("error message received from " dev) {start = t}
    /device recovery failed/ && start {print (t - start) * 1000; start = 0}' > /tmp/kernel.ms
sed -n 's/.*handled \([0-9.]*\) ms after its uevent/\1/p' /tmp/daemon.log > /tmp/daemon.ms
k=$(wc -l < /tmp/kernel.ms); d=$(wc -l < /tmp/daemon.ms)
[ "$k" -gt 0 ] && [ "$d" -gt 0 ] || echo "GUEST-FAIL pcie errors: $k kernel recoveries, $d daemon reactions seen"
echo "pcie error  kernel recovery (error message to verdict): p50 $(pct 50 < /tmp/kernel.ms) ms, p99 $(pct 99 < /tmp/kernel.ms) ms (n=$k)"
echo "pcie error  daemon (uevent to held back):              p50 $(pct 50 < /tmp/daemon.ms) ms, p99 $(pct 99 < /tmp/daemon.ms) ms (n=$d)"
echo GUEST-DONE
