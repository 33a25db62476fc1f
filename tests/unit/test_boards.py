"""What real boards get on their kernel command line: a Strix Halo node's iGPU memory derived from its `ram:`,
in the boot script `builder pxe publish` writes (no boot: the netboot sets are stand-ins), and one line for
each way a file can get it wrong."""

import hashlib
from pathlib import Path

import pytest
import yaml
from test_netboot import fake_artifacts

from builder.cluster.plans import load_for_netboot, models, publish_services
from builder.core.errors import RecipeError

MODEL = b"GGUF a big model"
MACS = ["52:54:00:00:00:01", "52:54:00:00:00:02"]


def halo_file(tmp_path: Path, nodes: list[dict[str, object]], **changes: object) -> Path:
    (tmp_path / "big.gguf").write_bytes(MODEL)
    base = {"target": "strix-halo", "memory": "56GiB"}
    data: dict[str, object] = {
        "control": {"address": "10.0.0.1"},
        "nodes": [{"name": f"halo{i + 1}", "mac": MACS[i], "address": f"10.0.0.{11 + i}", **base, **node}
                  for i, node in enumerate(nodes)],
        "services": [{"name": "big", "model": "big.gguf", "sha256": hashlib.sha256(MODEL).hexdigest(),
                      "memory": "40GiB", "nodes": [f"halo{i + 1}" for i in range(len(nodes))]}],
        **changes,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def kernel_words(tmp_path: Path, path: Path) -> list[list[str]]:
    """Each node's kernel command line, as its published boot script gives it."""
    loaded = load_for_netboot(path)
    folder, manifest = fake_artifacts(tmp_path, "halo")
    root = tmp_path / "pxe-root"
    publish_services(root, loaded, models(loaded, print), {("strix-halo", "rocm"): (folder, manifest)}, 1)
    scripts = [root / "current" / "nodes" / f"{mac.replace(':', '-')}.ipxe" for mac in MACS[:len(loaded.cluster.nodes)]]
    return [next(line for line in s.read_text().splitlines() if line.startswith("kernel ")).split() for s in scripts]


def value(words: list[str], name: str) -> int:
    return int(next(w for w in words if w.startswith(name + "=")).split("=", 1)[1])


def test_a_64_and_a_128_gib_board_get_their_own_consistent_gtt_and_ttm_sizes(tmp_path: Path) -> None:
    small, big = kernel_words(tmp_path, halo_file(tmp_path, [{"ram": "64GiB"}, {"ram": "128GiB"}]))
    # the field's values for a 128 GB board (124 GiB for the iGPU, 4 GiB for the system)
    assert value(big, "amdgpu.gttsize") == 126976 and value(big, "ttm.pages_limit") == 32505856
    assert value(small, "amdgpu.gttsize") == 60 * 1024 and value(small, "ttm.pages_limit") == 60 * 1024 * 256
    for words in (small, big):  # MiB and 4 KiB pages describing the same size, and the IOMMU in pass-through
        assert value(words, "amdgpu.gttsize") * 256 == value(words, "ttm.pages_limit")
        assert words.count("iommu=pt") == 1


def test_the_files_own_words_win_and_must_agree(tmp_path: Path) -> None:
    own = ["amdgpu.gttsize=65536", "ttm.pages_limit=16777216", "amd_iommu=off"]
    (words,) = kernel_words(tmp_path, halo_file(tmp_path, [{"ram": "128GiB", "kernel_args": own}]))
    assert value(words, "amdgpu.gttsize") == 65536 and words.count("amdgpu.gttsize=65536") == 1
    assert "iommu=pt" not in words and "amd_iommu=off" in words


@pytest.mark.parametrize(("node", "changes", "message"), [
    ({}, {}, "nodes[0].ram: a Strix Halo board's iGPU maps only part of its memory"),
    ({"ram": "128GB"}, {}, "nodes[0].ram: 128000000000 bytes is 119.2 GiB; a board's RAM is a whole number of GiB"),
    ({"ram": "4GiB"}, {}, "nodes[0].ram: 4 GiB leaves nothing for the iGPU"),
    ({"ram": "32GiB", "memory": "30GiB"}, {},
     "nodes[0].memory: halo1 declares 30.0 GiB for its models, but its iGPU can map 28.0 GiB"),
    ({"ram": "64GiB", "kernel_args": ["amdgpu.gttsize=61440"]}, {},
     "nodes[0].kernel_args: amdgpu.gttsize is set without ttm.pages_limit"),
    ({"ram": "64GiB"}, {"kernel_args": ["amdgpu.gttsize=61440", "ttm.pages_limit=61440"]},
     "nodes[0].kernel_args: amdgpu.gttsize=61440 MiB and ttm.pages_limit=61440 pages describe different sizes"),
])
def test_what_a_board_cannot_be_is_one_line(tmp_path: Path, node: dict[str, object], changes: dict[str, object],
                                            message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_for_netboot(halo_file(tmp_path, [node], **changes))
    assert f"cluster.yaml: {message}" in str(caught.value)
