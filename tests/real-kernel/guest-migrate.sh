#!/bin/sh
# `run.sh --migrate` (not in CI; an experiment for issue 28, which FAILS today): a
# nested QEMU/KVM VM holding an mtty mdev (vfio-pci sysfsdev, migration on) is asked
# to migrate to a second QEMU (-incoming) on the same host, through their monitors
# (HMP over pipes: the emulated host has no QMP client). Seen so far (docs/kernel.md,
# "open"): the destination answers its monitor (paused, inmigrate); the source, whose
# guest drives the mtty port through INTx, never answers its monitor, even before
# the migration is asked for.
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
Q="/tmp/qemu/lib/ld-linux-x86-64.so.2 --library-path /tmp/qemu/lib /tmp/qemu/qemu-system-x86_64 -L /tmp/qemu/share -machine q35 -accel kvm -cpu host -m 256M -smp 1 -nodefaults -display none -no-reboot -kernel /tmp/vmlinuz -initrd /tmp/nested-initramfs.cpio.gz"
for m in a b; do mkfifo /tmp/mon$m.in /tmp/mon$m.out; done
# vm NAME UUID EXTRA...: QEMU with its monitor on /tmp/monNAME.{in,out}.
vm() {
    n=$1 u=$2; shift 2
    $Q -append "console=ttyS0 panic=-1 quiet want=none wait=90" -serial file:/tmp/$n.console \
        -chardev pipe,id=mon0,path=/tmp/mon$n -mon chardev=mon0,mode=readline \
        -device vfio-pci,sysfsdev=/sys/bus/mdev/devices/$u,enable-migration=on "$@" > /tmp/$n.log 2>&1 &
}
vm b $U2 -incoming tcp:127.0.0.1:4444
vm a $U1
exec 3> /tmp/mona.in 4> /tmp/monb.in
cat /tmp/mona.out > /tmp/mona.log & cat /tmp/monb.out > /tmp/monb.log &
for i in $(seq 1 120); do grep -q NESTED-PCI /tmp/a.console 2>/dev/null && break; sleep 1; done
echo "GUEST-INFO source guest: $(grep NESTED-PCI /tmp/a.console | tr '\n' ' ')"
echo "GUEST-INFO qemu a: $(cat /tmp/a.log | tr '\n' ' ')"
echo "GUEST-INFO qemu b: $(cat /tmp/b.log | tr '\n' ' ')"
echo "info status" >&3; echo "info status" >&4
sleep 2
echo "GUEST-INFO monitors before: a: $(tr '\n' ' ' < /tmp/mona.log) b: $(tr '\n' ' ' < /tmp/monb.log)"
echo "migrate_set_capability events on" >&3
echo "migrate -d tcp:127.0.0.1:4444" >&3
sleep 2
echo "GUEST-INFO a after migrate: alive=$(kill -0 $(pidof qemu-system-x86_64 | cut -d' ' -f1) 2>/dev/null && echo yes); $(tail -5 /tmp/a.log | tr '\n' ' '); monitor: $(tail -5 /tmp/mona.log | tr '\n' ' ')"
t0=$(cut -d' ' -f1 /proc/uptime)
for i in $(seq 1 120); do
    echo "info migrate" >&3
    sleep 1
    grep -q "Migration status: \(completed\|failed\|cancelled\)" /tmp/mona.log && break
done
echo "GUEST-INFO after $(awk -v t=$t0 '{printf "%.1f s", $1 - t}' /proc/uptime): $(grep -E 'Migration status|downtime|total time|transferred' /tmp/mona.log | tail -6 | tr '\n' ' ')"
echo "info status" >&4
sleep 1
echo "GUEST-INFO destination: $(grep -i 'VM status' /tmp/monb.log | tail -1)"
grep -q "Migration status: completed" /tmp/mona.log && pass "a nested VM with an mtty mdev live-migrated to a second QEMU" \
    || { fail "mdev live migration"; cat /tmp/mona.log /tmp/a.log /tmp/b.log | tail -30; }
sleep 20
echo "GUEST-INFO destination console: $(tail -3 /tmp/b.console 2>/dev/null | tr '\n' ' ')"
echo "quit" >&4; echo "quit" >&3
dmesg | grep -iE 'mtty|vfio' | tail -10 | sed 's/^/GUEST-INFO dmesg: /'
echo GUEST-DONE
