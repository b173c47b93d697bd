#!/bin/sh
# `make bench-real-kernel`: provisioning operations on the real kernel, the project
# beside the bare sysfs writes, in one process, one boot.
cp /mnt/host/bin/bench-ops /tmp/
/tmp/bench-ops / 10 || echo "GUEST-FAIL bench-ops"
echo GUEST-DONE
