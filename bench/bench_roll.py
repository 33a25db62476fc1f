#!/usr/bin/env python3
"""Measure a roll end to end on a QEMU node (TCG): a new netboot set → `pxe publish` → the node serving it.

  python bench/bench_roll.py [--out bench/results-roll.json] [--keep DIR]

Everything runs in a network namespace of its own (tests/support/netns.py: needs root), as the shared QEMU test
does: `pxe serve`, QEMU (user-mode networking, the node's ports forwarded from 127.0.0.1), the gateway. One node,
node1 (cpu, 1 GiB, one vCPU as in the shared QEMU test: two under TCG on a loaded machine can panic at boot on
the IO-APIC timer check; BIOS, no cache disk), serves one llama-server of the tiny GGUF that
tests/support/tinymodel.py makes. Each step is timed:

1. image: `builder build --target cpu` (immediate when the content tag exists: the image is not rebuilt here;
   docs/benchmarks.md has the cpu image's build times);
2. the running generation: `pxe publish` of the cluster file, `pxe serve`, QEMU's power-on to node1's ready line,
   `builder cluster up`;
3. the new netboot set: `pxe build --target cpu --out FRESH` (the image's export, the squashfs at the default
   compression, the initramfs: what a changed image costs from here), then `pxe publish` of the changed file
   (tiny's context 256 -> 512, so node1's plan and its generation change);
4. the roll: `builder cluster roll FILE --canary node1 --reboot-command 'touch DIR/reboot-{node}'`; the script
   power-cycles QEMU when the file appears. From the roll's own lines: drain and pin, the reboot to the node seen
   down, power-on to serving and enabled, the roll's end.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from builder.flavours.prepare import prepare
from builder.netboot import publish
from builder.recipe.load import recipe_path_for

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
from netns import network_namespace  # noqa: E402 - the tests' private network namespace

from tinymodel import make_tiny_model  # noqa: E402 - the tests' tiny GGUF

MAC = "52:54:00:12:34:56"
HTTP, GATEWAY, METRICS, TINY, AGENT = 8000, 8080, 8405, 8101, 7999
READY = "builder-node: node1 server tiny ready on "
BOOT_LIMIT = 900  # seconds from power-on to the ready line, under TCG on a loaded machine


def builder(prefix: tuple[str, ...], *args: str, timeout: float = 3600) -> tuple[float, str]:
    """`builder ARGS` (inside the namespace); its wall time and output."""
    started = time.monotonic()
    proc = subprocess.run([*prefix, sys.executable, "-m", "builder", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"builder {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return time.monotonic() - started, proc.stdout


def power_on(prefix: tuple[str, ...], tftp: Path, console: Path) -> subprocess.Popen[bytes]:
    forwards = "".join(f",hostfwd=tcp:127.0.0.1:{p}-:{p}" for p in (TINY, AGENT))
    return subprocess.Popen([*prefix, "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "1", "-display",
                             "none", "-monitor", "none", "-no-reboot", "-boot", "n", "-netdev",
                             f"user,id=n0,tftp={tftp},bootfile=boot.ipxe{forwards}", "-device",
                             f"virtio-net-pci,netdev=n0,mac={MAC}", "-serial", f"file:{console}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(console: Path, vm: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + BOOT_LIMIT
    while time.monotonic() < deadline:
        if console.exists() and READY in console.read_text(errors="replace"):
            return
        if vm.poll() is not None:
            sys.exit(f"QEMU ended ({vm.returncode}):\n{console.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    sys.exit(f"no ready line after {BOOT_LIMIT} s:\n{console.read_text(errors='replace')[-3000:]}")


def cluster_file(path: Path, digest: str, context: int) -> None:
    path.write_text(yaml.safe_dump({
        "control": {"address": "10.0.2.2", "http_port": HTTP}, "kernel_args": ["console=ttyS0"],
        "nodes": [{"name": "node1", "mac": MAC, "target": "cpu", "memory": "512MiB", "address": "127.0.0.1"}],
        "services": [{"name": "tiny", "model": "tiny.gguf", "sha256": digest, "context": context, "nodes": ["node1"],
                      "port": TINY}],
        "gateway": {"address": "127.0.0.1", "port": GATEWAY, "metrics_port": METRICS}}))


def roll(prefix: tuple[str, ...], work: Path, path: Path, root: Path, generation: str,
         vm: subprocess.Popen[bytes]) -> tuple[list[tuple[float, str]], float, subprocess.Popen[bytes]]:
    """The roll, with QEMU power-cycled when the reboot command asks; its lines with their times, the power-on's
    time and the new QEMU."""
    flag = work / "reboot-node1"
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "builder", "cluster", "roll", str(path), "--canary",
                             "node1", "--generation", generation, "--root", str(root), "--reboot-command",
                             f"touch {work}/reboot-{{node}}", "--timeout", str(BOOT_LIMIT)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
            print(f"  roll: {line.rstrip()}", flush=True)
    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 2 * BOOT_LIMIT
    powered = 0.0
    while proc.poll() is None and time.monotonic() < deadline:
        if flag.exists():
            flag.unlink()
            vm.kill()
            vm.wait()
            powered = time.monotonic()
            vm = power_on(prefix, root / "tftp", work / "console-2.log")
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    reader.join(timeout=60)
    if proc.wait() != 0:
        sys.exit("the roll failed:\n" + "\n".join(line for _, line in lines))
    return lines, powered, vm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-roll.json")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_roll: needs root (a network namespace of its own)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-roll-"))
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    load = [os.getloadavg()[0]]
    vm = None
    with network_namespace() as ns:
        prefix = ns.enter
        try:
            steps["image: builder build --target cpu"], _ = builder((), "build", "--target", "cpu", "--engine",
                                                                     "podman", "--json")
            vocab = prepare(recipe_path_for("cpu")).tree.path / "models" / "ggml-vocab-llama-spm.gguf"
            model = make_tiny_model(vocab, work / "tiny.gguf")
            digest = hashlib.sha256(model.read_bytes()).hexdigest()
            path, root = work / "cluster.yaml", work / "pxe-root"
            cluster_file(path, digest, 256)
            steps["gen 1: pxe publish"], _ = builder(prefix, "pxe", "publish", str(path), "--root", str(root),
                                                     "--engine", "podman")
            with open(work / "serve.log", "wb") as log:
                server = subprocess.Popen([*prefix, sys.executable, "-m", "builder", "pxe", "serve", "--root",
                                           str(root), "--bind", "127.0.0.1", "--port", str(HTTP)], cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT)
                try:
                    time.sleep(1)
                    started = time.monotonic()
                    vm = power_on(prefix, root / "tftp", work / "console-1.log")
                    wait_ready(work / "console-1.log", vm)
                    steps["gen 1: power-on to ready"] = time.monotonic() - started
                    steps["gen 1: cluster up"], _ = builder(prefix, "cluster", "up", str(path), "--timeout", "300")
                    load.append(os.getloadavg()[0])
                    fresh = work / "set"
                    steps["new set: pxe build --out (export, squashfs, initramfs)"], out = builder(
                        (), "pxe", "build", "--target", "cpu", "--engine", "podman", "--out", str(fresh), "--json")
                    manifest = json.loads(out)
                    steps["new set: of which mksquashfs"] = float(manifest["seconds"]["squashfs"])
                    cluster_file(path, digest, 512)
                    steps["gen 2: pxe publish"], _ = builder(prefix, "pxe", "publish", str(path), "--root",
                                                             str(root), "--engine", "podman")
                    generation = publish.current_id(root)
                    assert generation is not None
                    began = time.monotonic()
                    lines, powered, vm = roll(prefix, work, path, root, generation, vm)
                    at = {line: t for t, line in reversed(lines)}
                    steps["roll: drain and pin"] = at["node1: rebooting"] - at["node1: draining"]
                    steps["roll: power-on to serving and enabled"] = at["node1: serving, enabled"] - powered
                    steps["roll: in all"] = lines[-1][0] - began
                    load.append(os.getloadavg()[0])
                    builder(prefix, "cluster", "down", str(path))
                finally:
                    server.terminate()
                    server.wait(timeout=30)
        finally:
            if vm is not None:
                vm.kill()
                vm.wait()
    result = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release()}, "load_1min": load,
              "squashfs": manifest["compression"], "squashfs_mb": round(
                  manifest["files"]["root.squashfs"]["size"] / 1e6, 1),
              "steps_s": {k: round(v, 1) for k, v in steps.items()}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
