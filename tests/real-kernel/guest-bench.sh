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
printf 'manage = ["8086:10c9"]\n' > /tmp/daemon.toml
/tmp/vfio-managerd --config /tmp/daemon.toml --state-dir /tmp/state --audit-log /tmp/state/audit.log > /tmp/daemon.log 2>&1 &
for i in $(seq 1 100); do /tmp/vfctl leases > /dev/null 2>&1 && break; sleep 0.1; done
/tmp/bench-ops / 10 dbus || echo "GUEST-FAIL bench-ops dbus"
echo GUEST-DONE
