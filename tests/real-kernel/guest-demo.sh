#!/bin/sh
# `make demo`: a walk-through of vfctl on the real kernel of the emulated host.
cp /mnt/host/bin/vfctl /tmp/
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
echo GUEST-DONE
