#!/usr/bin/env python3
"""Measure netboot of the cpu image: artifact build time and sizes, power-on -> rpc-worker-ready, and the
cache disk against RAM mode.

  python bench/bench_netboot.py [--runs 3] [--compressions zstd,zstd:19,xz] [--uefi] [--no-cache]
                                [--vllm-model DIR [--vllm-only]] [--out bench/results-netboot.json]

1. for each squashfs compression: `builder pxe build --target cpu --compression C` into a fresh folder
   (the image export, squashfs and initramfs; the kernel tree is fetched once and cached), with the
   squashfs time and size and the initrd size from its manifest;
2. boot: publish one rpc-worker node, serve it on 127.0.0.1, start QEMU (TCG, 2 vCPUs, 1 GiB, BIOS; UEFI
   with --uefi) and time from starting QEMU to the node's "ready" line on the serial console, which it
   prints once ggml-rpc-server accepts connections. Median of --runs boots.
3. RAM mode against cache mode (unless --no-cache): a node without a disk boots twice; a node with an empty
   512 MiB virtio disk (PARTLABEL=builder-cache) boots twice, the first boot filling the cache. For each boot:
   seconds to ready, bytes of the root `pxe serve` sent (from its log), and the node's MemAvailable after
   the ready line (node-init prints it).
4. with --vllm-model DIR (a Hugging Face folder, e.g. the tiny one tests/support/tinyhf.py makes): the cpu vLLM
   image's netboot set (`pxe build --flavour vllm`: squashfs time and size), then one vllm-server node serving
   DIR with a cache disk, booted twice (QEMU `-cpu max` for AVX2, 4 GiB): seconds to the ready line (/health
   answers), bytes of the root and of the model sent, MemAvailable after ready. --vllm-only skips 1-3.
Uses only QEMU user-mode networking and 127.0.0.1.
"""

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAC = "52:54:00:12:34:56"
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT / "tests"))
from qemu import gpt_disk  # noqa: E402 - the tests' GPT image maker


def builder(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"builder {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build(compression: str, out: Path) -> dict[str, object]:
    started = time.monotonic()
    manifest = json.loads(builder("pxe", "build", "--target", "cpu", "--compression", compression,
                                  "--out", str(out), "--json"))
    files = manifest["files"]

    def mb(name: str) -> float:
        return round(files[name]["size"] / 1e6, 2)

    return {"compression": compression, "wall_s": round(time.monotonic() - started, 1),
            "squashfs_s": manifest["seconds"]["squashfs"], "squashfs_mb": mb("root.squashfs"),
            "initrd_mb": mb("initrd.img"), "vmlinuz_mb": mb("vmlinuz"),
            "rootfs_mb": round(manifest["rootfs_bytes"] / 1e6, 1), "kernel": manifest["kernel_version"]}


def boot_once(tftp: Path, console: Path, uefi: bool, limit: float = 300, disk: Path | None = None,
              memory_line: bool = False, ready_text: str = "rpc-worker ready on", memory_mb: int = 1024,
              cpu: str | None = None) -> float:
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", "2", "-display", "none", "-monitor",
            "none", "-no-reboot", "-boot", "n", "-netdev", f"user,id=n0,tftp={tftp},bootfile=boot.ipxe",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC}", "-serial", f"file:{console}"]
    if uefi:
        argv += ["-bios", "/usr/share/qemu/OVMF.fd"]
    if cpu:
        argv += ["-cpu", cpu]
    if disk:
        argv += ["-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0,serial=c0"]
    started = time.monotonic()
    vm = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = None
        while time.monotonic() - started < limit:
            text = console.read_text(errors="replace") if console.exists() else ""
            if ready is None and ready_text in text:
                ready = time.monotonic() - started
            if ready is not None and (not memory_line or "MemAvailable" in text):
                return ready
            time.sleep(0.25)
        sys.exit(f"no ready line after {limit} s:\n{console.read_text(errors='replace')[-2000:]}")
    finally:
        vm.kill()
        vm.wait()


def root_bytes(log: Path, sha: str) -> int:
    """Bytes of the root blob `pxe serve` has sent so far (its log has one line per response)."""
    return sum(int(n) for n in re.findall(rf"sent (\d+) bytes of /blobs/sha256/{sha}\b", log.read_text()))


def cache_vs_ram(tmp: Path, runs: int, sha: str) -> dict[str, list[dict[str, object]]]:
    """Two boots without a disk, two with an empty cache disk; repeated `runs` times (fresh disk each)."""
    results: dict[str, list[dict[str, object]]] = {"ram": [], "cache": []}
    for mode in ("ram", "cache"):
        for run in range(runs):
            folder = tmp / f"{mode}-{run}"
            folder.mkdir()
            port = free_port()
            inventory = folder / "cluster.yaml"
            cache = "cache: {device: PARTLABEL=builder-cache}\n" if mode == "cache" else ""
            inventory.write_text(f"control: {{address: 10.0.2.2, http_port: {port}}}\n"
                                 f"kernel_args: [console=ttyS0]\n{cache}"
                                 f"nodes: [{{name: node1, mac: '{MAC}', target: cpu, role: rpc-worker}}]\n")
            builder("pxe", "publish", str(inventory), "--root", str(folder / "pxe-root"))
            disk = None
            if mode == "cache":
                disk = folder / "disk.img"
                gpt_disk(disk, 512, "builder-cache")
            log = folder / "serve.log"
            with log.open("w") as out:
                server = subprocess.Popen([sys.executable, "-m", "builder", "pxe", "serve", "--root",
                                           str(folder / "pxe-root"), "--bind", "127.0.0.1"], cwd=ROOT, stdout=out,
                                          stderr=subprocess.STDOUT)
                try:
                    time.sleep(1)
                    for nth in ("first", "second"):
                        sent = root_bytes(log, sha)
                        console = folder / f"console-{nth}.log"
                        seconds = boot_once(folder / "pxe-root" / "tftp", console, False, disk=disk, memory_line=True)
                        time.sleep(0.5)
                        memory = re.search(r"MemAvailable (\d+) kB of MemTotal (\d+) kB", console.read_text())
                        row = {"boot": nth, "ready_s": round(seconds, 1), "root_bytes": root_bytes(log, sha) - sent,
                               "mem_available_mb": round(int(memory.group(1)) / 1024) if memory else None}
                        results[mode].append(row)
                        print(f"{mode} {run + 1} {nth}: {json.dumps(row)}")
                finally:
                    server.terminate()
                    server.wait()
    return results


VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager"]


def vllm_root(tmp: Path, model: Path) -> dict[str, object]:
    """The vLLM root: its set's build, then two boots of a vllm-server node with a cache disk."""
    started = time.monotonic()
    manifest = json.loads(builder("pxe", "build", "--target", "cpu", "--flavour", "vllm", "--json"))
    squash = manifest["files"]["root.squashfs"]
    result: dict[str, object] = {
        "wall_s": round(time.monotonic() - started, 1), "squashfs_s": manifest["seconds"]["squashfs"],
        "squashfs_mb": round(squash["size"] / 1e6, 1), "rootfs_mb": round(manifest["rootfs_bytes"] / 1e6, 1),
        "compression": manifest["compression"], "boots": []}
    print(json.dumps(result))
    folder = tmp / "vllm"
    folder.mkdir()
    port = free_port()
    inventory = folder / "cluster.yaml"
    # YAML reads JSON: the cluster file as data, the model's path quoted whatever it holds; the node binds the
    # address QEMU's user-mode network leases it
    inventory.write_text(json.dumps({
        "control": {"address": "10.0.2.2", "http_port": port}, "kernel_args": ["console=ttyS0"],
        "cache": {"device": "PARTLABEL=builder-cache"},
        "nodes": [{"name": "vnode1", "mac": MAC, "target": "cpu", "address": "10.0.2.15", "memory": "3GiB",
                   "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}],
        "services": [{"name": "bench", "engine": "vllm", "model": str(model.resolve()), "port": 8000,
                      "sha256": builder("cluster", "hash-model", str(model)).split()[0], "args": VLLM_ARGS,
                      "nodes": ["vnode1"]}]}))
    builder("pxe", "publish", str(inventory), "--root", str(folder / "pxe-root"))
    plan = next((folder / "pxe-root" / "current" / "nodes").glob("*.plan")).read_text()
    model_sha = plan.splitlines()[-1].split("\t")[4]
    disk = folder / "disk.img"
    gpt_disk(disk, squash["size"] // 2**20 + 1024, "builder-cache")
    log = folder / "serve.log"
    boots: list[dict[str, object]] = []
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "builder", "pxe", "serve", "--root",
                                   str(folder / "pxe-root"), "--bind", "127.0.0.1"], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            time.sleep(1)
            for nth in ("first", "second"):
                sent = root_bytes(log, squash["sha256"]), root_bytes(log, model_sha)
                console = folder / f"console-{nth}.log"
                seconds = boot_once(folder / "pxe-root" / "tftp", console, False, limit=3600, disk=disk,
                                    memory_line=True, ready_text="server bench ready on", memory_mb=4096, cpu="max")
                time.sleep(0.5)
                memory = re.search(r"MemAvailable (\d+) kB of MemTotal (\d+) kB", console.read_text())
                row = {"boot": nth, "ready_s": round(seconds, 1),
                       "root_bytes": root_bytes(log, squash["sha256"]) - sent[0],
                       "model_bytes": root_bytes(log, model_sha) - sent[1],
                       "mem_available_mb": round(int(memory.group(1)) / 1024) if memory else None,
                       "mem_total_mb": round(int(memory.group(2)) / 1024) if memory else None}
                boots.append(row)
                print(f"vllm {nth}: {json.dumps(row)}")
        finally:
            server.terminate()
            server.wait()
    result["boots"] = boots
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compressions", default="zstd,zstd:19,xz")
    parser.add_argument("--uefi", action="store_true", help="also time UEFI (OVMF) boots")
    parser.add_argument("--no-cache", action="store_true", help="skip the RAM-mode against cache-mode boots")
    parser.add_argument("--vllm-model", type=Path, help="also boot a vllm-server node serving this HF folder")
    parser.add_argument("--vllm-only", action="store_true", help="only the vLLM root (needs --vllm-model)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-netboot.json")
    args = parser.parse_args()
    if args.vllm_only:
        if not args.vllm_model:
            sys.exit("--vllm-only needs --vllm-model DIR")
        with tempfile.TemporaryDirectory(prefix="bench-netboot-") as tmp_name:
            row = vllm_root(Path(tmp_name), args.vllm_model)
        args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                        "vllm_root": row}, indent=2) + "\n")
        return

    with tempfile.TemporaryDirectory(prefix="bench-netboot-") as tmp_name:
        tmp = Path(tmp_name)
        builds = [build(c, tmp / f"artifacts-{c.replace(':', '-')}") for c in args.compressions.split(",")]
        for row in builds:
            print(json.dumps(row))
        port = free_port()
        inventory = tmp / "cluster.yaml"
        inventory.write_text(f"control: {{address: 10.0.2.2, http_port: {port}}}\nkernel_args: [console=ttyS0]\n"
                             f"nodes: [{{name: node1, mac: '{MAC}', target: cpu, role: rpc-worker}}]\n")
        builder("pxe", "publish", str(inventory), "--root", str(tmp / "pxe-root"))
        server = subprocess.Popen([sys.executable, "-m", "builder", "pxe", "serve", "--root", str(tmp / "pxe-root"),
                                   "--bind", "127.0.0.1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        sha = json.loads((tmp / "pxe-root" / "current" / "manifests" / "cpu-cpu.json").read_text()
                         )["files"]["root.squashfs"]["sha256"]
        boots: dict[str, list[float]] = {}
        try:
            time.sleep(1)
            for firmware in ["bios", "uefi"] if args.uefi else ["bios"]:
                boots[firmware] = []
                for i in range(args.runs):
                    seconds = boot_once(tmp / "pxe-root" / "tftp", tmp / f"console-{firmware}-{i}.log",
                                        firmware == "uefi")
                    boots[firmware].append(round(seconds, 1))
                    print(f"boot {firmware} {i + 1}: {seconds:.1f} s to rpc-worker ready")
        finally:
            server.terminate()
            server.wait()
        modes = {} if args.no_cache else cache_vs_ram(tmp, args.runs, sha)
        vllm = vllm_root(tmp, args.vllm_model) if args.vllm_model else None

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "builds": builds,
        "boot_to_ready_s": {fw: {"runs": runs, "median": statistics.median(runs)} for fw, runs in boots.items()},
        "cache_vs_ram": modes,
        "vllm_root": vllm,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["boot_to_ready_s"]))


if __name__ == "__main__":
    main()
