# Sourced by the guest jobs: what more than one of them needs.

# The C library and libudev the project's binaries link (run.sh copies the host's),
# where their loader looks. The emulated host's own initramfs has no libc.
if [ -d /mnt/host/lib ] && [ ! -e /lib64/ld-linux-x86-64.so.2 ]; then
    mkdir -p /lib64 /lib/x86_64-linux-gnu
    cp /mnt/host/lib/* /lib/x86_64-linux-gnu/
    ln -s /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
fi

pass() { echo "GUEST-PASS $*"; }
fail() { echo "GUEST-FAIL $*"; }
expect() { # expect NAME WANTED-EXIT COMMAND...
    name=$1; want=$2; shift 2
    "$@" > /tmp/out 2>&1; got=$?
    if [ "$got" = "$want" ]; then pass "$name"; else fail "$name (exit $got, wanted $want)"; cat /tmp/out; fi
}

# watched SECONDS COMMAND...: runs COMMAND; if it still runs after SECONDS, prints
# where each of its threads waits in the kernel, and the kernel's blocked tasks,
# before the host's timeout ends the boot. A scenario has been seen blocked in the
# kernel once (hung-task reports, no stacks on the quiet console): the kept log of
# such a boot then says where.
watched() {
    limit=$1; shift
    "$@" &
    pid=$!
    (
        # Its own sleep dies with it, and holds no pipe COMMAND's output goes to.
        sleep "$limit" > /dev/null 2>&1 &
        s=$!
        trap 'kill $s 2>/dev/null; exit 0' TERM
        wait $s
        [ -d "/proc/$pid" ] || exit 0
        echo "GUEST-HUNG $* still runs after ${limit}s; its threads' kernel stacks:"
        for t in /proc/$pid/task/*; do
            echo "thread $(cat "$t/comm") $(grep '^State:' "$t/status")"
            cat "$t/stack"
        done
        echo w > /proc/sysrq-trigger
        echo "the kernel's log, blocked tasks last:"
        dmesg | tail -n 120
    ) &
    dog=$!
    wait $pid
    rc=$?
    kill $dog 2>/dev/null
    return $rc
}

# nested_sees LOG WHAT: the nested VM's report in LOG (images/nested-init) lists the
# igb VF bound to igbvf.
nested_sees() {
    if grep -q "^NESTED-PCI .* 8086:10ca igbvf" "$1"; then
        pass "$2 ($(grep -o 'uptime .*' "$1"))"
    else
        fail "$2"; cat "$1"
    fi
}

# inject N COMMAND: asks the emulated host's QEMU to run monitor COMMAND
# (`pcie_aer_inject_error ...` or `device_del ID`, through run.sh's inject.py) and
# prints its answer. N names the request: one answer file each.
inject() {
    n=$1; shift
    # To the console even when the caller keeps the answer (stdout).
    echo "GUEST-INJECT $n $*" >&2
    for i in $(seq 1 300); do [ -e /mnt/host/out/injected-$n ] && break; sleep 0.1; done
    cat /mnt/host/out/injected-$n 2>/dev/null || echo "no answer from the host's monitor"
}

# aer_report N DEV UNCOR COR: N errors reported for DEV through the kernel's own
# injector (aer_inject: its AER handler reads them from DEV's AER capability as
# from hardware). UNCOR and COR are the status words as 4 hex bytes, least
# significant first (00400000 is 0x4000, Completion Timeout, non-fatal; 01000000
# is 1, Receiver Error, correctable). The 32-byte record: bus, device, function,
# a pad byte, the uncorrectable status, the correctable status, four header-log
# words, the domain.
aer_report() {
    o() { printf "\\$(printf %03o "0x$1")"; }
    le() { for b in $(echo $1 | sed 's/../& /g'); do o $b; done; }
    { o $(echo $2 | cut -c6-7); o $(echo $2 | cut -c9-10); o $(echo $2 | cut -c12); o 00
      le $3; le $4; head -c 20 /dev/zero; } > /tmp/einj
    for i in $(seq 1 $1); do dd if=/tmp/einj of=/dev/aer_inject bs=32 count=1 2>&1 | grep -v records; done
}

# start_bus NAME: a dbus-daemon (the host's, with its own libraries: the guest has
# no libc) with a system-bus configuration listening on /tmp/NAME/socket.
start_bus() {
    [ -d /tmp/dbus ] || cp -r /mnt/host/dbus /tmp/dbus
    # dbus-daemon looks its own uid up: the initramfs has no account files.
    [ -e /etc/passwd ] || { echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd; echo 'root:x:0:' > /etc/group; }
    mkdir -p /tmp/$1
    cat > /tmp/$1.conf <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path=/tmp/$1/socket</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/>
<allow receive_type="method_call"/><allow receive_type="method_return"/><allow receive_type="error"/><allow receive_type="signal"/></policy></busconfig>
CONF
    /tmp/dbus/lib/ld-linux-x86-64.so.2 --library-path /tmp/dbus/lib /tmp/dbus/dbus-daemon --config-file=/tmp/$1.conf --nofork --nopidfile > /tmp/$1.log 2>&1 &
}

# The nested VM (QEMU/KVM) with the lease's arguments in /tmp/n1.args, the kernel
# and initramfs in NESTED_KERNEL and more kernel words in NESTED_CMDLINE; its log
# (/tmp/nested.log) ends with QEMU's exit status.
NESTED_KERNEL="-kernel /tmp/vmlinuz -initrd /tmp/nested-initramfs.cpio.gz"
# qmp_vm NAME ARGS...: a nested QEMU/KVM VM in the background, its QMP monitor on
# the pipes /tmp/monNAME.{in,out} (the emulated host has no QMP client; `qmp`
# writes a command, /tmp/monNAME.log collects the answers), its console in
# /tmp/NAME.console, QEMU's messages in /tmp/NAME.log. Its guest binds no driver to
# an mtty port, writes a5 to the port's scratch register and reads it back each
# second (nested-init scratch=HH): the device state a live migration must carry.
qmp_vm() {
    n=$1; shift
    rm -f /tmp/mon$n.in /tmp/mon$n.out /tmp/$n.console
    mkfifo /tmp/mon$n.in /tmp/mon$n.out
    /tmp/qemu/lib/ld-linux-x86-64.so.2 --library-path /tmp/qemu/lib /tmp/qemu/qemu-system-x86_64 \
        -L /tmp/qemu/share -machine q35 -accel kvm -cpu host -m 256M -smp 1 -nodefaults -display none -no-reboot \
        -kernel /tmp/vmlinuz -initrd /tmp/nested-initramfs.cpio.gz -serial file:/tmp/$n.console \
        -append "console=ttyS0 panic=-1 quiet initcall_blacklist=serial_pci_driver_init scratch=a5" \
        -chardev pipe,id=mon0,path=/tmp/mon$n -mon chardev=mon0,mode=control "$@" > /tmp/$n.log 2>&1 &
    cat /tmp/mon$n.out > /tmp/mon$n.log &
    qmp $n '{"execute":"qmp_capabilities"}'
}
# qmp NAME JSON: one QMP command to VM NAME (given up after 10 s if it never opened
# its monitor).
qmp() { echo "$2" | timeout 10 tee /tmp/mon$1.in > /dev/null; }
# migratable_mdev UUID: QEMU's device for mdev UUID with VFIO migration on. Dirty
# pages are tracked by the VFIO container (type1), not the device: the kernel's
# device DMA-logging report needs IOMMUFD_DRIVER, which Debian's 6.12 lacks, and
# mtty offers DMA logging, so QEMU would otherwise fail the migration at its setup
# (docs/kernel.md).
migratable_mdev() {
    echo "-device vfio-pci,sysfsdev=/sys/bus/mdev/devices/$1,enable-migration=on,x-device-dirty-page-tracking=off"
}
# migrate NAME: VM NAME migrates to the VM listening on tcp:127.0.0.1:4444; waits
# until QEMU says it ended and prints its status, downtime and total time (ms).
migrate() {
    qmp $1 '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4444"}}'
    for i in $(seq 1 120); do
        qmp $1 '{"execute":"query-migrate"}'
        sleep 1
        grep -q '"status": "\(completed\|failed\|cancelled\)"' /tmp/mon$1.log && break
    done
    grep -o '"status": "[a-z-]*"\|"error-desc": "[^"]*"\|"downtime": [0-9]*\|"total-time": [0-9]*' /tmp/mon$1.log | tail -3 | tr '\n' ' '
}
# pids_with TEXT: the processes whose command line holds TEXT (busybox has no pgrep).
pids_with() { for p in /proc/[0-9]*; do { tr '\0' ' ' < $p/cmdline; } 2>/dev/null | grep -q -- "$1" && echo ${p#/proc/}; done; }
# lease_mdev LEASE: the first mdev lease LEASE holds (VFCTL: how to run vfctl).
lease_mdev() {
    ${VFCTL:-./vfctl} leases | sed -n "/^lease $1 /,/^lease /p" | grep -v '^lease ' \
        | grep -o '[0-9a-f]\{8\}-[0-9a-f]\{4\}-[0-9a-f]\{4\}-[0-9a-f]\{4\}-[0-9a-f]\{12\}' | head -1
}
# scratch NAME: what VM NAME's guest last read from the scratch register.
scratch() { grep -o 'NESTED-SCRATCH [0-9a-f]*' /tmp/$1.console 2>/dev/null | tail -1 | cut -d' ' -f2; }

nested_qemu() {
    t0=$(date +%s)
    timeout 240 /tmp/qemu/lib/ld-linux-x86-64.so.2 --library-path /tmp/qemu/lib /tmp/qemu/qemu-system-x86_64 \
        -L /tmp/qemu/share -machine q35 -accel kvm -cpu host -m 256M -smp 1 -nodefaults -display none \
        -serial stdio -no-reboot $NESTED_KERNEL -append "console=ttyS0 panic=-1 quiet $NESTED_CMDLINE" \
        $(cat /tmp/n1.args) < /dev/null > /tmp/nested.log 2>&1
    echo "NESTED-EXIT status $? after $(($(date +%s) - t0)) s" >> /tmp/nested.log
}
