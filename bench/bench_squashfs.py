#!/usr/bin/env python3
"""Choose the netboot root's squashfs compression by measurement: build time against bytes on the wire and the
node's read time.

  python bench/bench_squashfs.py (--tar ROOT.tar | --root DIR) [--sample N] [--candidates zstd:1,zstd:15,xz]
                                 [--reads 3] [--work DIR] [--out bench/results-squashfs.json]

The root is an image's filesystem as `podman export` writes it (--tar: `podman export $(podman create IMAGE
true) > ROOT.tar`), or a folder already holding one (--root: e.g. `unsquashfs -d DIR root.squashfs` of a netboot
set). With --sample N only the files whose path's sha256 starts with a hex digit below N are kept (N/16 of the
files, whole files, deterministic): a representative slice of a root too big to squash many times.

For each candidate, in one run:
1. build: `mksquashfs` with the flags `builder pxe build` uses (builder/netboot/artifacts.py) and the
   candidate's `-comp`/`-Xcompression-level`; wall time, CPU time (user + system of mksquashfs and its threads),
   output size;
2. read: the squashfs mounted read-only through a loop device (the kernel's squashfs, as on a node: a fresh
   mount has nothing decompressed in its cache), every regular file read once from start to end; wall time and
   CPU time of the reader (the kernel decompresses in the reading task, so it is the reader's system time);
   --reads times, each through a fresh mount, the median kept (a read takes seconds: the load of a shared
   machine moves it more than the level does).
The squashfs file itself is in the page cache by then (it was just written), as a node's root is in RAM or on
its cache disk: the read measures decompression, not a disk.

Run it at low priority beside other work: `nice -n 10 python bench/bench_squashfs.py ...`. Needs root (mount).
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# `builder pxe build`'s own mksquashfs flags, apart from the compression (builder/netboot/artifacts.py)
FLAGS = ["-noappend", "-no-xattrs", "-mkfs-time", "0", "-all-time", "0", "-no-progress"]
CANDIDATES = "lz4,zstd:1,zstd:3,zstd:9,zstd:15,zstd:19,gzip,xz"
CHUNK = 1 << 20


def comp_flags(candidate: str) -> list[str]:
    algorithm, _, level = candidate.partition(":")
    flags = ["-comp", algorithm]
    if level:
        flags += ["-Xcompression-level", level]
    return flags


def kept(name: str, sample: int) -> bool:
    return sample >= 16 or int(hashlib.sha256(name.encode()).hexdigest()[0], 16) < sample


def unpack(tar: Path, dest: Path, sample: int) -> None:
    """The image's files under dest (regular files of the sample, with every directory and link)."""
    with tarfile.open(tar) as archive:
        members = [m for m in archive.getmembers()
                   if not m.isdev() and (not m.isfile() or kept(m.name.lstrip("./"), sample))]
        archive.extractall(dest, members=members, filter="tar")


def tree_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return len(files), sum(p.stat().st_size for p in files)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def build(root: Path, out: Path, candidate: str) -> dict[str, float]:
    cpu = children_cpu()
    started = time.monotonic()
    subprocess.run(["mksquashfs", str(root), str(out), *FLAGS, *comp_flags(candidate)], check=True,
                   stdout=subprocess.DEVNULL)
    return {"build_s": time.monotonic() - started, "build_cpu_s": children_cpu() - cpu}


def read_back(image: Path, mount: Path) -> dict[str, float]:
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(mount)], check=True)
    try:
        user, system = self_cpu()
        started = time.monotonic()
        total = 0
        for folder, _, names in os.walk(mount):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb", buffering=0) as f:
                    while chunk := f.read(CHUNK):
                        total += len(chunk)
        wall = time.monotonic() - started
        user_after, system_after = self_cpu()
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    return {"read_s": wall, "read_cpu_s": (user_after - user) + (system_after - system), "read_bytes": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tar", type=Path, help="an image's root as `podman export` writes it")
    source.add_argument("--root", type=Path, help="a folder holding a root")
    parser.add_argument("--sample", type=int, default=16, choices=range(1, 17), metavar="N",
                        help="keep N/16 of the files (by their path's sha256); 16 keeps all (default)")
    parser.add_argument("--candidates", default=CANDIDATES, help=f"comma-separated (default {CANDIDATES})")
    parser.add_argument("--reads", type=int, default=3, help="reads of each squashfs, the median kept (default 3)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one under /var/tmp)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-squashfs.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_squashfs: needs root to mount each squashfs through a loop device")
    for tool in ("mksquashfs", "mount", "umount"):
        if not shutil.which(tool):
            sys.exit(f"bench_squashfs: {tool} is not installed (squashfs-tools, mount)")
    work = Path(tempfile.mkdtemp(prefix="bench-squashfs-", dir=args.work or "/var/tmp"))
    try:
        root = args.root
        if args.tar is not None:
            root = work / "root"
            started = time.monotonic()
            unpack(args.tar, root, args.sample)
            print(f"unpacked {args.tar} (sample {args.sample}/16) in {time.monotonic() - started:.0f} s",
                  flush=True)
        files, size = tree_bytes(root)
        print(f"root: {files} files, {size / 1e6:.1f} MB; load {os.getloadavg()}", flush=True)
        rows = []
        for candidate in args.candidates.split(","):
            image = work / "root.squashfs"
            load_before = os.getloadavg()[0]
            row: dict[str, object] = {"compression": candidate, **build(root, image, candidate)}
            row["squashfs_bytes"] = image.stat().st_size
            reads = sorted((read_back(image, work / "mnt") for _ in range(args.reads)), key=lambda r: r["read_s"])
            row.update(reads[len(reads) // 2])
            row["reads_s"] = [r["read_s"] for r in reads]
            row["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            for key, value in row.items():
                if isinstance(value, float):
                    row[key] = round(value, 3)
                elif isinstance(value, list):
                    row[key] = [round(v, 3) for v in value]
            rows.append(row)
            print(json.dumps(row), flush=True)
            image.unlink()
        result = {"source": str(args.tar or args.root), "sample_of_16": args.sample, "files": files,
                  "root_bytes": size, "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                                  "mksquashfs": subprocess.run(
                                                      ["mksquashfs", "-version"], capture_output=True,
                                                      text=True).stdout.splitlines()[0]},
                  "nice": os.nice(0), "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
