#!/bin/sh
# `make demo`: a walk-through of vfctl on the real kernel of the emulated host.
cp /mnt/host/bin/vfctl /mnt/host/bin/vfio-managerd /tmp/
. /mnt/host/guest-lib.sh
cd /tmp
printf 'manage = ["8086:10c9", "1b36:0010", "0000:03:00.0"]\n' > /tmp/config.toml
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }
run() { printf '\033[1m$ vfctl %s\033[0m\n' "$*"; ./vfctl --direct --config /tmp/config.toml "$@"; rc=$?; [ $rc = 0 ] || echo "(exit $rc)"; }
cat <<'TXT'

This is the emulated GPU host: Debian's kernel under QEMU with an emulated IOMMU.
Its "GPUs" are stand-ins: an igb NIC and an NVMe controller with real SR-IOV, and a
two-function slot whose functions share an IOMMU group (like a GPU and its HDMI audio).
/etc/vfio-manager/config.toml would list them under `manage`; here /tmp/config.toml does.
TXT
say "Is this host ready for passthrough?"
run check
say "What is there?"
run list
say "Enable 4 VFs on the igb PF (autoprobe off: no host driver grabs them)"
run enable 0000:01:00.0 --vfs 4
say "Asking for more than the device has is refused, and nothing changes"
run enable 0000:01:00.0 --vfs 9
say "Bind a VF to vfio-pci: /dev/vfio/<group> appears for the VMM"
run bind 0000:01:10.0
ls /dev/vfio
say "A function whose IOMMU group partner stays on a host driver is refused"
run bind 0000:03:00.0
say "... unless the whole group goes to vfio-pci"
run bind 0000:03:00.0 --whole-group
run list
say "Give everything back to the host"
run unbind 0000:03:00.0 --whole-group
run unbind 0000:01:10.0
run disable 0000:01:00.0
run show 0000:01:00.0

cat <<'TXT'

That was the CLI on the host directly. A host runs the daemon instead: it owns the
VFs and hands them to VMs as leases, over D-Bus, for libvirt's hook, orchestration
tools and people.
TXT
say "Start vfio-managerd: it enables the 4 VFs its configuration asks for, and serves D-Bus"
start_bus bus
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/bus/socket
printf '[[pf]]\naddress = "0000:01:00.0"\nvfs = 4\n[usage]\nnet_full_bytes_per_s = 20000\nbusy_alert_percent = 50\nbusy_alert_for_s = 0\nidle_for_s = 3\n' >> /tmp/config.toml
./vfio-managerd --config /tmp/config.toml --state-dir /tmp/state --audit-log /tmp/state/audit.log > /tmp/daemon.log 2>&1 &
for i in $(seq 1 100); do ./vfctl leases > /dev/null 2>&1 && break; sleep 0.1; done
d() { printf '\033[1m$ vfctl %s\033[0m\n' "$*"; ./vfctl "$@"; rc=$?; [ $rc = 0 ] || echo "(exit $rc)"; }
d list
say "A VM asks for a VF of the igb model over D-Bus; its agent will speak on vsock CID 3"
printf '\033[1m$ vfctl provision --vm demo --profile 8086:10c9 --request-id demo-1 --agent cid:3 --format qemu\033[0m\n'
./vfctl provision --vm demo --profile 8086:10c9 --request-id demo-1 --agent cid:3 --format qemu > /tmp/n1.args
cat /tmp/n1.args
say "The VM boots (QEMU/KVM, nested) with those arguments: its kernel binds igbvf, its agent reports"
cp -r /mnt/host/qemu /mnt/host/vmlinuz /mnt/host/nested-agent.cpio.gz /tmp/
# The VF's link follows the PF's: the PF's interface up (its traffic can flow).
pfnet=$(ls /sys/bus/pci/devices/0000:01:00.0/net 2>/dev/null | head -1)
[ -n "$pfnet" ] && ip link set "$pfnet" up
NESTED_KERNEL="-kernel /tmp/vmlinuz -initrd /tmp/nested-agent.cpio.gz -device vhost-vsock-pci,guest-cid=3"
NESTED_CMDLINE="agent=16 busy=6"
nested_qemu &
vm=$!
for i in $(seq 1 120); do grep -q "NESTED-AGENT up" /tmp/nested.log 2>/dev/null && break; sleep 1; done
grep -q "^NESTED-PCI .*igbvf" /tmp/nested.log || cat /tmp/nested.log
grep "^NESTED-PCI .*igbvf" /tmp/nested.log | sed 's/^NESTED-PCI/  the guest sees:/'
sleep 4
say "While the guest sends traffic on its VF: the lease's agent, and its usage"
d leases
d top --once
wait $vm
grep "usage: VM demo" /tmp/daemon.log | sed 's/^vfio-manager: /  daemon: /'
say "The VM is gone; release the lease: the VF is reset and offered again"
d release --request-id demo-1
d list
say "An mtty mdev (a mediated slice of a device) leased to a VM; its guest writes a5 into the device"
printf '\033[1m$ vfctl provision --vm slice --profile mtty-2 --request-id demo-2 -o json\033[0m\n'
./vfctl provision --vm slice --profile mtty-2 --request-id demo-2 -o json > /tmp/slice.json
lease=$(grep -o '"id": *"[0-9a-f]*"' /tmp/slice.json | head -1 | grep -o '[0-9a-f]\{16\}')
src=$(grep -o '"address": *"[^"]*"' /tmp/slice.json | head -1 | cut -d'"' -f4)
echo "  lease $lease holds mdev $src"
cp /mnt/host/nested-initramfs.cpio.gz /tmp/
qmp_vm a $(migratable_mdev $src)
for i in $(seq 1 120); do [ -n "$(scratch a)" ] && break; sleep 1; done
echo "  the guest reads back: $(scratch a)"
say "Live-migrate the running VM: the daemon reserves the destination mdev first (type, driver, version checked)"
printf '\033[1m$ vfctl migrate prepare-vm --lease %s\033[0m\n' "$lease"
dst=$(./vfctl migrate prepare-vm --lease $lease)
echo "  destination mdev $dst; a second QEMU waits for the VM on it (-incoming)"
qmp_vm b $(migratable_mdev $dst) -incoming tcp:127.0.0.1:4444
for i in $(seq 1 50); do grep -q return /tmp/monb.log && break; sleep 0.2; done
echo "  QEMU (QMP migrate): $(migrate a)"
for i in $(seq 1 20); do [ -n "$(scratch b)" ] && break; sleep 0.5; done
echo "  on the destination the guest reads back: $(scratch b)"
say "The source QEMU quits; the lease moves to the destination mdev under the same id"
qmp a '{"execute":"quit"}'
for i in $(seq 1 50); do [ -n "$(pids_with "mdev/devices/$src")" ] || break; sleep 0.2; done
d migrate commit --lease $lease
d leases
qmp b '{"execute":"quit"}'
sleep 1
d release --request-id demo-2
echo GUEST-DONE
