#!/bin/sh
# `run.sh --migrate` (`make bench-migrate`; not part of CI): QEMU's own figures for
# the live migration of the same nested QEMU/KVM VM without and with an mtty mdev
# (VFIO migration), to a second QEMU with -incoming over loopback TCP. The
# daemon's part (the destination reserved, the lease handed over) is tested in
# the test boot (guest-test.sh, vm_migration).
cp /mnt/host/bin/* /tmp/
. /mnt/host/guest-lib.sh
cd /tmp
cp -r /mnt/host/qemu /mnt/host/vmlinuz /mnt/host/nested-initramfs.cpio.gz /tmp/
T=/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2
U1=6f1a0000-0000-4000-8000-000000000001
U2=6f1a0000-0000-4000-8000-000000000002
echo $U1 > $T/create && echo $U2 > $T/create
# measure WHAT SOURCE-ARGS DESTINATION-ARGS
measure() {
    qmp_vm b $3 -incoming tcp:127.0.0.1:4444
    qmp_vm a $2
    for i in $(seq 1 120); do [ -n "$(scratch a)" ] && break; sleep 1; done
    result=$(migrate a)
    for i in $(seq 1 20); do [ -n "$(scratch b)" ] && break; sleep 0.5; done
    echo "migration of $1: $result${2:+; the destination's guest reads $(scratch b) from the device}"
    echo "$result" | grep -q '"status": "completed"' && pass "$1 live-migrated" || { fail "$1: $result"; tail -3 /tmp/a.log; }
    qmp a '{"execute":"quit"}'; qmp b '{"execute":"quit"}'
    sleep 2
}
measure "a VM without a device" "" ""
measure "a VM with an mtty mdev" "$(migratable_mdev $U1)" "$(migratable_mdev $U2)"
echo GUEST-DONE
