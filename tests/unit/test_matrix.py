"""`builder matrix`: CI builds only images whose inputs are all pinned; render-only ones are listed apart."""

import json
import re
import shutil
from pathlib import Path

from builder.flavours.lock import built_images
from builder.flavours.vllm import load_vllm_recipe
from conftest import ROOT, run_cli_inproc

ZEROS = "0" * 64


def matrix(*args: str) -> dict[str, list[dict[str, str]]]:
    proc = run_cli_inproc("matrix", *args)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert sorted(doc) == ["include", "render_only"]
    return doc  # type: ignore[no-any-return]


def image(job: dict[str, str]) -> tuple[str, str, str]:
    return job["flavour"], job["target"], job["variant"]


def test_every_image_is_either_built_or_render_only() -> None:
    doc = matrix()
    built, render_only = [image(j) for j in doc["include"]], [image(j) for j in doc["render_only"]]
    everything = [("llama.cpp", r.target, v) for _, r, v in built_images()]
    everything += [("vllm", load_vllm_recipe(p).target, v) for p in sorted((ROOT / "recipes" / "vllm").glob("*.yaml"))
                   for v in load_vllm_recipe(p).variants]
    assert sorted(built + render_only) == sorted(everything) and not set(built) & set(render_only)
    assert ("llama.cpp", "cpu", "cpu") in built and ("vllm", "cpu", "cpu") in built
    assert ("llama.cpp", "intel-arc", "sycl") in render_only and ("vllm", "strix-halo", "rocm") in render_only
    assert all(set(job) == {"flavour", "target", "variant"} for job in doc["include"])


def test_build_refuses_every_render_only_image_with_the_reason_the_matrix_gives() -> None:
    for job in matrix()["render_only"]:
        proc = run_cli_inproc("build", "--flavour", job["flavour"], "--target", job["target"],
                              "--variant", job["variant"])
        assert proc.returncode == 2, (job, proc.stderr)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
        assert ("placeholder pin" in proc.stderr) == ("placeholder pin" in job["why"]), (job, proc.stderr)


def test_a_render_only_variant_never_enters_the_build_matrix(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", recipes)
    nvidia = recipes / "nvidia.yaml"
    # cuda-nvidia's toolchain image loses its digest; the vLLM cpu image loses its wheel lock.
    text = re.sub(r"(devel-ubuntu24\.04@sha256:)[0-9a-f]{64}", rf"\g<1>{ZEROS}", nvidia.read_text(), count=1)
    nvidia.write_text(text)
    (recipes / "vllm" / "cpu-cpu.lock").unlink()
    doc = matrix("--recipes", str(recipes))
    built = [image(j) for j in doc["include"]]
    why = {image(j): j["why"] for j in doc["render_only"]}
    assert ("llama.cpp", "nvidia", "cuda-nvidia") not in built and ("vllm", "cpu", "cpu") not in built
    assert why[("llama.cpp", "nvidia", "cuda-nvidia")].endswith(
        "nvidia.yaml: variants.cuda-nvidia.base.toolchain.ref: placeholder pin")
    assert why[("vllm", "cpu", "cpu")].endswith("cpu-cpu.lock: no wheel lock")
    assert ("llama.cpp", "nvidia", "cuda") in built and ("vllm", "nvidia", "cuda") in built
    proc = run_cli_inproc("build", "--recipe", str(nvidia), "--variant", "cuda-nvidia")
    assert proc.returncode == 2 and "variants.cuda-nvidia.base.toolchain.ref: placeholder pin" in proc.stderr


def test_flavour_narrows_the_matrix_to_one_flavour() -> None:
    both = matrix()
    for flavour in ("llama.cpp", "vllm"):
        doc = matrix("--flavour", flavour)
        for group in ("include", "render_only"):
            assert doc[group] == [j for j in both[group] if j["flavour"] == flavour]
        assert doc["include"], flavour  # each flavour has a buildable image here
    proc = run_cli_inproc("matrix", "--flavour", "gateway")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --flavour: unknown flavour 'gateway'")
    assert "Traceback" not in proc.stderr
