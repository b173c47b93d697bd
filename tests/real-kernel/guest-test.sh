#!/bin/sh
# Runs inside the emulated host (PID 1's job). Binaries run from tmpfs: an exec
# over 9p costs ~0.9 s under TCG.
cp /mnt/host/bin/* /tmp/
cd /tmp
pass() { echo "GUEST-PASS $*"; }
fail() { echo "GUEST-FAIL $*"; }
expect() { # expect NAME WANTED-EXIT COMMAND...
    name=$1; want=$2; shift 2
    "$@" > /tmp/out 2>&1; got=$?
    if [ "$got" = "$want" ]; then pass "$name"; else fail "$name (exit $got, wanted $want)"; cat /tmp/out; fi
}

# Differential fidelity, part 1: capture the topology for the fake host. One igb VF
# with autoprobe on lets the capture see igbvf's id.
mkdir -p /mnt/host/out
echo 1 > /sys/bus/pci/devices/0000:01:00.0/sriov_numvfs
./vfctl capture-layout --name emulated > /mnt/host/out/emulated-layout.json
echo 0 > /sys/bus/pci/devices/0000:01:00.0/sriov_numvfs

echo "GUEST-INFO lspci-equivalent: $(ls /sys/bus/pci/devices | tr '\n' ' ')"
VFM_REAL_KERNEL=1 ./kernel_scenarios --test-threads=1 2>&1

# vfctl on the real kernel, as an operator would run it.
printf 'manage = ["8086:10c9", "1b36:0010", "0000:03:00.0"]\n' > /tmp/config.toml
V="./vfctl --direct --config /tmp/config.toml"
expect "vfctl check" 0 $V check
expect "vfctl enable 3 VFs" 0 $V enable 0000:01:00.0 --vfs 3
expect "vfctl enable refuses 8 VFs" 3 $V enable 0000:01:00.0 --vfs 8
expect "vfctl bind VF" 0 $V bind 0000:01:10.0
expect "vfctl bind refuses a non-viable group" 3 $V bind 0000:03:00.0
expect "vfctl bad address" 2 $V bind ../../x
$V list -o json > /tmp/list.json
grep -q '"driver": "vfio-pci"' /tmp/list.json && pass "vfctl list shows the vfio VF" || fail "vfctl list shows the vfio VF"
# Differential fidelity, part 2: the list the fake host must reproduce.
expect "vfctl enable 3 NVMe VFs" 0 $V enable 0000:02:00.0 --vfs 3
$V list -o json > /mnt/host/out/list-real.json
expect "vfctl disable NVMe" 0 $V disable 0000:02:00.0
expect "vfctl unbind VF" 0 $V unbind 0000:01:10.0
expect "vfctl disable" 0 $V disable 0000:01:00.0

# mdev: the mtty sample is loaded; create and remove one instance by hand.
t=/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2
u=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001
if [ -d $t ]; then
    echo $u > $t/create && [ -e /sys/bus/mdev/devices/$u/driver ] && pass "mtty mdev create" || fail "mtty mdev create"
    echo 1 > /sys/bus/mdev/devices/$u/remove && [ ! -e /sys/bus/mdev/devices/$u ] && pass "mtty mdev remove" || fail "mtty mdev remove"
else
    fail "mtty loaded"
fi

dmesg | grep -E 'BUG|Oops|WARNING' | sed 's/^/GUEST-KERNEL-LOG /'
echo GUEST-DONE
