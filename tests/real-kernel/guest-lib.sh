# Sourced by the guest jobs: what more than one of them needs.

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
