"""The cpu image built with `rpc_rdma: true` (slow: it bootstraps two bases of its own and recompiles ggml-rpc).

No RDMA traffic runs here: the test machine's kernel has no soft-RoCE (rdma_rxe) and no RDMA NIC, so the check
is what a user sees without one: the worker says it will negotiate RDMA, and a head still gets its answers over
TCP, the same text the default cpu image gives.
"""

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, run_cli
from containers import complete, container, cpu_reference_text, wait_healthy

pytestmark = [pytest.mark.engine, pytest.mark.slow]

RDMA_LINE = "transport      : TCP (RDMA auto-negotiate enabled)"


def _size(image: str) -> int:
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def test_rdma_cpu_image_negotiates_rdma_and_serves_over_tcp(llama_cpu_image: str, tiny_model: Path,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", folder)
    data = yaml.safe_load((folder / "cpu.yaml").read_text())
    data["variants"]["cpu"]["rpc_rdma"] = True
    (folder / "cpu.yaml").write_text(yaml.safe_dump(data))

    started = time.monotonic()
    try:
        proc = run_cli("build", "--recipes", str(folder), "--target", "cpu", "--engine", "podman", "--json",
                       timeout=5400)
    finally:  # the build moved the floating tag cpu:cpu to the RDMA image: give it back to the default one
        subprocess.run(["podman", "tag", llama_cpu_image, "localhost/builder/cpu:cpu"], check=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    image = str(json.loads(proc.stdout)["image"])
    print(f"rdma cpu image: built in {time.monotonic() - started:.0f} s, {_size(image)} bytes "
          f"(default cpu image {_size(llama_cpu_image)} bytes)")
    assert image != llama_cpu_image
    labels = json.loads(subprocess.run(["podman", "image", "inspect", "--format", "{{json .Labels}}", image],
                                       capture_output=True, text=True, check=True).stdout)
    assert labels["dev.builder.rpc.rdma"] == "true"

    logs = tmp_path / "logs"
    logs.mkdir()
    reference = cpu_reference_text("podman", logs, tiny_model)
    worker, head = free_port(), free_port()
    recipes = ("--recipes", str(folder))
    log = logs / f"builder-test-rdma-w-{worker}.log"
    with container("podman", logs, f"builder-test-rdma-w-{worker}", "rpc-worker", "--port", str(worker),
                   extra=recipes) as w:
        deadline = time.monotonic() + 120
        while not _listening(worker):
            assert w.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        with container("podman", logs, f"builder-test-rdma-h-{head}", "server", "-m", str(tiny_model), "-c", "256",
                       "-t", "2", "--port", str(head), "--rpc", f"127.0.0.1:{worker}", "-ngl", "99",
                       extra=recipes) as h:
            wait_healthy(head, h, logs / f"builder-test-rdma-h-{head}.log")
            assert complete(head) == reference
        # ggml-rpc-server flushes what it printed (the transport line among it) when a client connects
        worker_log = log.read_text(errors="replace")
    assert RDMA_LINE in worker_log and "Accepted client connection" in worker_log, worker_log[-3000:]
    assert "RDMA activated" not in worker_log  # no RDMA device here: the connection stayed on TCP

    # its netboot set: the root loads the RDMA modules of the data NICs, after their drivers
    sets = tmp_path / "set"
    proc = run_cli("pxe", "build", "--recipes", str(folder), "--target", "cpu", "--engine", "podman", "--json",
                   "--out", str(sets), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    root = next(sets.rglob("root.squashfs"))
    subprocess.run(["unsquashfs", "-d", str(tmp_path / "root"), "-no-progress", str(root),
                    "usr/lib/builder/modules.load"], capture_output=True, check=True)
    loaded = (tmp_path / "root/usr/lib/builder/modules.load").read_text().split()
    for module in ("ib_uverbs.ko", "rdma_ucm.ko", "mlx5_ib.ko", "irdma.ko"):
        assert module in loaded, loaded
    assert loaded.index("mlx5_core.ko") < loaded.index("mlx5_ib.ko")
    assert not {"ib_uverbs", "rdma_ucm", "mlx5_ib", "irdma"} & set(manifest["missing_modules"])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
