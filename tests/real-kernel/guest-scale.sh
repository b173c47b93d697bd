#!/bin/sh
# `run.sh --scale` (`make bench-scale`), inside the emulated host booted with many
# igb PFs (SCALE_PFS, 12 by default, 7 VFs each): each step at scale beside the bare
# sysfs writes of the same step, in the same boot. Times are /proc/uptime's (10 ms).
#   restore: the daemon's start to serving, its configuration enabling every PF's
#            VFs, beside the bare enables;
#   provision: leases of all the VFs (two requests) beside the bare binds;
#   release: both leases (a reset per VF, the returns) beside the bare unbinds, and
#            the bare resets one after another;
#   disable: every PF through the daemon beside the bare disables.
. /mnt/host/guest-lib.sh
cp /mnt/host/bin/vfctl /mnt/host/bin/vfio-managerd /tmp/
cd /tmp
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}'; }
row() { # row STEP OURS BARE WHAT
    awk -v s="$1" -v o="$2" -v b="$3" -v w="$4" 'BEGIN {printf "scale  %-10s %7.2f s   bare %7.2f s   %5.2fx   %s\n", s, o, b, (b > 0 ? o / b : 0), w}'
}
pfs=$(for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor):$(cat $d/device)" = 0x8086:0x10c9 ] && basename $d; done)
n=$(echo $pfs | wc -w)
[ "$n" -ge 2 ] || { echo "GUEST-FAIL scale: only $n igb PFs"; echo GUEST-DONE; exit; }
vfs() { for pf in $pfs; do for v in /sys/bus/pci/devices/$pf/virtfn*; do basename "$(readlink -f $v)"; done; done; }

# The bare writes.
t=$(now)
for pf in $pfs; do
    echo 0 > /sys/bus/pci/devices/$pf/sriov_drivers_autoprobe
    echo 7 > /sys/bus/pci/devices/$pf/sriov_numvfs
done
bare_enable=$(since $t)
all=$(vfs); nv=$(echo $all | wc -w)
t=$(now)
for v in $all; do echo vfio-pci > /sys/bus/pci/devices/$v/driver_override; echo $v > /sys/bus/pci/drivers/vfio-pci/bind; done
bare_bind=$(since $t)
t=$(now)
for v in $all; do echo 1 > /sys/bus/pci/devices/$v/reset; done
bare_reset=$(since $t)
t=$(now)
for v in $all; do echo $v > /sys/bus/pci/drivers/vfio-pci/unbind; echo > /sys/bus/pci/devices/$v/driver_override; done
bare_unbind=$(since $t)
t=$(now)
for pf in $pfs; do echo 0 > /sys/bus/pci/devices/$pf/sriov_numvfs; done
bare_disable=$(since $t)

# The daemon: its configuration enables every PF's VFs at start.
start_bus bus
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/bus/socket
printf 'manage = ["8086:10c9"]\n' > /tmp/daemon.toml
for pf in $pfs; do printf '[[pf]]\naddress = "%s"\nvfs = 7\n' $pf >> /tmp/daemon.toml; done
t=$(now)
./vfio-managerd --config /tmp/daemon.toml --state-dir /tmp/state --audit-log /tmp/state/audit.log > /tmp/daemon.log 2>&1 &
for i in $(seq 1 1200); do ./vfctl leases > /dev/null 2>&1 && break; sleep 0.05; done
restore=$(since $t)
[ "$(vfs | wc -w)" = "$nv" ] || echo "GUEST-FAIL scale: the daemon restored $(vfs | wc -w) of $nv VFs"
half=$((nv / 2))
t=$(now)
./vfctl provision --vm scale-a --profile 8086:10c9 --count $half --request-id a > /dev/null || echo "GUEST-FAIL scale: provision a"
./vfctl provision --vm scale-b --profile 8086:10c9 --count $((nv - half)) --request-id b > /dev/null || echo "GUEST-FAIL scale: provision b"
provision=$(since $t)
t=$(now)
./vfctl release --request-id a > /dev/null && ./vfctl release --request-id b > /dev/null || echo "GUEST-FAIL scale: release"
release=$(since $t)
t=$(now)
for pf in $pfs; do ./vfctl disable $pf > /dev/null || echo "GUEST-FAIL scale: disable $pf"; done
disable=$(since $t)

echo "scale  $n igb PFs, $nv VFs (kernel $(uname -r))"
row restore "$restore" "$bare_enable" "daemon start to serving, its [[pf]] entries enabled; bare: the enables"
row provision "$provision" "$bare_bind" "two leases of all the VFs; bare: the binds"
row release "$release" "$bare_unbind" "both leases released (reset and return each); bare: the unbinds"
row release "$release" "$bare_reset" "the same beside the bare resets, one after another"
row disable "$disable" "$bare_disable" "vfctl disable of each PF; bare: the disables"
echo GUEST-DONE
