#!/bin/sh
# Runs inside the emulated host (PID 1's job). Binaries run from tmpfs: an exec
# over 9p costs ~0.9 s under TCG.
cp /mnt/host/bin/* /tmp/
. /mnt/host/guest-lib.sh
cd /tmp

nested_vms() {
    cp -r /mnt/host/qemu /mnt/host/vmlinuz /mnt/host/nested-initramfs.cpio.gz /mnt/host/nested-agent.cpio.gz /tmp/
    [ -c /dev/kvm ] || { fail "nested KVM: no /dev/kvm in the emulated host"; return; }
    # The VM runs vm-agent over vhost-vsock (its CID names the lease), sends
    # traffic on the VF for 10 s, then stays quiet.
    ./vfctl provision --vm nested --profile 8086:10c9 --request-id n1 --agent cid:3 --format qemu > /tmp/n1.args 2>&1
    NESTED_KERNEL="-kernel /tmp/vmlinuz -initrd /tmp/nested-agent.cpio.gz -device vhost-vsock-pci,guest-cid=3"
    NESTED_CMDLINE="agent=30 busy=10"
    nested_qemu
    # Once seen: QEMU printed nothing at all, not even an error (the nested guest
    # died before its console; an emulator fault under TCG). One more boot then;
    # any output at all (an error, a guest without the VF) is judged as it is.
    if [ "$(grep -vc '^NESTED-EXIT' /tmp/nested.log)" = 0 ]; then
        echo "GUEST-INFO the nested VM printed nothing ($(cat /tmp/nested.log)); booting it once more"
        nested_qemu
    fi
    nested_sees /tmp/nested.log "a nested QEMU/KVM VM given the lease's $(cat /tmp/n1.args) sees the VF and binds igbvf"
    nested_agent
    expect "the nested VM's lease is released" 0 ./vfctl release --request-id n1
    NESTED_KERNEL="-kernel /tmp/vmlinuz -initrd /tmp/nested-initramfs.cpio.gz"
    NESTED_CMDLINE=
    if [ -x /mnt/host/ch/cloud-hypervisor ]; then
        nested_ch
    else
        echo "GUEST-SKIP cloud-hypervisor nested VM: CLOUD_HYPERVISOR was not set to a cloud-hypervisor binary (none is packaged; see docs/cloud-hypervisor.md)"
    fi
}
# What the daemon heard from the nested VM's agent, in order: its hello listing the
# leased VF bound to igbvf, busy while the guest sent traffic, idle after.
nested_agent() {
    vf=$(grep -o 'host=[0-9a-f:.]*' /tmp/n1.args | head -1 | cut -d= -f2)
    grep "NESTED-AGENT" /tmp/nested.log | sed 's/^/GUEST-INFO /' | head -8
    grep -q "agents: VM nested (lease [0-9a-f]*) connected: vm-agent .* sees $vf as [0-9a-f:.]* (igbvf)" /tmp/daemon.log \
        && pass "the daemon gets the nested VM's hello over vhost-vsock (CID 3): the leased VF $vf, bound to igbvf" \
        || { fail "the agent's hello over vhost-vsock"; grep agents /tmp/daemon.log; }
    order=$(grep -o "usage: VM nested .*: \(busy high\|busy ok\|idle\)" /tmp/daemon.log | awk '{print $NF}' | tr '\n' ' ')
    echo "GUEST-INFO usage events of the nested VM, in order: $order"
    echo "$order" | grep -q "high .*ok .*idle" \
        && pass "utilisation rises while the nested guest sends traffic on the VF (UsageAlert high), and falls back to idle after" \
        || { fail "utilisation follows the nested guest's traffic"; grep "usage:" /tmp/daemon.log; }
}
# cloud-hypervisor: cold boot with the lease's --device arguments, then a VM that
# waits for a device hot-added by `vfctl attach`, whose lease ends with the VM.
nested_ch() {
    mkdir -p /tmp/ch /lib/x86_64-linux-gnu
    cp /mnt/host/ch/* /tmp/ch/
    cp /tmp/ch/libgcc_s.so.1 /lib/x86_64-linux-gnu/
    CH="/tmp/ch/cloud-hypervisor"
    [ -e /tmp/ch/ld-linux-x86-64.so.2 ] && CH="/tmp/ch/ld-linux-x86-64.so.2 --library-path /tmp/ch /tmp/ch/cloud-hypervisor"
    CH="$CH --kernel /tmp/vmlinuz --initramfs /tmp/nested-initramfs.cpio.gz --cpus boot=1 --memory size=256M --serial tty --console off"
    ./vfctl provision --vm chvm --profile 8086:10c9 --request-id c1 --format cloud-hypervisor > /tmp/c1.args 2>&1
    t0=$(date +%s)
    timeout 240 $CH --cmdline 'console=ttyS0 panic=-1 quiet' $(cat /tmp/c1.args) < /dev/null > /tmp/ch-cold.log 2>&1
    echo "NESTED-EXIT status $? after $(($(date +%s) - t0)) s" >> /tmp/ch-cold.log
    nested_sees /tmp/ch-cold.log "a nested cloud-hypervisor VM given the lease's $(cat /tmp/c1.args) sees the VF"
    expect "the cloud-hypervisor VM's lease is released" 0 ./vfctl release --request-id c1
    rm -f /tmp/ch.sock
    $CH --api-socket /tmp/ch.sock --cmdline 'console=ttyS0 panic=-1 quiet want=igbvf wait=120' < /dev/null > /tmp/ch-hot.log 2>&1 &
    ch=$!
    for i in $(seq 1 100); do [ -S /tmp/ch.sock ] && break; sleep 0.1; done
    ./vfctl attach --ch-socket /tmp/ch.sock --vm chhot --profile 8086:10c9 --watch > /tmp/attach.log 2>&1 &
    att=$!
    for i in $(seq 1 240); do grep -q NESTED-DONE /tmp/ch-hot.log && break; sleep 1; done
    nested_sees /tmp/ch-hot.log "a VF hot-added by vfctl attach reaches the running cloud-hypervisor VM"
    kill $ch 2>/dev/null; wait $ch
    wait $att && ! ./vfctl leases | grep -q chhot && pass "vfctl attach --watch releases the lease when the VM exits" \
        || { fail "attach --watch release"; cat /tmp/attach.log; }
}

# Differential fidelity, part 1: capture the topology for the fake host. One igb VF
# with autoprobe on lets the capture see igbvf's id.
mkdir -p /mnt/host/out
echo 1 > /sys/bus/pci/devices/0000:01:00.0/sriov_numvfs
./vfctl capture-layout --name emulated > /mnt/host/out/emulated-layout.json
echo 0 > /sys/bus/pci/devices/0000:01:00.0/sriov_numvfs

echo "GUEST-INFO lspci-equivalent: $(ls /sys/bus/pci/devices | tr '\n' ' ')"
# Each takes well under a minute in a healthy boot.
VFM_REAL_KERNEL=1 watched 150 ./kernel_scenarios --test-threads=1 2>&1 || fail "kernel_scenarios exited non-zero"
VFM_REAL_KERNEL=1 watched 150 ./mdev_scenarios --test-threads=1 2>&1 || fail "mdev_scenarios exited non-zero"
# The policy gate crossed with every entry point, on the real kernel (tests/tests/gate_table.rs).
if VFM_REAL_KERNEL=1 watched 150 ./gate_table --test-threads=1 --nocapture >/tmp/gate.log 2>&1; then
    pass "gate table: every entry point refuses every reason and changes nothing"
else
    fail "gate_table exited non-zero"
fi
grep -v '^vfio-manager: audit' /tmp/gate.log

# vfctl on the real kernel, as an operator would run it.
printf 'manage = ["8086:10c9", "1b36:0010", "0000:03:00.0"]\n' > /tmp/config.toml
V="./vfctl --direct --config /tmp/config.toml"
expect "vfctl check" 0 $V check
echo "GUEST-INFO $($V check 2>&1 | grep -E 'kvm|irq-remapping|iommu-mode' | tr '\n' ' ')"
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

# PCIe errors injected through QEMU's monitor (run.sh's inject.py) into the
# virtio-rng behind its own root port, both with AER (the stand-in whose errors QEMU
# delivers; docs/kernel.md). The kernel runs its recovery and the daemon's health
# follows what it reports (kernel rule 12); then the device is hot-removed
# from under its lease.
health_of() { ./vfctl health | grep "^$1 " | head -1; }
# uncorrectable N: a non-fatal error (Completion Timeout) into the virtio-rng; waits
# for the kernel's recovery to end and prints its verdict.
uncorrectable() {
    n0=$(dmesg | grep -c 'device recovery \(successful\|failed\)')
    inject $1 "pcie_aer_inject_error rng0 0x4000" > /tmp/inject.out
    for i in $(seq 1 100); do [ "$(dmesg | grep -c 'device recovery \(successful\|failed\)')" -gt "$n0" ] && break; sleep 0.2; done
    dmesg | grep -o 'device recovery \(successful\|failed\)' | tail -1
}
# follows DEV VERDICT STATE WHAT: the daemon's health of DEV after the kernel's VERDICT.
follows() {
    for i in $(seq 1 50); do health_of $1 | grep -q " $3 " && break; sleep 0.2; done
    seen=$(grep "recovery: .*_RECOVERY" /tmp/daemon.log | sed 's/.*vfio-manager: //' | tail -2 | tr '\n' ';')
    case "$2" in *"$4"*) ;; *) false ;; esac && health_of $1 | grep -q " $3 " \
        && pass "$5: the kernel says \"$2\", the daemon saw \"$seen\" and says $3" \
        || { fail "$5: the kernel says \"$2\", the daemon saw \"$seen\": $(health_of $1)"; cat /tmp/inject.out; dmesg | grep -iE 'aer|recover' | tail -8; }
}
pcie_errors() {
    rng=0000:04:00.0
    [ -e /sys/bus/pci/devices/$rng/aer_dev_nonfatal ] || { fail "AER: $rng has no AER counters"; return; }
    # On virtio-pci, which has no error handler: the kernel cannot recover it and
    # says so once, on the root port above it.
    kernel=$(uncorrectable u1)
    follows $rng "$kernel" failed failed "a non-fatal error injected into the virtio-rng on virtio-pci"
    expect "the failed device answers its probe again: clear" 0 ./vfctl clear $rng
    # On vfio-pci, whose error handler lets the kernel recover it.
    ./vfctl bind $rng > /dev/null
    kernel=$(uncorrectable u2)
    follows $rng "$kernel" healthy successful "a non-fatal error injected into the virtio-rng on vfio-pci"
    # A burst of correctable errors (the daemon has looked at the counts before it).
    ./vfctl health > /dev/null
    aer_report 6 $rng 00000000 01000000 > /tmp/inject.out
    health_of $rng | grep -q " degraded .*6 correctable PCIe errors in the last hour" \
        && pass "a burst of 6 correctable errors (aer_inject) makes the virtio-rng degraded: $(health_of $rng | cut -c1-90)" \
        || { fail "correctable burst: $(health_of $rng)"; cat /tmp/inject.out; dmesg | grep -i 'aer' | tail -5; }
    # The periodic probe (every 5 s here) announces the change: audited, signalled.
    burst="healthy -> degraded: 6 correctable"
    for i in $(seq 1 75); do grep -q "$burst" /tmp/state/audit.log && break; sleep 0.2; done
    grep "$burst" /tmp/state/audit.log | grep -q "$rng" \
        && pass "the daemon's probe announced the change: audit $(grep "$burst" /tmp/state/audit.log | grep -o '"result":"[^"]*"' | cut -c1-90)" \
        || { fail "the degraded state announced"; grep health /tmp/state/audit.log; }
    echo "GUEST-INFO AER counts of $rng: $(./vfctl health | grep "^$rng" | awk '{print $3}') (correctable/non-fatal/fatal)"
    echo "GUEST-INFO an igb VF's AER capability: $(ls /sys/bus/pci/devices/0000:01:10.0/aer_dev_correctable 2>&1)"
    # Hot-removed from under its lease (QEMU device_del; pciehp takes 5 s to let go).
    ./vfctl unbind $rng > /dev/null
    ./vfctl provision --vm gone --device $rng --request-id gone > /dev/null
    inject d1 "device_del rng0" > /tmp/inject.out
    for i in $(seq 1 150); do [ ! -e /sys/bus/pci/devices/$rng ] && ! ./vfctl leases | grep -q "$rng" && break; sleep 0.2; done
    [ ! -e /sys/bus/pci/devices/$rng ] && ./vfctl leases | grep -q "VM gone" && ! ./vfctl leases | grep -q "$rng" \
        && health_of $rng | grep -q " gone " && grep -q "$rng of lease .*its lease lets it go" /tmp/daemon.log \
        && pass "the leased virtio-rng hot-removed: its lease lets it go and keeps its id, health says gone" \
        || { fail "surprise removal: $(cat /tmp/inject.out)"; ./vfctl leases; health_of $rng; tail -5 /tmp/daemon.log; }
    expect "the emptied lease is released" 0 ./vfctl release --request-id gone
    dmesg | grep -iE 'AER|recover|pciehp' | grep -v 'enabled with IRQ\|_OSC' | sed 's/^/GUEST-INFO kernel: /' | tail -16
    grep "recovery: .*_RECOVERY\|lets it go" /tmp/daemon.log | sed 's/^/GUEST-INFO daemon: /'
}

# A running VM live-migrates with its mdev: the daemon leases an mtty mdev to a
# nested QEMU/KVM VM, reserves the destination (`vfctl migrate prepare-vm`, the type,
# driver and version checked) before any state moves, QEMU migrates over QMP to a
# second QEMU started with -incoming, the guest reads back what it wrote to the
# device, and the lease moves to the destination under its id once the source
# quit (`vfctl migrate commit`). The failure paths: a destination of another type
# is refused first; a destination killed midway leaves the source running, goes
# (`vfctl migrate abort`) and the lease is unchanged; the daemon SIGKILLed before
# the commit finishes the hand-over at its start.
vm_migration() {
    [ -c /dev/kvm ] || { fail "migration: no /dev/kvm in the emulated host"; return; }
    ./vfctl provision --vm mig --profile mtty-2 --request-id mig -o json > /tmp/mig.out 2>&1 || { fail "an mdev lease to migrate: $(cat /tmp/mig.out)"; return; }
    lease=$(grep -o '"id": *"[0-9a-f]*"' /tmp/mig.out | head -1 | grep -o '[0-9a-f]\{16\}')
    src=$(lease_mdev $lease)
    qmp_vm a $(migratable_mdev $src)
    for i in $(seq 1 120); do [ "$(scratch a)" = a5 ] && break; sleep 1; done
    ./vfctl migrate plan --vm mig > /tmp/plan.out 2>&1 && grep -q "1 of 1 devices move with it" /tmp/plan.out \
        && grep -q "mdev $src (mtty-2, vendor driver mtty 0.1): moves" /tmp/plan.out \
        && pass "migrate plan: $(head -2 /tmp/plan.out | tr '\n' ' ')" || fail "migrate plan: $(cat /tmp/plan.out)"
    ./vfctl migrate check --vm mig --to unix:path=/tmp/bus/socket > /tmp/check.out 2>&1 \
        && pass "migrate check: the destination's daemon has room for VM mig's mdev, same driver version: $(cat /tmp/check.out)" \
        || fail "migrate check: $(cat /tmp/check.out)"
    # A destination that cannot take the state (an mtty-1 for the mtty-2 source) is
    # refused before any state moves; the source runs on, untouched.
    unlike=6e000000-0000-4000-8000-0000000000d1
    ./vfctl mdev create --parent mtty --type mtty-1 --uuid $unlike > /dev/null 2>&1
    out=$(./vfctl migrate prepare-vm --lease $lease --uuid $unlike 2>&1)
    [ $? = 3 ] && [ "$(lease_mdev $lease)" = $src ] && [ "$(scratch a)" = a5 ] \
        && pass "prepare-vm refuses a destination of another type before any state moves, the source runs on: $out" \
        || fail "prepare-vm with an mtty-1 destination: $out"
    ./vfctl mdev remove $unlike > /dev/null 2>&1
    dst=$(./vfctl migrate prepare-vm --lease $lease 2>&1) && [ -e /sys/bus/mdev/devices/$dst ] \
        && pass "migrate prepare-vm: lease $lease's destination $dst made before any state moves" || { fail "prepare-vm: $dst"; return; }
    qmp_vm b $(migratable_mdev $dst) -incoming tcp:127.0.0.1:4444
    for i in $(seq 1 50); do grep -q return /tmp/monb.log && break; sleep 0.2; done
    result=$(migrate a)
    for i in $(seq 1 20); do [ -n "$(scratch b)" ] && break; sleep 0.5; done
    echo "$result" | grep -q '"status": "completed"' && [ "$(scratch b)" = a5 ] \
        && pass "a running nested VM live-migrated with its mtty mdev; its guest reads back a5 from the device on the destination ($result)" \
        || { fail "live migration: $result, the destination's guest reads '$(scratch b)'"; tail -5 /tmp/a.log /tmp/b.log; }
    expect "commit is refused while the source VMM still holds the mdev" 3 ./vfctl migrate commit --lease $lease
    qmp a '{"execute":"quit"}'
    for i in $(seq 1 50); do [ -n "$(pids_with "mdev/devices/$src")" ] || break; sleep 0.2; done
    ./vfctl migrate commit --lease $lease > /tmp/commit.out 2>&1
    [ "$(lease_mdev $lease)" = "$dst" ] && [ ! -e /sys/bus/mdev/devices/$src ] \
        && pass "migrate commit: lease $lease holds $dst under the same id; the source mdev is removed" \
        || { fail "commit: $(cat /tmp/commit.out)"; ./vfctl leases; }
    # The failure path: the VM (now b) towards a third QEMU, killed midway.
    third=$(./vfctl migrate prepare-vm --lease $lease 2>&1)
    qmp_vm c $(migratable_mdev $third) -incoming tcp:127.0.0.1:4444
    for i in $(seq 1 50); do grep -q return /tmp/monc.log && break; sleep 0.2; done
    # At 1 MiB/s the guest's memory takes seconds to send: the kill lands midway
    # (at full speed the migration can complete within the second).
    qmp b '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1048576}}'
    qmp b '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4444"}}'
    sleep 1
    kill -9 $(pids_with "mdev/devices/$third") 2>/dev/null
    for i in $(seq 1 60); do qmp b '{"execute":"query-migrate"}'; sleep 0.5; grep -q '"status": "\(failed\|completed\)"' /tmp/monb.log && break; done
    qmp b '{"execute":"query-status"}'
    sleep 3
    ./vfctl migrate abort --lease $lease > /tmp/abort.out 2>&1
    grep -q '"status": "running"' /tmp/monb.log && [ ! -e /sys/bus/mdev/devices/$third ] \
        && [ "$(lease_mdev $lease)" = "$dst" ] && [ "$(scratch b)" = a5 ] \
        && pass "the destination killed midway: the source runs on with its state, abort removes the destination, the lease is unchanged" \
        || { fail "the failure path: $(grep -o '"status": "[a-z-]*"' /tmp/monb.log | tail -2 | tr '\n' ' '); $(cat /tmp/abort.out)"; ./vfctl leases; }
    # The daemon SIGKILLed in a hand-over: the VM (b) migrates to a fourth QEMU, b
    # quits, and the daemon dies before the commit. At its start it finishes the
    # hand-over (only the destination is held open): one lease, on the destination.
    qmp b '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1073741824}}'
    fourth=$(./vfctl migrate prepare-vm --lease $lease 2>&1)
    qmp_vm d $(migratable_mdev $fourth) -incoming tcp:127.0.0.1:4444
    for i in $(seq 1 50); do grep -q return /tmp/mond.log && break; sleep 0.2; done
    done0=$(grep -c '"status": "completed"' /tmp/monb.log)
    qmp b '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4444"}}'
    for i in $(seq 1 120); do
        qmp b '{"execute":"query-migrate"}'; sleep 1
        [ "$(grep -c '"status": "completed"' /tmp/monb.log)" -gt "$done0" ] && break
    done
    qmp b '{"execute":"quit"}'
    for i in $(seq 1 50); do [ -n "$(pids_with "mdev/devices/$dst")" ] || break; sleep 0.2; done
    kill -9 $daemon; wait $daemon 2>/dev/null
    start_daemon || fail "the daemon restarted after SIGKILL"
    for i in $(seq 1 20); do [ -n "$(scratch d)" ] && break; sleep 0.5; done
    [ "$(lease_mdev $lease)" = "$fourth" ] && [ ! -e /sys/bus/mdev/devices/$dst ] \
        && [ "$(./vfctl leases | grep -c ' for VM mig ')" = 1 ] && [ "$(scratch d)" = a5 ] \
        && pass "the daemon SIGKILLed before the commit: at start it finished the hand-over, one lease holds $fourth, $dst is removed, the guest reads a5 there" \
        || { fail "the hand-over after SIGKILL: the guest reads '$(scratch d)'"; ./vfctl leases; grep "recovery" /tmp/daemon.log; }
    qmp d '{"execute":"quit"}'
    sleep 1
    expect "the migrated VM's lease is released" 0 ./vfctl release --request-id mig
}

# The daemon on the real kernel, through a real dbus-daemon: provision and release
# real VFs over D-Bus, and follow uevents for changes made behind its back.
start_bus bus
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/bus/socket
# Desired state: 2 NVMe VFs restored at start (boot restore on the real kernel).
# Every lease passes the DMA-mapping probe first (memory mapped and unmapped for it
# through the emulated IOMMU, with vfio-ioctls and vm-memory).
# The daemon also manages the virtio-rng (PCIe errors, hot removal).
sed 's/^manage = \[/manage = ["0000:04:00.0", /' /tmp/config.toml > /tmp/daemon.toml
printf '[[pf]]\naddress = "0000:02:00.0"\nvfs = 2\n[daemon]\ndma_probe = true\ndegraded_correctable_per_hour = 5\nprobe_interval_s = 5\n' >> /tmp/daemon.toml
# Usage thresholds for a nested VM's ping on an emulated NIC, in seconds.
printf '[usage]\nnet_full_bytes_per_s = 20000\nbusy_alert_percent = 50\nbusy_alert_for_s = 0\nidle_for_s = 3\n' >> /tmp/daemon.toml
# start_daemon: vfio-managerd on that bus (its pid in $daemon), answering within 10 s.
start_daemon() {
    ./vfio-managerd --config /tmp/daemon.toml --state-dir /tmp/state --audit-log /tmp/state/audit.log >> /tmp/daemon.log 2>&1 &
    daemon=$!
    for i in $(seq 1 100); do ./vfctl leases > /dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}
start_daemon && pass "daemon up on a real dbus-daemon" || { fail "daemon up on a real dbus-daemon"; cat /tmp/bus.log /tmp/daemon.log; }
[ "$(cat /sys/bus/pci/devices/0000:02:00.0/sriov_numvfs)" = 2 ] && [ ! -e /sys/bus/pci/devices/0000:02:00.1/driver ] \
    && pass "daemon restored 2 NVMe VFs at start, autoprobe off" || { fail "boot restore"; cat /tmp/daemon.log; }
./vfctl provision --vm nested-1 --profile 8086:10c9 --count 2 --request-id r1 -o json > /tmp/lease.json 2>&1
vfs=$(grep -o '"address": "[^"]*"' /tmp/lease.json | cut -d'"' -f4)
n=0; for v in $vfs; do [ "$(basename "$(readlink /sys/bus/pci/devices/$v/driver)")" = vfio-pci ] && n=$((n+1)); done
[ $n = 2 ] && pass "daemon provisions 2 real VFs on vfio-pci over D-Bus, each past the DMA-mapping probe ($(echo $vfs))" || { fail "daemon provision"; cat /tmp/lease.json /tmp/daemon.log; }
./vfctl provision --vm nested-1 --profile 8086:10c9 --count 2 --request-id r1 -o json > /tmp/lease2.json 2>&1
cmp -s /tmp/lease.json /tmp/lease2.json && pass "the same request id returns the same lease" || fail "idempotent provision"
expect "daemon refuses unbinding a leased VF" 3 ./vfctl unbind $(echo $vfs | cut -d' ' -f1)
expect "daemon releases the lease" 0 ./vfctl release --request-id r1
n=0; for v in $vfs; do [ "$(basename "$(readlink /sys/bus/pci/devices/$v/driver 2>/dev/null)")" != vfio-pci ] && n=$((n+1)); done
[ $n = 2 ] && pass "released VFs are off vfio-pci" || fail "released VFs are off vfio-pci"
# Named devices, and libvirt's hook, on the real kernel.
v1=$(echo $vfs | cut -d' ' -f1)
expect "daemon leases a named VF" 0 ./vfctl provision --vm named --device $v1 --request-id r2
out=$(./vfctl provision --vm other --device $v1 --request-id r3 2>&1)
[ $? = 3 ] && echo "$out" | grep -q "leased to VM named" && pass "a named VF another VM holds is refused by name" || fail "named VF refusal: $out"
expect "the named VF's lease is released" 0 ./vfctl release --request-id r2
# Health on the real kernel: the probe reads real configuration space (a VF's ids
# may read all ones; its command/status must not fail it).
./vfctl health > /tmp/health.txt 2>&1 && grep -q "^$v1 *healthy" /tmp/health.txt && ! grep -qE ' (failed|degraded) ' /tmp/health.txt \
    && pass "vfctl health: the igb VFs are healthy" || { fail "vfctl health"; cat /tmp/health.txt; }
expect "an operator quarantines a VF" 0 ./vfctl quarantine $v1 --reason "real-kernel check"
expect "a quarantined VF is refused to a lease" 3 ./vfctl provision --vm q --device $v1 --request-id rq
expect "clear probes the real VF and offers it again" 0 ./vfctl clear $v1
dom="<domain type='kvm'><name>hooked</name><uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid><devices><hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0x$(echo $v1 | cut -c6-7)' slot='0x$(echo $v1 | cut -c9-10)' function='0x$(echo $v1 | cut -c12)'/></source></hostdev></devices></domain>"
echo "$dom" | ./vfio-manager-hook hooked prepare begin - && [ "$(basename "$(readlink /sys/bus/pci/devices/$v1/driver)")" = vfio-pci ] \
    && pass "libvirt hook: prepare leases the domain's hostdev $v1 on vfio-pci" || { fail "hook prepare"; cat /tmp/daemon.log; }
echo "$dom" | ./vfio-manager-hook hooked release end - && [ "$(basename "$(readlink /sys/bus/pci/devices/$v1/driver 2>/dev/null)")" != vfio-pci ] \
    && ! ./vfctl leases | grep -q hooked && pass "libvirt hook: release returns it" || fail "hook release"
# A change behind the daemon's back reaches its table through uevents.
./vfctl list | grep -q '^0000:02:00.2 ' || fail "restored NVMe VFs in the daemon's table"
echo 0 > /sys/bus/pci/devices/0000:02:00.0/sriov_numvfs
gone=0
for i in $(seq 1 50); do ./vfctl list | grep -q '^0000:02:00.2 ' || { gone=1; break; }; sleep 0.1; done
[ $gone = 1 ] && pass "uevents: VFs removed by hand leave the daemon's table" || { fail "uevents"; ./vfctl list; }
# End to end: a nested VM gets the VF its lease names and its kernel binds igbvf.
# QEMU with KVM (nested SVM) gets the lease's -device arguments as libvirt passes a
# <hostdev>; cloud-hypervisor, where a binary was given, cold and hot-plugged.
# The igb PF's link up: its VFs' links follow it (the nested guest's traffic).
pfnet=$(ls /sys/bus/pci/devices/0000:01:00.0/net 2>/dev/null | head -1)
[ -n "$pfnet" ] && ip link set "$pfnet" up
nested_vms
pcie_errors
vm_migration
expect "daemon disables the igb VFs it enabled" 0 ./vfctl disable 0000:01:00.0
kill $daemon; wait $daemon 2>/dev/null
grep -q 'vfio-manager: stopping' /tmp/daemon.log && pass "daemon stops on SIGTERM" || { fail "daemon stops on SIGTERM"; cat /tmp/daemon.log; }
unset DBUS_SYSTEM_BUS_ADDRESS

# The mediated path through two daemons, each on its own bus (as on two hosts):
# mdevs over D-Bus, a lease of an mdev profile, and mtty state moved from daemon A's
# mdev to daemon B's over TCP, an incompatible destination refused first.
start_bus bus2
mkdir -m 700 -p /tmp/pki && cp /mnt/host/pki/cacert.pem /mnt/host/pki/cert.pem /mnt/host/pki/key.pem /tmp/pki/
p=/tmp/pki; printf '[migration]\nca = "%s"\nserver_cert = "%s"\nserver_key = "%s"\nclient_cert = "%s"\nclient_key = "%s"\n' \
    $p/cacert.pem $p/cert.pem $p/key.pem $p/cert.pem $p/key.pem >> /tmp/config.toml
A="env DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/bus/socket ./vfctl"
B="env DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/bus2/socket ./vfctl"
./vfio-managerd --config /tmp/config.toml --state-dir /tmp/stateA --audit-log /tmp/stateA/audit.log --bus-address unix:path=/tmp/bus/socket > /tmp/dA.log 2>&1 &
dA=$!
sleep 0.2
./vfio-managerd --config /tmp/config.toml --state-dir /tmp/stateB --audit-log /tmp/stateB/audit.log --bus-address unix:path=/tmp/bus2/socket > /tmp/dB.log 2>&1 &
dB=$!
up=0
for i in $(seq 1 100); do $A leases > /dev/null 2>&1 && $B leases > /dev/null 2>&1 && { up=1; break; }; sleep 0.1; done
[ $up = 1 ] && pass "two daemons up, each on its own bus" || { fail "two daemons up"; cat /tmp/dA.log /tmp/dB.log /tmp/bus2.log; }
src=5a5a0000-0000-4000-8000-000000000001
dst=5a5a0000-0000-4000-8000-000000000002
expect "daemon creates an mtty mdev over D-Bus" 0 $A mdev create --parent mtty --type mtty-2 --uuid $src
./mtty-scratch $src 5a && [ "$(./mtty-scratch $src)" = 5a ] && pass "state written into the source mdev through VFIO" || fail "mtty-scratch on the source"
expect "migrate check says the mtty mdev can migrate" 0 $A migrate check $src
gone() { for i in $(seq 1 100); do [ ! -e /sys/bus/mdev/devices/$1 ] && return 0; sleep 0.1; done; return 1; }
ep=$($B migrate receive $dst --type mtty-1 --listen 127.0.0.1:0)
$A migrate send $src "$ep" > /tmp/mig.out 2>&1 && fail "an mtty-2 state into an mtty-1 was accepted" \
    || { grep -q incompatible /tmp/mig.out && gone $dst && $A migrate check $src > /dev/null && [ "$(./mtty-scratch $src)" = 5a ] \
        && pass "an incompatible destination is refused, its mdev made for it removed; the source runs with its state" \
        || { fail "incompatible destination"; cat /tmp/mig.out /tmp/dB.log; }; }
ep=$($B migrate receive $dst --type mtty-2 --listen 127.0.0.1:0)
if $A migrate send $src "$ep" > /tmp/mig.out 2>&1; then
    v=; for i in $(seq 1 100); do v=$(./mtty-scratch $dst 2>/dev/null) && break; sleep 0.1; done
    [ "$v" = 5a ] && pass "mtty state moved from daemon A's mdev to daemon B's over TCP" || fail "state after migration: got '$v'"
    echo "GUEST-INFO $(cat /tmp/mig.out)"
else
    fail "migration between two daemons"; cat /tmp/mig.out /tmp/dA.log /tmp/dB.log
fi
# And back, with credentials made for this one migration instead of the PKI's.
back=5a5a0000-0000-4000-8000-000000000003
ep=$($A migrate receive $back --type mtty-2 --listen 127.0.0.1:0 --credentials-out /tmp/once.pem)
[ "$(stat -c %a /tmp/once.pem)" = 600 ] && pass "one-time credentials are written for the caller alone" || fail "one-time credentials mode"
if $B migrate send $dst "$ep" --credentials /tmp/once.pem > /tmp/mig.out 2>&1; then
    v=; for i in $(seq 1 100); do v=$(./mtty-scratch $back 2>/dev/null) && break; sleep 0.1; done
    [ "$v" = 5a ] && pass "mtty state moved back from daemon B to A with one-time credentials" || fail "state after one-time migration: got '$v'"
else
    fail "migration with one-time credentials"; cat /tmp/mig.out /tmp/dA.log /tmp/dB.log
fi
expect "daemon A removes the source mdev" 0 $A mdev remove $src
expect "daemon A removes the mdev migrated back" 0 $A mdev remove $back
expect "daemon B removes the destination mdev" 0 $B mdev remove $dst
$A provision --vm mvm --profile mtty-1 --count 2 --request-id m1 --format libvirt > /tmp/mlease.xml 2>&1
n=$(grep -o 'type="mdev"' /tmp/mlease.xml | wc -l); u1=$(grep -o 'uuid="[^"]*"' /tmp/mlease.xml | head -1 | cut -d'"' -f2)
[ "$n" = 2 ] && [ -e /sys/bus/mdev/devices/$u1/driver ] && pass "a lease of profile mtty-1 creates 2 bound mdevs as libvirt mdev hostdevs" || { fail "mdev lease"; cat /tmp/mlease.xml; }
# A swap of one of its mdevs for a new one of the profile (no VMM to reach here).
out=$($A replace $u1 --reason "real-kernel swap" 2>&1)
u3=$(echo "$out" | grep -o 'replaced by [0-9a-f-]*' | cut -d' ' -f3)
[ -n "$u3" ] && [ -e /sys/bus/mdev/devices/$u3/driver ] && $A leases | grep -q "$u3" && ! $A leases | grep -q "$u1" \
    && $A health | grep "^$u1" | grep -q quarantined \
    && pass "vfctl replace swaps a leased mtty mdev for a new bound one; the old one is held back" || { fail "mdev swap: $out"; $A leases; }
expect "releasing it" 0 $A release --request-id m1
gone $u3 && pass "its release removes the mdevs it holds" || fail "mdev lease release"
expect "the swapped-out mdev is freed (removed)" 0 $A orphan free $u1
gone $u1 || fail "the swapped-out mdev is removed"
# A domain naming its own mdev: the hook leases exactly that UUID (made here).
mu=5a5a0000-0000-4000-8000-0000000000d1
mdom="<domain type='kvm'><name>mdomain</name><uuid>5dea22b3-1d52-d8f3-2516-782e98ab3fa1</uuid><metadata><vfm:lease xmlns:vfm='http://vfio-manager.org/xmlns/lease/1' profile='mtty-1' count='1'/></metadata><devices><hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='$mu'/></source></hostdev></devices></domain>"
echo "$mdom" | DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/bus/socket ./vfio-manager-hook mdomain prepare begin - && [ -e /sys/bus/mdev/devices/$mu/driver ] \
    && pass "libvirt hook: prepare makes the domain's mdev $mu" || { fail "hook mdev prepare"; cat /tmp/dA.log; }
echo "$mdom" | DBUS_SYSTEM_BUS_ADDRESS=unix:path=/tmp/bus/socket ./vfio-manager-hook mdomain release end - && gone $mu \
    && pass "libvirt hook: release removes it" || fail "hook mdev release"
kill $dA $dB; wait $dA $dB 2>/dev/null

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
