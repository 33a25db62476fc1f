#!/bin/busybox sh
# shellcheck shell=sh
# /init of builder's netboot initramfs (busybox). It brings up the network, fetches the root squashfs
# over HTTP, checks its sha256 against the one the node's boot script names, mounts it read-only under
# a tmpfs overlay and hands over to the root's node-init. Bad data is never booted: a mismatch is
# reported on the console and the download is retried; after builder.retries attempts the node reboots.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /run /tmp /newroot
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
exec </dev/console >/dev/console 2>&1

say() { echo "builder-initrd: $*"; }
give_up() {
    say "FATAL: $*"
    say "not booting; rebooting in 30 s to try again from the network"
    sleep 30
    reboot -f
}

ROOT_URL="" ROOT_SHA="" RETRIES=5 BOOTIF=""
read -r cmdline </proc/cmdline
for word in $cmdline; do
    case "$word" in
        builder.root=*) ROOT_URL=${word#*=} ;;
        builder.sha256=*) ROOT_SHA=${word#*=} ;;
        builder.retries=*) RETRIES=${word#*=} ;;
        BOOTIF=*) BOOTIF=${word#*=} ;;
    esac
done
[ -n "$ROOT_URL" ] || give_up "no builder.root=URL on the kernel command line"
[ ${#ROOT_SHA} -eq 64 ] || give_up "no builder.sha256=HEX (64 digits) on the kernel command line"
say "kernel $(uname -r), root $ROOT_URL"

while read -r module; do
    insmod "/lib/modules/$module" 2>/dev/null || say "could not load ${module##*/}"
done </etc/builder/modules

# The interface the node booted from (iPXE passes BOOTIF=01-aa-bb-...), else every interface in turn.
want=""
if [ -n "$BOOTIF" ]; then
    want=$(echo "${BOOTIF#01-}" | tr '-' ':' | tr 'A-F' 'a-f')
fi
ifaces=""
for _ in 1 2 3 4 5 6 7 8 9 10; do
    for dev in /sys/class/net/*; do
        name=${dev##*/}
        [ "$name" = lo ] && continue
        if [ -z "$want" ] || [ "$(cat "$dev/address")" = "$want" ]; then ifaces="$ifaces $name"; fi
    done
    [ -n "$ifaces" ] && break
    sleep 1
done
[ -n "$ifaces" ] || give_up "no network interface found${want:+ with address $want}"

mkdir -p /run/builder
ip link set lo up
for name in $ifaces; do
    ip link set "$name" up
    if udhcpc -i "$name" -n -q -t 5 -T 2 -s /etc/builder/udhcpc.sh >/dev/null 2>&1; then break; fi
    say "no DHCP lease on $name"
done
[ -f /run/builder/net.env ] || give_up "no DHCP lease on any of:$ifaces"
# shellcheck disable=SC1091  # written by udhcpc.sh just above
. /run/builder/net.env
say "network: $NODE_IFACE $NODE_IP/$NODE_PREFIX"

image=/run/builder/root.squashfs
attempt=1
while :; do
    if wget -q -O "$image" "$ROOT_URL"; then
        got=$(sha256sum "$image" | cut -d' ' -f1)
        [ "$got" = "$ROOT_SHA" ] && break
        say "root image sha256 mismatch: got $got, expected $ROOT_SHA (attempt $attempt of $RETRIES)"
    else
        say "download of $ROOT_URL failed (attempt $attempt of $RETRIES)"
    fi
    rm -f "$image"
    [ "$attempt" -ge "$RETRIES" ] && give_up "no valid root image after $RETRIES attempts"
    sleep $((attempt < 5 ? attempt * 2 : 10))
    attempt=$((attempt + 1))
done
say "root image verified: sha256 $ROOT_SHA"

mkdir -p /run/builder/lower /run/builder/rw/upper /run/builder/rw/work
mount -t squashfs -o ro,loop "$image" /run/builder/lower || give_up "cannot mount the root image"
mount -t overlay overlay \
    -o lowerdir=/run/builder/lower,upperdir=/run/builder/rw/upper,workdir=/run/builder/rw/work /newroot ||
    give_up "cannot mount the overlay"
mkdir -p /newroot/dev /newroot/run /newroot/proc /newroot/sys
mount --move /dev /newroot/dev
mount --move /run /newroot/run
umount /proc /sys
exec switch_root /newroot /usr/lib/builder/node-init
