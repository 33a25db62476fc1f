# shellcheck shell=sh
# Sourced by the initramfs' /init: the node's cache disk. A device is found by a stable name (a GPT
# partition label, or the /dev/disk/by-id name udev would give it), used when it holds builder's cache,
# formatted when it is empty (its first MiB is zeros) or when the inventory allows a wipe, and otherwise
# left alone: every refusal is one console line, and the node boots in RAM mode.
# Blobs live in blobs/sha256/<hex>; a blob's mtime is its last use, and the oldest go first when room is short.

CACHE_LABEL=builder-cache
CACHE_DIR=/run/builder/cache
SYS_BLOCK=/sys/class/block  # the kernel's block devices (a test points it at a folder of its own)

# The by-id names of block device $1 (a name under /sys/class/block) for virtio and NVMe disks and their
# partitions, spelt as udev's rules spell them; ATA/SCSI names need udev's own probes: use a partition label.
cache_ids() {
    sys=$SYS_BLOCK/$1 disk=$1 part=""
    if [ -f "$sys/partition" ]; then
        part=-part$(cat "$sys/partition")
        disk=$(basename "$(readlink -f "$sys/..")")
    fi
    d=$SYS_BLOCK/$disk
    if [ -s "$d/serial" ]; then echo "virtio-$(cat "$d/serial")$part"; fi
    if [ -f "$d/device/model" ] && [ -f "$d/device/serial" ]; then
        # trimmed, inner runs of spaces as one _
        model=$(sed 's/^ *//; s/ *$//; s/  */_/g' "$d/device/model")
        serial=$(sed 's/^ *//; s/ *$//; s/  */_/g' "$d/device/serial")
        echo "nvme-${model}_$serial$part"
    fi
    if [ -s "$d/wwid" ]; then echo "nvme-$(cat "$d/wwid")$part"; fi
}

# Every device node "partlabel:NAME" or "id:NAME" names, one per line; waits up to 10 s for disks to appear.
# The caller formats what it finds, so it needs exactly one: two disks with the same partition label (or a
# serial given twice) must never leave the choice to the order the kernel listed them in.
cache_find() {
    kind=${1%%:*} name=${1#*:}
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        found=""
        for uevent in "$SYS_BLOCK"/*/uevent; do
            dev=${uevent%/uevent} && dev=${dev##*/}
            case "$kind" in
                partlabel) grep -qxF "PARTNAME=$name" "$uevent" && found="$found /dev/$dev" ;;
                id) cache_ids "$dev" | grep -qxF "$name" && found="$found /dev/$dev" ;;
            esac
        done
        if [ -n "$found" ]; then
            echo "${found# }"
            return 0
        fi
        sleep 1
    done
    return 1
}

# Whether $1 holds builder's cache: an ext2/3/4 superblock (magic 53 ef) labelled builder-cache.
cache_is_ours() {
    magic=$(dd if="$1" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' ')
    label=$(dd if="$1" bs=1 skip=1144 count=16 2>/dev/null | tr -d '\000')
    [ "$magic" = 53ef ] && [ "$label" = "$CACHE_LABEL" ]
}

cache_is_empty() {
    cmp -s -n 1048576 "$1" /dev/zero
}

# Open the cache named by $1 (SPEC), needing room for $2 bytes; $3 = 1 allows wiping a foreign device.
# Prints nothing on success (the cache is mounted on $CACHE_DIR); one line and status 1 otherwise.
cache_open() {
    dev=$(cache_find "$1") || { say "cache device $1 not found: RAM mode"; return 1; }
    case "$dev" in
        *" "*) say "cache device $1 is ambiguous: $dev all match; touching none of them: RAM mode" \
               "(give the cache a name only one disk has, e.g. its /dev/disk/by-id name)"
               return 1 ;;
    esac
    bytes=$(( $(cat "$SYS_BLOCK/${dev##*/}/size") * 512 ))
    if [ "$bytes" -lt $(( $2 + 67108864 )) ]; then
        say "cache device $dev ($((bytes / 1048576)) MiB) is too small for the root ($(($2 / 1048576)) MiB): RAM mode"
        return 1
    fi
    if ! cache_is_ours "$dev"; then
        if cache_is_empty "$dev"; then
            say "cache device $dev is empty: formatting it"
        elif [ "$3" = 1 ]; then
            say "cache device $dev holds other data and the inventory says wipe: formatting it"
        else
            say "cache device $dev holds other data (not builder's cache); leaving it untouched: RAM mode" \
                "(set cache.wipe: true in the inventory to let builder format it)"
            return 1
        fi
        mke2fs -q -F -m 0 -L "$CACHE_LABEL" "$dev" >/dev/null || { say "cannot format $dev: RAM mode"; return 1; }
    fi
    mkdir -p "$CACHE_DIR"
    mount -t ext4 "$dev" "$CACHE_DIR" || { say "cannot mount the cache device $dev: RAM mode"; return 1; }
    mkdir -p "$CACHE_DIR/blobs/sha256"
    rm -f "$CACHE_DIR"/blobs/sha256/*.part
    say "cache: $dev mounted, $(cache_free_kb) KiB free"
}

cache_free_kb() {
    df -k "$CACHE_DIR" | awk 'NR == 2 { print $4 }'
}

# Evict blobs, least recently used first, until $1 bytes (and 16 MiB to spare) fit; never the blobs named
# after it (the root being booted, the models being fetched).
cache_make_room() {
    need=$(( $1 / 1024 + 16384 ))
    shift
    # (variables here are the initramfs' globals: named so as not to clobber /init's own)
    cache_keep=""
    for cache_name in "$@"; do cache_keep="$cache_keep -e $cache_name"; done
    while [ "$(cache_free_kb)" -lt "$need" ]; do
        # blob names are 64 hex digits (and .part files), so ls's output is safe to read
        # shellcheck disable=SC2010,SC2086
        oldest=$(ls -tr "$CACHE_DIR/blobs/sha256" | grep -vxF $cache_keep | head -n 1)
        [ -n "$oldest" ] || return 1
        rm -f "$CACHE_DIR/blobs/sha256/$oldest"
        say "cache: evicted $oldest (least recently used)"
    done
}
