#!/bin/sh
# `run.sh --libvirt`, inside the emulated host booted with the Debian root filesystem
# of images/rootfs.sh on /rootfs: libvirt end to end, as an operator's host runs it.
# The system dbus-daemon with the project's bus policy, vfio-managerd restoring 2 igb
# VFs, libvirtd with the hook installed; a domain that names a VF starts, its nested
# guest lists the VF bound to igbvf, the daemon swaps the VF for another in the
# running domain through libvirt, and when it powers off the lease ends. A second
# domain naming the same VF meanwhile is refused with the hook's message. A third
# runs vm-agent over vsock: its usage rises with its traffic, and once idle its VF
# is unplugged from the running domain and returns to the pool (on_idle='unplug').
# Last, a fourth domain's VF fails by an injected PCIe error: the daemon swaps in a
# VF of a second igb PF, and the domain, which QEMU stopped, boots again with it.
. /mnt/host/guest-lib.sh
R=/rootfs
[ -x $R/usr/sbin/libvirtd ] || { fail "no root filesystem with libvirt on /rootfs"; echo GUEST-DONE; exit; }
for d in proc sys dev; do mount --bind /$d $R/$d; done
mount -t tmpfs tmpfs $R/run
mount -t tmpfs tmpfs $R/tmp
up() { echo "up $(cut -d' ' -f1 /proc/uptime)s"; }
in_root() { chroot $R /usr/bin/env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
VFCTL="in_root vfctl"
health_of() { in_root vfctl health | grep "^$1 " | head -1; }
# xml_addr ADDR: how libvirt's XML names PCI address ADDR.
xml_addr() { echo "bus='0x$(echo $1 | cut -c6-7)' slot='0x$(echo $1 | cut -c9-10)' function='0x${1##*.}'"; }

# The project, installed as `make install` would.
cp /mnt/host/bin/vfio-managerd /mnt/host/bin/vfctl /mnt/host/bin/vfio-manager-hook $R/usr/local/bin/
cp /mnt/host/dbus-policy.conf $R/usr/share/dbus-1/system.d/org.vfiomanager.VfioManager1.conf
mkdir -p $R/etc/libvirt/hooks/qemu.d $R/etc/vfio-manager $R/var/lib/libvirt/images
ln -sf /usr/local/bin/vfio-manager-hook $R/etc/libvirt/hooks/qemu.d/vfio-manager
# QEMU in libvirt's private /dev of a chroot finds no /dev/kvm: no mount namespace.
# And what udev does on a Debian host: /dev/kvm for group kvm (QEMU runs as
# libvirt-qemu, a member).
echo 'namespaces = []' >> $R/etc/libvirt/qemu.conf
in_root chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
printf 'manage = ["8086:10c9"]\n[[pf]]\naddress = "0000:01:00.0"\nvfs = 2\n' > $R/etc/vfio-manager/config.toml
# The second igb PF (run.sh), behind a root port of its own.
pf2=$(for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor):$(cat $d/device)" = 0x8086:0x10c9 ] && echo ${d##*/}; done | grep -v 0000:01:00.0 | head -1)
printf '[[pf]]\naddress = "%s"\nvfs = 2\n' "$pf2" >> $R/etc/vfio-manager/config.toml
# Usage thresholds for a nested guest's ping on an emulated NIC, in seconds.
printf '[usage]\nnet_full_bytes_per_s = 20000\nbusy_alert_percent = 50\nbusy_alert_for_s = 0\nidle_for_s = 3\n' >> $R/etc/vfio-manager/config.toml
cp /mnt/host/vmlinuz /mnt/host/nested-initramfs.cpio.gz /mnt/host/nested-agent.cpio.gz $R/var/lib/libvirt/images/
# The igb PF's link up: its VFs' links follow it (the agent domain's traffic).
pfnet=$(ls /sys/bus/pci/devices/0000:01:00.0/net 2>/dev/null | head -1)
[ -n "$pfnet" ] && ip link set "$pfnet" up
in_root groupadd -r vfio-manager 2>/dev/null

in_root dbus-uuidgen --ensure=/etc/machine-id
mkdir -p $R/run/dbus
in_root dbus-daemon --system --fork || fail "system dbus-daemon"
in_root vfio-managerd > /tmp/daemon.log 2>&1 &
up=0
for i in $(seq 1 100); do in_root vfctl leases > /dev/null 2>&1 && { up=1; break; }; sleep 0.1; done
[ $up = 1 ] && pass "vfio-managerd up on the system bus with the shipped policy ($(up))" || { fail "daemon up"; cat /tmp/daemon.log; }
vf=0000:01:10.0
[ -e /sys/bus/pci/devices/$vf ] && pass "the daemon restored the igb VFs of its configuration" || fail "VFs restored"

# A host UUID of its own: libvirt refuses a migration between two daemons that
# share one (the second libvirtd below gets another).
echo 'host_uuid = "6e000000-0000-4000-8000-0000000000a1"' >> $R/etc/libvirt/libvirtd.conf
in_root virtlogd -d
in_root libvirtd -d
up=0
for i in $(seq 1 600); do in_root virsh -c qemu:///system version > /dev/null 2>&1 && { up=1; break; }; sleep 0.1; done
[ $up = 1 ] && pass "libvirtd answers ($(up))" || { fail "libvirtd answers"; }

# domain NAME UUID: a q35 KVM domain booting the nested kernel, with the VF as a
# <hostdev managed='no'> (the hook leases and binds it) and its console in a file.
# Its lease asks for a swap when the VF fails (on_failure='replace'); its guest
# waits for one (swap=N, images/nested-init), on a spare hot-plug port.
domain() {
    cat <<XML
<domain type='kvm'><name>$1</name><uuid>$2</uuid><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<metadata><vfm:lease xmlns:vfm='http://vfio-manager.org/xmlns/lease/1' on_failure='replace'/></metadata>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>/var/lib/libvirt/images/vmlinuz</kernel>
<initrd>/var/lib/libvirt/images/nested-initramfs.cpio.gz</initrd><cmdline>console=ttyS0 panic=-1 quiet swap=150</cmdline></os>
<features><acpi/></features><cpu mode='host-passthrough'/><on_poweroff>destroy</on_poweroff>
<devices><serial type='file'><source path='/tmp/$1.console'/><target port='0'/></serial>
<controller type='pci' index='8' model='pcie-root-port'/><controller type='pci' index='9' model='pcie-root-port'/>
<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0x01' slot='0x10' function='0x0'/></source></hostdev>
<memballoon model='none'/></devices></domain>
XML
}
# agent_domain: the same with vm-agent over vsock (CID 4) in its initramfs, idle
# reclaim by unplug, and a guest that sends traffic for 8 s, then idles.
agent_domain() {
    domain agentvm 6e000000-0000-4000-8000-000000000003 | sed \
        -e "s|on_failure='replace'|on_idle='unplug'|" \
        -e "s|nested-initramfs.cpio.gz|nested-agent.cpio.gz|" \
        -e "s|swap=150|agent=70 busy=8|" \
        -e "s|<memballoon|<vsock model='virtio'><cid auto='no' address='4'/></vsock><memballoon|"
}
agent_domain > $R/tmp/agentvm.xml
in_root virsh define /tmp/agentvm.xml > /dev/null || fail "virsh define agentvm"
domain nested 6e000000-0000-4000-8000-000000000001 > $R/tmp/nested.xml
domain second 6e000000-0000-4000-8000-000000000002 > $R/tmp/second.xml
in_root virsh define /tmp/nested.xml > /dev/null && in_root virsh define /tmp/second.xml > /dev/null || fail "virsh define"
echo "GUEST-INFO domains defined ($(up))"

# The running domain's VF swapped for a healthy one by the daemon through libvirt
# (its lease's on_failure='replace'; here an operator's `vfctl replace`, the same
# swap a failure runs): the lease keeps its id, the nested guest binds igbvf to the
# replacement, the old VF leaves the guest and is held back, and the domain's own
# configuration names the replacement.
swap_in_running_domain() {
    lease=$(in_root vfctl --output json leases | grep -o '"id": *"[0-9a-f]*"' | head -1 | grep -o '[0-9a-f]\{16\}')
    t0=$(cut -d' ' -f1 /proc/uptime)
    if ! in_root vfctl replace $vf --reason "the libvirt boot's swap" > /tmp/replace.out 2>&1; then
        fail "vfctl replace $vf in the running domain"; cat /tmp/replace.out /tmp/daemon.log; return
    fi
    vf2=$(grep -o "replaced by [0-9a-f:.]*" /tmp/replace.out | cut -d' ' -f3)
    in_root vfctl --output json leases | grep -q "$lease" && in_root vfctl leases | grep -q "$vf2" \
        && [ "$(basename "$(readlink /sys/bus/pci/devices/$vf2/driver)")" = vfio-pci ] \
        && pass "vfctl replace: lease $lease keeps its id and holds $vf2 on vfio-pci ($(awk -v t=$t0 '{printf "%.1f s", $1 - t}' /proc/uptime))" \
        || { fail "the lease after the swap"; in_root vfctl leases; }
    for i in $(seq 1 150); do grep -q NESTED-SWAP-DONE $R/tmp/nested.console && break; sleep 1; done
    echo "GUEST-INFO the nested guest after the swap: $(grep NESTED-SWAPPED $R/tmp/nested.console | grep 8086:10ca | tr '\n' ' ')"
    first=$(grep -o 'NESTED-READY igbvf on [0-9a-f:.]*' $R/tmp/nested.console | cut -d' ' -f4)
    grep "^NESTED-SWAPPED .* 8086:10ca igbvf" $R/tmp/nested.console | grep -qv " $first " \
        && ! grep -q "^NESTED-SWAPPED $first " $R/tmp/nested.console \
        && pass "the nested guest binds igbvf to the replacement, and its first VF ($first) is gone ($(awk -v t=$t0 '{printf "%.1f s", $1 - t}' /proc/uptime) after the swap)" \
        || { fail "the nested guest after the swap"; cat $R/tmp/nested.console; }
    in_root virsh dumpxml --inactive nested > /tmp/inactive.xml
    grep -q "$(xml_addr $vf2)" /tmp/inactive.xml && ! grep -q "$(xml_addr $vf)" /tmp/inactive.xml \
        && pass "the domain's persistent configuration names the replacement, not $vf" || { fail "persistent XML"; cat /tmp/inactive.xml; }
    in_root vfctl health | grep "$vf" | grep -q quarantined \
        && pass "the swapped-out VF is held back: $(in_root vfctl health | grep "$vf" | head -1)" || { fail "held back"; in_root vfctl health; }
}

if in_root virsh start nested > /tmp/start.out 2>&1; then
    echo "GUEST-INFO virsh start returned ($(up))"
    in_root vfctl leases | grep -q "for VM nested" && [ "$(basename "$(readlink /sys/bus/pci/devices/$vf/driver)")" = vfio-pci ] \
        && pass "virsh start: the hook leased $vf to the domain, on vfio-pci ($(up))" || { fail "lease at start"; in_root vfctl leases; }
    out=$(in_root virsh start second 2>&1)
    [ $? != 0 ] && echo "$out" | grep -q "leased to VM nested" \
        && pass "a second domain naming the same VF is refused: $(echo "$out" | grep -o 'vfio-manager.*' | head -1)" \
        || fail "second domain: $out"
    for i in $(seq 1 240); do grep -q NESTED-READY $R/tmp/nested.console && break; sleep 1; done
    nested_sees $R/tmp/nested.console "the nested guest of the libvirt domain lists the VF bound to igbvf"
    swap_in_running_domain
    for i in $(seq 1 240); do in_root virsh domstate nested 2>/dev/null | grep -q 'shut off' && break; sleep 1; done
    # libvirt runs `release end` after the domain shows as shut off.
    for i in $(seq 1 50); do in_root vfctl leases | grep -q "for VM nested" || break; sleep 0.2; done
    in_root virsh domstate nested | grep -q 'shut off' && ! in_root vfctl leases | grep -q "for VM nested" \
        && [ "$(basename "$(readlink /sys/bus/pci/devices/$vf2/driver 2>/dev/null)")" != vfio-pci ] \
        && pass "the domain powered off: the hook released the lease and its VF $vf2 left vfio-pci ($(up))" \
        || { fail "release at stop"; in_root vfctl leases; }
    in_root vfctl orphan free $vf > /tmp/free.out 2>&1 \
        && [ "$(basename "$(readlink /sys/bus/pci/devices/$vf/driver 2>/dev/null)")" != vfio-pci ] \
        && pass "the swapped-out VF $vf, held back until then, is freed to the host" \
        || { fail "free the swapped-out VF"; cat /tmp/free.out; in_root vfctl health; }
else
    fail "virsh start nested"; cat /tmp/start.out /tmp/daemon.log
fi
# A running domain live-migrates with its mtty mdev to a second libvirtd on this host
# (its own /etc/libvirt with another host UUID, /run/libvirt, /var/lib/libvirt/qemu,
# caches, logs and pid files, in a mount namespace). `virsh migrate` runs the hook's `migrate
# begin` at the destination: the daemon reserves a destination mdev (type, vendor
# driver and version checked) and the XML names it. The guest's device state (a5 in
# the UART's scratch register) reads back the same on the destination, and when the
# source's QEMU ends its `release end` moves the lease to the destination's mdev.
# libvirt cannot say x-device-dirty-page-tracking=off in a <hostdev>: the domain sets
# it with <qemu:override> (docs/kernel.md: the container tracks the dirty pages).
LV2=/tmp/lv2
DEST="qemu+unix:///system?socket=$LV2/run/libvirt-sock"
second_libvirtd() {
    mkdir -p $R$LV2/run $R$LV2/qemu $R$LV2/cache $R$LV2/log
    cp -a $R/etc/libvirt $R$LV2/etc
    sed -i 's/0000000000a1/0000000000a2/' $R$LV2/etc/libvirtd.conf
    in_root unshare -m sh -c "mount --bind $LV2/etc /etc/libvirt && mount --bind $LV2/run /run/libvirt \
        && mount --bind $LV2/qemu /var/lib/libvirt/qemu && mount --bind $LV2/cache /var/cache/libvirt \
        && mount --bind $LV2/log /var/log/libvirt \
        && virtlogd -d -p /run/libvirt/virtlogd.pid && libvirtd -d -p /run/libvirt/libvirtd.pid" > /tmp/lv2.out 2>&1
    for i in $(seq 1 600); do in_root virsh -c "$DEST" version > /dev/null 2>&1 && return 0; sleep 0.1; done
    cat /tmp/lv2.out
    return 1
}
mig_domain() { # UUID of its mdev
    cat <<XML
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>migvm</name>
<uuid>6e000000-0000-4000-8000-000000000004</uuid><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<metadata><vfm:lease xmlns:vfm='http://vfio-manager.org/xmlns/lease/1' profile='mtty-2' count='1'/></metadata>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>/var/lib/libvirt/images/vmlinuz</kernel>
<initrd>/var/lib/libvirt/images/nested-initramfs.cpio.gz</initrd>
<cmdline>console=ttyS0 panic=-1 quiet initcall_blacklist=serial_pci_driver_init scratch=a5</cmdline></os>
<features><acpi/></features><cpu mode='host-passthrough'/><on_poweroff>destroy</on_poweroff>
<devices><serial type='file'><source path='/tmp/migvm.console'/><target port='0'/></serial>
<hostdev mode='subsystem' type='mdev' model='vfio-pci' managed='no'><source><address uuid='$1'/></source><alias name='ua-mtty'/></hostdev>
<memballoon model='none'/></devices>
<qemu:override><qemu:device alias='ua-mtty'><qemu:frontend>
<qemu:property name='enable-migration' type='string' value='on'/>
<qemu:property name='x-device-dirty-page-tracking' type='string' value='off'/>
</qemu:frontend></qemu:device></qemu:override></domain>
XML
}
console_scratch() { grep -o 'NESTED-SCRATCH [0-9a-f]*' $R/tmp/$1 2>/dev/null | tail -1 | cut -d' ' -f2; }
migrate_in_libvirt() {
    second_libvirtd && pass "a second libvirtd on this host, in a mount namespace of its own ($(up))" \
        || { fail "a second libvirtd"; return; }
    src=6e000000-0000-4000-8000-0000000000c1
    mig_domain $src > $R/tmp/migvm.xml
    in_root virsh define /tmp/migvm.xml > /dev/null && in_root virsh start migvm > /tmp/migstart.out 2>&1 \
        || { fail "virsh start migvm"; cat /tmp/migstart.out; return; }
    lease=$(in_root vfctl leases | grep "for VM migvm" | awk '{print $2}')
    for i in $(seq 1 120); do [ "$(console_scratch migvm.console)" = a5 ] && break; sleep 1; done
    [ "$(console_scratch migvm.console)" = a5 ] && [ "$(lease_mdev $lease)" = $src ] \
        && pass "virsh start: the hook made mdev $src for lease $lease, and the guest wrote a5 into the device ($(up))" \
        || { fail "the mdev domain before migration"; cat $R/tmp/migvm.console; in_root vfctl leases; return; }
    # The destination logs the guest's console to a file of its own.
    in_root virsh dumpxml --migratable migvm | sed 's|/tmp/migvm.console|/tmp/migvm-dest.console|' > $R/tmp/migvm-dest.xml
    # First the failure path: the destination's QEMU is killed midway. The source
    # runs on with its device state, the destination's `release end` drops the mdev
    # made for it, and the lease is unchanged.
    # At 1 MiB/s the guest's memory takes seconds to send: the kill lands midway.
    in_root virsh migrate --live --bandwidth 1 migvm "$DEST" tcp://127.0.0.1:49152 --xml /tmp/migvm-dest.xml > /tmp/migrate-killed.out 2>&1 &
    for i in $(seq 1 150); do in_root virsh domjobinfo migvm 2>/dev/null | grep -q 'Memory processed: *[1-9]' && break; sleep 0.2; done
    sent=$(in_root virsh domjobinfo migvm 2>/dev/null | grep 'Memory processed' | tr -s ' ' | cut -d' ' -f3-)
    kill -9 $(pids_with 'incoming defer') 2>/dev/null
    wait $!
    for i in $(seq 1 50); do [ "$(ls /sys/bus/mdev/devices | wc -l)" = 1 ] && break; sleep 0.2; done
    lines=$(grep -c NESTED-SCRATCH $R/tmp/migvm.console); sleep 3
    in_root virsh domstate migvm | grep -q running && [ "$(lease_mdev $lease)" = $src ] \
        && [ "$(ls /sys/bus/mdev/devices)" = $src ] && [ "$(grep -c NESTED-SCRATCH $R/tmp/migvm.console)" -gt $lines ] \
        && [ "$(console_scratch migvm.console)" = a5 ] \
        && pass "the destination's QEMU killed midway (${sent:-nothing} sent): virsh migrate fails ($(grep -o 'error: .*' /tmp/migrate-killed.out | head -1 | cut -c1-80)), the source runs on reading a5, the destination's mdev is removed, the lease is unchanged" \
        || { fail "the killed migration: $(cat /tmp/migrate-killed.out)"; ls /sys/bus/mdev/devices; in_root vfctl leases; in_root virsh domstate migvm; }
    t0=$(cut -d' ' -f1 /proc/uptime)
    if ! in_root virsh migrate --live migvm "$DEST" tcp://127.0.0.1:49152 --xml /tmp/migvm-dest.xml > /tmp/migrate.out 2>&1; then
        fail "virsh migrate: $(cat /tmp/migrate.out)"; tail -20 $R/var/log/libvirt/qemu/migvm.log $R$LV2/log/qemu/migvm.log 2>/dev/null; return
    fi
    took=$(awk -v t=$t0 '{printf "%.1f s", $1 - t}' /proc/uptime)
    for i in $(seq 1 20); do [ -n "$(console_scratch migvm-dest.console)" ] && break; sleep 0.5; done
    for i in $(seq 1 50); do [ "$(lease_mdev $lease)" = $src ] || break; sleep 0.2; done
    dst=$(lease_mdev $lease)
    in_root virsh -c "$DEST" domstate migvm | grep -q running && [ "$(console_scratch migvm-dest.console)" = a5 ] \
        && pass "virsh migrate --live: migvm runs under the second libvirtd on mdev $dst, and its guest reads back a5 from the device there ($took)" \
        || { fail "after virsh migrate: $(in_root virsh -c "$DEST" domstate migvm 2>&1), the destination's guest reads '$(console_scratch migvm-dest.console)'"; cat $R/tmp/migvm-dest.console; }
    [ -n "$dst" ] && [ "$dst" != $src ] && [ ! -e /sys/bus/mdev/devices/$src ] && [ -e /sys/bus/mdev/devices/$dst ] \
        && pass "the source's release end handed lease $lease to the destination's mdev $dst; the source's mdev $src is removed" \
        || { fail "the lease after the migration (dst '$dst')"; in_root vfctl leases; grep -i "handover\|hook" /tmp/daemon.log | tail; }
    in_root virsh -c "$DEST" destroy migvm > /dev/null 2>&1
    for i in $(seq 1 50); do in_root vfctl leases | grep -q "for VM migvm" || break; sleep 0.2; done
    ! in_root vfctl leases | grep -q "for VM migvm" && [ ! -e /sys/bus/mdev/devices/$dst ] \
        && pass "the migrated domain destroyed at the destination: its lease ends and mdev $dst is removed" \
        || { fail "release at the destination"; in_root vfctl leases; }
}
migrate_in_libvirt

# vm-agent in a libvirt domain: its hello over vsock (the hook sent the domain's
# CID with the lease), usage up with its traffic, then idle: the agent lets go,
# libvirt unplugs the VF from the running domain, and it returns to the pool.
agent_in_domain() {
    in_root virsh start agentvm > /tmp/start3.out 2>&1 || { fail "virsh start agentvm"; cat /tmp/start3.out; return; }
    lease=$(in_root vfctl --output json leases | grep -o '"id": *"[0-9a-f]*"' | head -1 | grep -o '[0-9a-f]\{16\}')
    for i in $(seq 1 240); do grep -q "VM agentvm .* connected" /tmp/daemon.log && break; sleep 1; done
    grep -q "agents: VM agentvm (lease $lease) connected: vm-agent .* sees $vf as [0-9a-f:.]* (igbvf)" /tmp/daemon.log \
        && pass "the libvirt domain's vm-agent says hello over vsock (CID 4 from its XML): $vf bound to igbvf" \
        || { fail "agent hello in the libvirt domain"; grep agents /tmp/daemon.log; cat $R/tmp/agentvm.console; }
    for i in $(seq 1 120); do grep -q "VM agentvm .*: idle" /tmp/daemon.log && break; sleep 1; done
    for i in $(seq 1 60); do in_root vfctl leases | grep -A2 "lease $lease" | grep -q "$vf" || break; sleep 1; done
    order=$(grep -o "usage: VM agentvm .*: \(busy high\|busy ok\|idle\)" /tmp/daemon.log | awk '{print $NF}' | tr '\n' ' ')
    echo "GUEST-INFO usage events of agentvm, in order: $order; $(grep 'VM agentvm .*: idle' /tmp/daemon.log | head -1)"
    echo "$order" | grep -q "high .*ok .*idle" \
        && pass "the domain's usage rises with its traffic (UsageAlert high) and falls to idle" \
        || { fail "the domain's usage"; grep "usage:" /tmp/daemon.log; grep NESTED-AGENT $R/tmp/agentvm.console; }
    in_root virsh dumpxml agentvm > /tmp/agentvm.live.xml
    ! in_root vfctl leases | grep -A2 "lease $lease" | grep -q "$vf" \
        && ! grep -q "$(xml_addr $vf)" /tmp/agentvm.live.xml \
        && [ "$(basename "$(readlink /sys/bus/pci/devices/$vf/driver 2>/dev/null)")" != vfio-pci ] \
        && in_root vfctl swaps $lease | grep -q "idle" \
        && pass "idle with on_idle=unplug: the agent let go, libvirt unplugged $vf from the running domain, and it is back in the pool" \
        || { fail "idle reclaim in the libvirt domain"; in_root vfctl leases; in_root vfctl swaps $lease; grep -E "usage|agents|reclaim" /tmp/daemon.log; }
    # The guest lost the VF: its agent says hello again without it.
    for i in $(seq 1 30); do grep -q "VM agentvm .* says hello again" /tmp/daemon.log && break; sleep 1; done
    last=$(grep "VM agentvm .* says hello again" /tmp/daemon.log | tail -1)
    [ -n "$last" ] && ! echo "$last" | grep -q "$vf" \
        && pass "the agent reports the VF gone: ${last#*: }" || { fail "the agent's hello after the unplug"; grep agents /tmp/daemon.log; }
    for i in $(seq 1 120); do in_root virsh domstate agentvm 2>/dev/null | grep -q 'shut off' && break; sleep 1; done
    grep "NESTED-AGENT\|NESTED-DONE" $R/tmp/agentvm.console | sed 's/^/GUEST-INFO agentvm: /' | head -6
}
agent_in_domain

# A running domain's VF failed by a PCIe error (a non-fatal Completion Timeout,
# reported through aer_inject), with on_failure='replace'. The kernel's recovery
# asks every function below the first PF's root port; the spare VF there has no
# driver, so it fails (docs/kernel.md, rule 12). vfio-pci signals the error to QEMU,
# which stops the guest. The daemon follows the kernel, swaps in a VF of the second
# PF through libvirt, and resets and resumes the domain: its guest boots again with
# the replacement.
fault_in_running_domain() {
    domain faultvm 6e000000-0000-4000-8000-000000000005 > $R/tmp/faultvm.xml
    in_root virsh define /tmp/faultvm.xml > /dev/null && in_root virsh start faultvm > /tmp/start4.out 2>&1 \
        || { fail "virsh start faultvm"; cat /tmp/start4.out; return; }
    lease=$(in_root vfctl leases | grep "for VM faultvm" | awk '{print $2}')
    for i in $(seq 1 240); do grep -q NESTED-READY $R/tmp/faultvm.console && break; sleep 1; done
    first=$(grep -o 'NESTED-READY igbvf on [0-9a-f:.]*' $R/tmp/faultvm.console | cut -d' ' -f4)
    [ -n "$first" ] && in_root vfctl leases | grep -A3 "lease $lease" | grep -q "$vf" \
        || { fail "faultvm's guest with $vf"; cat $R/tmp/faultvm.console; return; }
    n0=$(dmesg | grep -c 'device recovery')
    t0=$(cut -d' ' -f1 /proc/uptime)
    aer_report 1 $vf 00400000 00000000
    for i in $(seq 1 100); do [ "$(dmesg | grep -c 'device recovery')" -gt "$n0" ] && break; sleep 0.2; done
    kernel=$(dmesg | grep -E "can't recover|device recovery" | tail -2 | sed 's/^\[[^]]*\] //' | tr '\n' ';')
    for i in $(seq 1 240); do grep -c NESTED-READY $R/tmp/faultvm.console | grep -qv '^1$' && break; sleep 0.5; done
    took=$(awk -v t=$t0 '{printf "%.1f s", $1 - t}' /proc/uptime)
    # The kernel's own recovery, from its injection line to its verdict (dmesg's clock).
    k_ms=$(dmesg | grep -E 'aer_inject: Injecting|device recovery' | tail -2 | sed 's/^\[ *\([0-9.]*\)\].*/\1/' \
        | awk 'NR == 1 {a = $1} NR == 2 {printf "%.1f", ($1 - a) * 1000}')
    now=$(in_root vfctl leases | grep -A3 "lease $lease" | grep -o "0000:[0-9a-f:.]*" | head -1)
    echo "$kernel" | grep -q "device recovery failed" && health_of $vf | grep -q " failed " \
        && [ "${now%:*}" = "${pf2%:*}" ] && [ "$(basename "$(readlink /sys/bus/pci/devices/$now/driver)")" = vfio-pci ] \
        && pass "a PCIe error in faultvm's VF $vf: the kernel says \"$kernel\", $vf is failed, and lease $lease holds $now of the second PF on vfio-pci" \
        || { fail "the failed VF's swap (kernel: $kernel; lease holds '$now')"; in_root vfctl health; grep -iE 'recover|replace' /tmp/daemon.log | tail; }
    in_root virsh dumpxml faultvm > /tmp/faultvm.live.xml
    grep -q "Unrecoverable error detected" $R/var/log/libvirt/qemu/faultvm.log && in_root virsh domstate faultvm | grep -q running \
        && grep -q "$(xml_addr $now)" /tmp/faultvm.live.xml && ! grep -q "$(xml_addr $vf)" /tmp/faultvm.live.xml \
        && grep "op\":\"replace" $R/var/log/vfio-manager/audit.log | grep -q "reset and resumed the domain" \
        && pass "QEMU stopped the guest on the error; the daemon plugged $now, unplugged $vf, and reset and resumed the domain" \
        || { fail "faultvm after the swap: $(in_root virsh domstate --reason faultvm)"; grep replace $R/var/log/vfio-manager/audit.log; cat /tmp/faultvm.live.xml; }
    last=$(grep -o 'NESTED-READY igbvf on [0-9a-f:.]*' $R/tmp/faultvm.console | tail -1 | cut -d' ' -f4)
    # The guest's own address may be the old one's (the reset freed its port):
    # the second boot's one igb VF is the replacement, the only one libvirt names.
    [ -n "$last" ] && [ "$(grep -c NESTED-READY $R/tmp/faultvm.console)" -ge 2 ] \
        && [ "$(awk '/NESTED-READY/ {n++} n == 1 && /NESTED-PCI .* 8086:10ca/' $R/tmp/faultvm.console | wc -l)" = 1 ] \
        && pass "the nested guest boots again and binds igbvf to the replacement, its only igb VF ($last), $took after the error (the kernel's own recovery: ${k_ms:-?} ms)" \
        || { fail "faultvm's guest after the swap"; cat $R/tmp/faultvm.console; }
    in_root vfctl leases > /tmp/leases.out
    ! grep -q "$vf" /tmp/leases.out && in_root vfctl swaps $lease | grep -q "$vf" \
        && pass "the failed VF is held back: $(health_of $vf | tr -s ' ' | cut -c1-110)" \
        || { fail "the failed VF after the swap"; in_root vfctl swaps $lease; cat /tmp/leases.out; }
    in_root virsh destroy faultvm > /dev/null 2>&1
    for i in $(seq 1 50); do in_root vfctl leases | grep -q "for VM faultvm" || break; sleep 0.2; done
    ! in_root vfctl leases | grep -q "for VM faultvm" && [ "$(basename "$(readlink /sys/bus/pci/devices/$now/driver 2>/dev/null)")" != vfio-pci ] \
        && pass "faultvm destroyed: its lease ends and $now leaves vfio-pci" || { fail "release of faultvm"; in_root vfctl leases; }
}
fault_in_running_domain

grep -q 'provision' $R/var/log/vfio-manager/audit.log 2>/dev/null && echo "GUEST-INFO audit: $(grep -c . $R/var/log/vfio-manager/audit.log) lines"
dmesg | grep -E 'BUG|Oops|WARNING' | sed 's/^/GUEST-KERNEL-LOG /'
echo GUEST-DONE
