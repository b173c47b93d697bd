#!/bin/sh
# `make bench-real-kernel`: provisioning and mdev operations on the real kernel, the
# project beside the bare sysfs writes and beside Debian's mdevctl, in one boot.
# Binaries run from tmpfs (an exec over 9p costs ~0.9 s under TCG).
cp /mnt/host/bin/bench-ops /mnt/host/bin/vfctl /tmp/
cp -r /mnt/host/mdevctl /tmp/mdevctl
# mdevctl needs its script directories.
mkdir -p /etc/mdevctl.d/scripts.d/callouts /etc/mdevctl.d/scripts.d/notifiers
/tmp/bench-ops / 10 || echo "GUEST-FAIL bench-ops"
echo GUEST-DONE
