#!/bin/busybox sh
# shellcheck shell=sh
# /init of builder's netboot initramfs (busybox). It brings up the network, takes the root squashfs from
# the node's cache disk or fetches it over HTTP (hashed on the way in against the sha256 the node's boot
# script names), opens it through dm-verity with the script's root hash, mounts it read-only under a tmpfs
# overlay and hands over to the root's systemd (builder/netboot/nodeunits.py: the node's units). Bad data is never booted: a download that mismatches is
# retried, a cached root that fails dm-verity is dropped and fetched again; after builder.retries attempts
# the node reboots. Without a cache disk the root is held in RAM (tmpfs), as before. Before any of that, the
# node's firewall (nftables rules from the inventory, named by sha256 like the root) is fetched, checked and
# loaded: rules that do not load stop the boot here, so the role never listens unprotected.
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

ROOT_URL="" ROOT_SHA="" ROOT_SIZE=0 RETRIES=5 BOOTIF="" VERITY="" VERITY_SALT="" VERITY_BLOCKS=0
CACHE="" CACHE_WIPE=0 RAM_SHARE=50 MODELS="" FIREWALL_URL="" FIREWALL_SHA=""
BOOT_MTU="" DATA_IF="" DATA_MAC="" DATA_ADDRESS="" DATA_MTU=""
read -r cmdline </proc/cmdline
for word in $cmdline; do
    case "$word" in
        builder.root=*) ROOT_URL=${word#*=} ;;
        builder.sha256=*) ROOT_SHA=${word#*=} ;;
        builder.size=*) ROOT_SIZE=${word#*=} ;;
        builder.verity=*) VERITY=${word#*=} ;;
        builder.verity_salt=*) VERITY_SALT=${word#*=} ;;
        builder.verity_blocks=*) VERITY_BLOCKS=${word#*=} ;;
        builder.cache=*) CACHE=${word#*=} ;;
        builder.cache_wipe=*) CACHE_WIPE=${word#*=} ;;
        builder.ram_share=*) RAM_SHARE=${word#*=} ;;
        builder.models=*) MODELS=${word#*=} ;;
        builder.retries=*) RETRIES=${word#*=} ;;
        builder.firewall=*) FIREWALL_URL=${word#*=} ;;
        builder.firewall_sha256=*) FIREWALL_SHA=${word#*=} ;;
        builder.mtu=*) BOOT_MTU=${word#*=} ;;
        builder.data_if=*) DATA_IF=${word#*=} ;;
        builder.data_mac=*) DATA_MAC=${word#*=} ;;
        builder.data_address=*) DATA_ADDRESS=${word#*=} ;;
        builder.data_mtu=*) DATA_MTU=${word#*=} ;;
        BOOTIF=*) BOOTIF=${word#*=} ;;
    esac
done
# builder checked these when it wrote them; the shapes are checked again before they reach `ip`
case "$BOOT_MTU$DATA_MTU" in *[!0-9]*) give_up "builder.mtu= or builder.data_mtu= is not a number" ;; esac
case "$DATA_IF$DATA_MAC" in *[!A-Za-z0-9_.:-]*) give_up "builder.data_if= or builder.data_mac= is not an interface" ;; esac
case "$DATA_ADDRESS" in *[!0-9A-Fa-f.:/]*) give_up "builder.data_address= is not ADDRESS/PREFIX" ;; esac
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
        mac=$(cat "$dev/address")
        # without BOOTIF, every interface but the data network's
        [ -z "$want" ] && { [ "$name" = "$DATA_IF" ] || [ "$mac" = "$DATA_MAC" ]; } && continue
        if [ -z "$want" ] || [ "$mac" = "$want" ]; then ifaces="$ifaces $name"; fi
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
if [ -n "$BOOT_MTU" ]; then
    ip link set dev "$NODE_IFACE" mtu "$BOOT_MTU" || give_up "$NODE_IFACE does not take the MTU $BOOT_MTU (builder.mtu)"
fi
say "network: $NODE_IFACE $NODE_IP/$NODE_PREFIX mtu $(cat "/sys/class/net/$NODE_IFACE/mtu")"

# The firewall: downloaded with retries and checked against its sha256 (a bad download reboots, as for the
# root); rules that nft refuses are one line and a node that waits, never starts its role. The rules admit the
# cluster's addresses from the inventory; the node's own leased address is added here (a node without an
# address in cluster.yaml leases one, and its own ready check connects from it).
if [ -n "$FIREWALL_URL" ]; then
    [ ${#FIREWALL_SHA} -eq 64 ] || give_up "builder.firewall= without builder.firewall_sha256=HEX (64 digits)"
    rules=/run/builder/firewall.nft
    attempt=1
    until got=$(wget -q -O "$rules" "$FIREWALL_URL" && sha256sum "$rules") && [ "${got%% *}" = "$FIREWALL_SHA" ]; do
        say "firewall rules: download failed or sha256 mismatch (attempt $attempt of $RETRIES)"
        [ "$attempt" -ge "$RETRIES" ] && give_up "no valid firewall rules after $RETRIES attempts"
        sleep $((attempt < 5 ? attempt * 2 : 10))
        attempt=$((attempt + 1))
    done
    if ! nft -f "$rules" >/run/builder/nft.log 2>&1 ||
        ! nft add element inet builder_cluster cluster4 "{ $NODE_IP }" >>/run/builder/nft.log 2>&1; then
        say "FATAL: the firewall rules did not load ($(grep -m1 -i error /run/builder/nft.log || head -n1 /run/builder/nft.log)): the node's role will not start"
        while :; do sleep 3600; done
    fi
    say "firewall loaded: sha256 $FIREWALL_SHA (new connections only from the cluster's addresses)"
else
    say "no firewall on the kernel command line (a generation published before builder made one)"
fi

# The data network (a node's data_interface: in cluster.yaml): a static address and MTU on the second interface,
# found by name or MAC, once the firewall is loaded. The node's RPC workers bind there (data.env).
if [ -n "$DATA_ADDRESS" ]; then
    data=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        for dev in /sys/class/net/*; do
            name=${dev##*/}
            if [ "$name" = "$DATA_IF" ] || { [ -n "$DATA_MAC" ] && [ "$(cat "$dev/address")" = "$DATA_MAC" ]; }; then
                data=$name
            fi
        done
        [ -n "$data" ] && break
        sleep 1
    done
    [ -n "$data" ] || give_up "no data interface ${DATA_IF:-with address $DATA_MAC} (data_interface: in cluster.yaml)"
    [ "$data" = "$NODE_IFACE" ] && give_up "the data interface $data is the one the node booted from"
    if [ -n "$DATA_MTU" ]; then
        ip link set dev "$data" mtu "$DATA_MTU" || give_up "$data does not take the MTU $DATA_MTU (data_interface.mtu)"
    fi
    if ! ip link set dev "$data" up || ! ip addr add "$DATA_ADDRESS" dev "$data"; then
        give_up "cannot give $data the address $DATA_ADDRESS"
    fi
    echo "DATA_IFACE=$data DATA_IP=${DATA_ADDRESS%/*} DATA_PREFIX=${DATA_ADDRESS#*/}" >/run/builder/data.env
    say "data network: $data $DATA_ADDRESS mtu $(cat "/sys/class/net/$data/mtu")"
fi

# shellcheck disable=SC1091  # in the initramfs
. /etc/builder/cache.sh
mode=ram
if [ -n "$CACHE" ] && [ -n "$VERITY" ] && cache_open "$CACHE" "$ROOT_SIZE" "$CACHE_WIPE"; then
    mode=cache
elif [ -n "$CACHE" ] && [ -z "$VERITY" ]; then
    say "this netboot set has no dm-verity hash tree: the cache disk is not used (RAM mode)"
fi
if [ "$mode" = ram ]; then
    image=/run/builder/root.squashfs
    total=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
    if [ "$ROOT_SIZE" -gt 0 ] && [ $((ROOT_SIZE / 1024)) -gt $((total * RAM_SHARE / 100)) ]; then
        say "WARNING: the root image ($((ROOT_SIZE / 1048576)) MiB) is more than $RAM_SHARE% of this node's" \
            "memory ($((total / 1024)) MiB) and is held in RAM; give the node a cache disk (cache: in cluster.yaml)"
    fi
else
    image=$CACHE_DIR/blobs/sha256/$ROOT_SHA
fi

# Download $ROOT_URL into $image, hashing it on the way in: only a blob with the expected sha256 is kept.
fetch_root() {
    attempt=1
    while :; do
        rm -f /run/builder/wget.failed
        if [ "$mode" = cache ] && ! cache_make_room "$ROOT_SIZE" "$ROOT_SHA"; then
            say "cache: no room for the root image even with every other blob evicted: RAM mode"
            mode=ram image=/run/builder/root.squashfs
        fi
        got=$({ wget -q -O - "$ROOT_URL" || : >/run/builder/wget.failed; } | tee "$image.part" | sha256sum)
        got=${got%% *}
        if [ -f /run/builder/wget.failed ]; then
            say "download of $ROOT_URL failed (attempt $attempt of $RETRIES)"
        elif [ "$got" = "$ROOT_SHA" ]; then
            mv "$image.part" "$image"
            sync  # a cached blob is on the disk before the node runs anything
            say "root image verified: sha256 $ROOT_SHA"
            [ "$mode" = cache ] && say "cache: stored the root image ($((ROOT_SIZE / 1048576)) MiB)"
            return 0
        else
            say "root image sha256 mismatch: got $got, expected $ROOT_SHA (attempt $attempt of $RETRIES)"
        fi
        rm -f "$image.part"
        [ "$attempt" -ge "$RETRIES" ] && give_up "no valid root image after $RETRIES attempts"
        sleep $((attempt < 5 ? attempt * 2 : 10))
        attempt=$((attempt + 1))
    done
}

# Open $image through dm-verity (the kernel checks every block it reads against the root hash) and mount
# the squashfs from it; a set without a hash tree is mounted as it is (its download was hashed).
open_root() {
    loop=$(losetup -f) && losetup -r "$loop" "$image" || return 1
    if [ -z "$VERITY" ]; then
        mount -t squashfs -o ro "$loop" /run/builder/lower && return 0
        losetup -d "$loop"
        return 1
    fi
    table="0 $((VERITY_BLOCKS * 8)) verity 1 $loop $loop 4096 4096 $VERITY_BLOCKS $((VERITY_BLOCKS + 1))"
    dmsetup create builder-root --readonly --noudevsync --table "$table sha256 $VERITY $VERITY_SALT" ||
        { losetup -d "$loop"; return 1; }
    node=/dev/$(dmsetup info -c --noheadings -o blkdevname builder-root)
    if mount -t squashfs -o ro "$node" /run/builder/lower; then
        # "0 SECTORS verity V": every block read so far matched the root hash, "C": one did not; kernels
        # newer than bookworm's 6.1 (sid's 7.2) add a field after it ("-" without forward error correction)
        status=$(dmsetup status builder-root)
        case "$status" in *" verity V" | *" verity V "*) return 0 ;; esac
        say "dm-verity status of the root: $status"
        umount /run/builder/lower
    else
        say "the root opened through dm-verity but does not mount as squashfs"
    fi
    dmsetup remove builder-root
    losetup -d "$loop"
    return 1
}

mkdir -p /run/builder/lower /run/builder/rw/upper /run/builder/rw/work
if [ "$mode" = cache ] && [ -f "$image" ]; then
    touch "$image"  # its last use, for least-recently-used eviction
    say "root image from the cache: sha256 $ROOT_SHA (no download)"
else
    fetch_root
fi
if ! open_root; then
    [ "$mode" = cache ] || give_up "the root image failed dm-verity or does not mount"
    say "cached root image sha256 $ROOT_SHA failed dm-verity (a corrupt block): dropping it and fetching it again"
    rm -f "$image"
    sync
    fetch_root
    open_root || give_up "the root image failed dm-verity or does not mount"
fi
[ -n "$VERITY" ] && say "root opened through dm-verity: root hash $VERITY"
# The node's models (published by sha256: builder.models=SHA:SIZE,... from its plan's publisher) are kept on the cache disk too, each when room can be made for it beside the
# root and the models before it; the node's units fetch them into the room made here.
model_cached=""
if [ "$mode" = cache ]; then
    keep="" room=0
    for entry in $(echo "$MODELS" | tr ',' ' '); do
        sha=${entry%%:*} size=${entry#*:}
        case "$sha$size" in *[!0-9a-f]*) say "builder.models: bad entry $entry"; continue ;; esac
        if [ ${#sha} -ne 64 ] || [ -z "$size" ]; then
            say "builder.models: bad entry $entry"
            continue
        fi
        keep="$keep $sha"
        if [ -f "$CACHE_DIR/blobs/sha256/$sha" ]; then
            model_cached="$model_cached $sha"
            continue
        fi
        room=$((room + size))
        # shellcheck disable=SC2086  # keep: sha256s, one word each
        if cache_make_room "$room" "$ROOT_SHA" $keep; then
            model_cached="$model_cached $sha"
        else
            room=$((room - size))
            say "cache: no room for the model $sha ($((size / 1048576)) MiB): it goes to RAM"
        fi
    done
fi
# the node looks for dm-verity errors after this point: those of a root dropped above are not its root's
echo "ROOT_MODE=$mode ROOT_BLOB=$image MODEL_CACHED='${model_cached# }'" \
    "VERITY_ERRORS=$(dmesg | grep -c 'verity.*corrupted')" >/run/builder/root.env
mount -t overlay overlay \
    -o lowerdir=/run/builder/lower,upperdir=/run/builder/rw/upper,workdir=/run/builder/rw/work /newroot ||
    give_up "cannot mount the overlay"
mkdir -p /newroot/dev /newroot/run /newroot/proc /newroot/sys
mount --move /dev /newroot/dev
mount --move /run /newroot/run
umount /proc /sys
exec switch_root /newroot /lib/systemd/systemd
