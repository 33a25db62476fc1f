"""The node's cache-disk functions (images/netboot/cache.sh) run by a POSIX shell on this machine, on a
folder standing in for the mounted cache: least-recently-used eviction and the checks that decide whether a
device may be formatted. The whole path on a real (virtual) disk is in test_netboot_cache_qemu.py."""

import os
import subprocess
from pathlib import Path

from builder.netboot.initramfs import NODE_SCRIPTS

KIB = 1024


def shell(script: str, cache: Path) -> str:
    """Run `script` after sourcing cache.sh, with CACHE_DIR=cache and `say` printing plain lines."""
    proc = subprocess.run(["sh", "-c", f'. "$1"; CACHE_DIR="$2"; say() {{ echo "$*"; }}; {script}', "sh",
                           str(NODE_SCRIPTS / "cache.sh"), str(cache)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_eviction_drops_least_recently_used_blobs_until_the_new_one_fits_and_keeps_the_one_in_use(
        tmp_path: Path) -> None:
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    names = [c * 64 for c in "abcd"]  # last used in this order: a (the root being booted) is the oldest
    for age, name in enumerate(names):
        (blobs / name).write_bytes(b"x" * 100 * KIB)
        os.utime(blobs / name, (1_000_000 + age, 1_000_000 + age))
    # Free space as df would give it on a 16,784 KiB filesystem holding only these blobs.
    free = 'cache_free_kb() { echo $(( 16784 - $(cat "$CACHE_DIR"/blobs/sha256/* | wc -c) / 1024 )); }; '
    out = shell(free + f"cache_make_room {150 * KIB} {names[0]} && echo fits", tmp_path)
    assert out.splitlines() == [f"cache: evicted {names[1]} (least recently used)",
                                f"cache: evicted {names[2]} (least recently used)", "fits"]
    assert sorted(p.name for p in blobs.iterdir()) == [names[0], names[3]]
    # Nothing left to evict but the blob in use: the caller is told, the blob stays.
    out = shell(free + f"cache_make_room {1024 * KIB} {names[0]} || echo no-room", tmp_path)
    assert out.splitlines()[-1] == "no-room" and (blobs / names[0]).is_file()


def test_only_an_empty_device_or_builders_own_cache_counts_as_safe(tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.write_bytes(bytes(2 * 1024 * KIB))
    ours = tmp_path / "ours.img"
    subprocess.run(["mkfs.ext4", "-q", "-L", "builder-cache", str(ours), "8M"], check=True)
    foreign = tmp_path / "foreign.img"
    subprocess.run(["mkfs.ext4", "-q", "-L", "data", str(foreign), "8M"], check=True)
    # a device that is zero except one byte near the end of its first MiB holds data
    almost = tmp_path / "almost.img"
    almost.write_bytes(bytes(1024 * KIB - 1) + b"\x01" + bytes(1024 * KIB))
    verdicts = {}
    for image in (empty, ours, foreign, almost):
        out = shell(f'cache_is_empty "{image}" && echo empty; cache_is_ours "{image}" && echo ours; :', tmp_path)
        verdicts[image.stem] = out.split()
    assert verdicts == {"empty": ["empty"], "ours": ["ours"], "foreign": [], "almost": []}


def test_a_cache_name_two_disks_answer_to_is_refused_and_neither_is_formatted(tmp_path: Path) -> None:
    """Two partitions labelled builder-cache (say, an old disk moved into the board): the node formats neither
    and boots in RAM mode, naming both. A label only one disk has is acted on. The devices are stand-ins in a
    folder of the test's own (SYS_BLOCK), with names no machine has, and mke2fs and mount only record."""
    sysfs = tmp_path / "sys"
    for dev, label in (("zzfake1", "builder-cache"), ("zzfake2", "builder-cache"), ("zzfake3", "spare")):
        (sysfs / dev).mkdir(parents=True)
        (sysfs / dev / "uevent").write_text(f"DEVNAME={dev}\nDEVTYPE=partition\nPARTN=1\nPARTNAME={label}\n")
        (sysfs / dev / "size").write_text(f"{2 * 1024 * 1024}\n")  # 1 GiB in 512-byte sectors
    record = f'SYS_BLOCK="{sysfs}"; mke2fs() {{ echo "FORMAT $*"; }}; mount() {{ echo "MOUNT $*"; }}; '
    out = shell(record + "cache_open partlabel:builder-cache 1048576 1 || echo refused", tmp_path)
    assert out.splitlines() == [
        "cache device partlabel:builder-cache is ambiguous: /dev/zzfake1 /dev/zzfake2 all match; touching none "
        "of them: RAM mode (give the cache a name only one disk has, e.g. its /dev/disk/by-id name)", "refused"]
    out = shell(record + "cache_open partlabel:spare 1048576 0 || echo refused", tmp_path)
    assert out.splitlines()[0].startswith("cache device /dev/zzfake3 holds other data") and "FORMAT" not in out
