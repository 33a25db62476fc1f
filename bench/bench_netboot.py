#!/usr/bin/env python3
"""Measure netboot of the cpu image: artifact build time and sizes, and power-on -> rpc-worker-ready.

  python bench/bench_netboot.py [--runs 3] [--compressions zstd,zstd:19,xz] [--uefi] [--out bench/results-netboot.json]

1. for each squashfs compression: `builder pxe build --target cpu --compression C` into a fresh folder
   (the image export, squashfs and initramfs; the kernel tree is fetched once and cached), with the
   squashfs time and size and the initrd size from its manifest;
2. boot: publish one rpc-worker node, serve it on 127.0.0.1, start QEMU (TCG, 2 vCPUs, 1 GiB, BIOS; UEFI
   with --uefi) and time from starting QEMU to the node's "ready" line on the serial console, which it
   prints once ggml-rpc-server accepts connections. Median of --runs boots.
Uses only QEMU user-mode networking and 127.0.0.1.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAC = "52:54:00:12:34:56"


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


def boot_once(tftp: Path, console: Path, uefi: bool, limit: float = 300) -> float:
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2", "-display", "none", "-monitor",
            "none", "-no-reboot", "-boot", "n", "-netdev", f"user,id=n0,tftp={tftp},bootfile=boot.ipxe",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC}", "-serial", f"file:{console}"]
    if uefi:
        argv += ["-bios", "/usr/share/qemu/OVMF.fd"]
    started = time.monotonic()
    vm = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < limit:
            if console.exists() and "rpc-worker ready on" in console.read_text(errors="replace"):
                return time.monotonic() - started
            time.sleep(0.25)
        sys.exit(f"no ready line after {limit} s:\n{console.read_text(errors='replace')[-2000:]}")
    finally:
        vm.kill()
        vm.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compressions", default="zstd,zstd:19,xz")
    parser.add_argument("--uefi", action="store_true", help="also time UEFI (OVMF) boots")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-netboot.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-netboot-") as tmp_name:
        tmp = Path(tmp_name)
        builds = [build(c, tmp / f"artifacts-{c.replace(':', '-')}") for c in args.compressions.split(",")]
        for row in builds:
            print(json.dumps(row))
        port = free_port()
        inventory = tmp / "cluster.yaml"
        inventory.write_text(f"control: {{address: 10.0.2.2, http_port: {port}}}\nkernel_args: [console=ttyS0]\n"
                             f"nodes: [{{name: node1, mac: '{MAC}', target: cpu, role: rpc-worker}}]\n")
        builder("pxe", "publish", "--inventory", str(inventory), "--root", str(tmp / "pxe-root"))
        server = subprocess.Popen([sys.executable, "-m", "builder", "pxe", "serve", "--root", str(tmp / "pxe-root"),
                                   "--bind", "127.0.0.1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
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

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "builds": builds,
        "boot_to_ready_s": {fw: {"runs": runs, "median": statistics.median(runs)} for fw, runs in boots.items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["boot_to_ready_s"]))


if __name__ == "__main__":
    main()
