#!/bin/sh
# `run.sh --migrate` (not in CI; an experiment for issue 28): a nested QEMU/KVM VM
# holding an mtty mdev (vfio-pci sysfsdev, migration on) is asked to migrate to a
# second QEMU (-incoming) on the same host, through QMP on pipes (the emulated host
# has no QMP client). The nested guest binds no driver to the mtty port (8250_pci's
# init is skipped): it writes the UART's scratch register through the I/O BAR and
# reads it back each second, before and after the migration (images/nested-init,
# scratch=HH). docs/kernel.md ("open") says what an earlier try saw: with the
# serial driver driving the port through INTx, the source never answered its
# (HMP) monitor.
cp /mnt/host/bin/* /tmp/
. /mnt/host/guest-lib.sh
cd /tmp
# A monitor whose QEMU exited must not kill the script on its next write.
trap '' PIPE
cp -r /mnt/host/qemu /mnt/host/vmlinuz /mnt/host/nested-initramfs.cpio.gz /tmp/
T=/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2
U1=6f1a0000-0000-4000-8000-000000000001
U2=6f1a0000-0000-4000-8000-000000000002
echo $U1 > $T/create && echo $U2 > $T/create && echo "GUEST-INFO mdevs $(ls /sys/bus/mdev/devices | tr '\n' ' ')"
Q="/tmp/qemu/lib/ld-linux-x86-64.so.2 --library-path /tmp/qemu/lib /tmp/qemu/qemu-system-x86_64 -L /tmp/qemu/share -machine q35 -m 256M -smp 1 -nodefaults -display none -no-reboot -kernel /tmp/vmlinuz -initrd /tmp/nested-initramfs.cpio.gz"
qmp() { echo "$2" >&$1; }
# vm NAME ACCEL DEVICE-ARGS...: QEMU with QMP on the pipes /tmp/monNAME.{in,out},
# its guest writing the mtty port's scratch register when it has one.
vm() {
    n=$1 accel=$2; shift 2
    rm -f /tmp/mon$n.in /tmp/mon$n.out /tmp/$n.console; mkfifo /tmp/mon$n.in /tmp/mon$n.out
    $Q -accel $accel $([ $accel = kvm ] && echo -cpu host) \
        -append "console=ttyS0 panic=-1 quiet initcall_blacklist=serial_pci_driver_init scratch=a5" -serial file:/tmp/$n.console \
        -chardev pipe,id=mon0,path=/tmp/mon$n -mon chardev=mon0,mode=control "$@" > /tmp/$n.log 2>&1 &
}
# try WHAT ACCEL SRC-ARGS DST-ARGS: boots a source and an incoming destination,
# migrates the running source over loopback TCP through QMP, and reports.
try() {
    what=$1 accel=$2
    vm b $accel $4 -incoming tcp:127.0.0.1:4444
    vm a $accel $3
    exec 3> /tmp/mona.in 4> /tmp/monb.in
    cat /tmp/mona.out > /tmp/mona.log & cat /tmp/monb.out > /tmp/monb.log &
    for i in $(seq 1 240); do grep -q 'NESTED-\(SCRATCH\|DONE\)' /tmp/a.console 2>/dev/null && break; sleep 1; done
    echo "GUEST-INFO $what: source guest: $(grep -E 'NESTED-SCRATCH' /tmp/a.console | head -1) qemu a: $(grep -v UNMASK /tmp/a.log | tr '\n' ' ' | cut -c1-300)"
    for fd in 3 4; do qmp $fd '{"execute":"qmp_capabilities"}'; done
    qmp 3 '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4444"}}'
    t0=$(cut -d' ' -f1 /proc/uptime)
    for i in $(seq 1 120); do
        qmp 3 '{"execute":"query-migrate"}'
        sleep 1
        grep -q '"status": "\(completed\|failed\|cancelled\)"' /tmp/mona.log && break
    done
    echo "GUEST-INFO $what: after $(awk -v t=$t0 '{printf "%.1f s", $1 - t}' /proc/uptime): $(grep -o '"status": "[a-z-]*"\|"error-desc": "[^"]*"\|"downtime": [0-9]*\|"total-time": [0-9]*\|"transferred": [0-9]*' /tmp/mona.log | tail -5 | tr '\n' ' ')"
    sleep 5
    echo "GUEST-INFO $what: destination console: $(grep NESTED-SCRATCH /tmp/b.console 2>/dev/null | tail -2 | tr '\n' ' ')"
    grep -q '"status": "completed"' /tmp/mona.log && pass "$what: live-migrated to a second QEMU" || fail "$what: migration"
    qmp 4 '{"execute":"quit"}'; qmp 3 '{"execute":"quit"}'
    exec 3>&- 4>&-
    sleep 2
}
try "a plain VM (KVM)" kvm "" ""
T="-trace vfio_migration* -trace vfio_save* -trace vfio_*dirty* -trace vfio_mig* -trace vfio_listener_log*"
try "a VM with an mtty mdev (KVM)" kvm "-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/$U1,enable-migration=on,x-device-dirty-page-tracking=off $T" "-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/$U2,enable-migration=on,x-device-dirty-page-tracking=off"
grep -v UNMASK /tmp/a.log | tail -25 | sed 's/^/GUEST-INFO trace: /' 
grep -q "NESTED-SCRATCH a5" /tmp/b.console 2>/dev/null && pass "the scratch register the guest wrote reads a5 after the migration" \
    || fail "the scratch register after the migration"
[ -n "$MIGRATE_TCG" ] && try "a VM with an mtty mdev (TCG)" tcg "-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/$U1,enable-migration=on" "-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/$U2,enable-migration=on"
dmesg | grep -iE 'mtty|vfio' | tail -6 | sed 's/^/GUEST-INFO dmesg: /'
echo GUEST-DONE
