#!/usr/bin/env python3
"""Measure the cpu image in one run: build times, image size, and llama-bench in the image vs native.

  python bench/bench_cpu.py [--engine podman] [--runs 3] [--out bench/results-cpu.json]

1. cold build: an empty compiler cache and no engine layer cache (bases already bootstrapped and the
   source already fetched: those are measured by their own logs, not here);
2. no-change rebuild: `builder build` again, median of --runs, must report built=false;
3. rebuild after a small llama.cpp change: one .cpp file edited in a copy of the tree, built with
   --llama-cpp-source (the compiler cache recompiles only what changed);
4. the runtime image size (uncompressed, as the engine reports it);
5. llama-bench pp/tg tokens/s of the image vs a -march=native build of the same source on this machine,
   alternating, median of --runs, on a random-weight llama model made here (no weights are downloaded).
Ratios are taken within this one run, on one machine.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.pipeline.build import Prepared

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT / "tests"))

from tinymodel import make_tiny_model  # noqa: E402

BENCH_MODEL = {"n_layer": 8, "n_embd": 1024, "n_head": 16, "n_ff": 2816, "std": 0.05}
CHANGED_FILE = "src/llama-sampling.cpp"


def builder(*args: str, env: dict[str, str]) -> tuple[dict[str, object], float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "builder", *args, "--json"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"builder {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), elapsed


def llama_bench(argv: list[str]) -> tuple[float, float]:
    proc = subprocess.run([*argv, "-p", "512", "-n", "128", "-r", "5", "-t", "2", "-o", "json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"llama-bench failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    rows = json.loads(proc.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    return float(pp), float(tg)


def native_build(tree: Path, build: Path) -> Path:
    """llama-bench from the same source, tuned for this CPU (-march=native), statically linked backends."""
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF"]
    if shutil.which("ccache"):
        flags += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-G", "Ninja", *flags], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "--parallel", str(os.cpu_count())],
                   check=True, capture_output=True)
    return build / "bin" / "llama-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="podman")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-cpu.json")
    parser.add_argument("--part", choices=("all", "builds", "speed"), default="all",
                        help="builds: steps 1-4 only; speed: step 5 only, on the existing image")
    opts = parser.parse_args()

    from builder.core.paths import cache_dir
    from builder.flavours.prepare import prepare
    from builder.recipe.load import recipe_path_for

    main_cache = cache_dir()
    prep = prepare(recipe_path_for("cpu"))  # fetches the pinned source into the main cache once
    work = Path(tempfile.mkdtemp(prefix="builder-bench-"))
    cache = work / "cache"
    cache.mkdir()
    for shared in ("sources", "bases"):  # reuse fetched sources and bootstrapped bases, nothing else
        (cache / shared).symlink_to(main_cache / shared)
    env = {**os.environ, "BUILDER_CACHE": str(cache)}
    target = ["--target", "cpu", "--engine", opts.engine]
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.platform()}",
        "engine": opts.engine,
    }

    if opts.part != "speed":
        measure_builds(opts, results, prep, work, env, target)
    if opts.part != "builds":
        measure_speed(opts, results, prep, work, env)
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def measure_builds(opts: argparse.Namespace, results: dict[str, object], prep: "Prepared", work: Path,
                   env: dict[str, str], target: list[str]) -> None:
    from builder.fetch.source import PRUNED

    print("1/5 cold build (empty compiler cache, no layer cache) …", flush=True)
    cold, cold_wall = builder("build", *target, "--no-cache", env=env)
    results["cold_build_s"] = round(cold_wall, 1)
    results["image_size_mb"] = round(int(str(cold["size"])) / 1e6, 1)
    opts.out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a later failure

    print("2/5 no-change rebuilds …", flush=True)
    walls = []
    for _ in range(opts.runs):
        doc, wall = builder("build", *target, env=env)
        assert doc["built"] is False, "an unchanged rebuild ran a build"
        walls.append(wall)
    results["no_change_rebuild_s"] = round(statistics.median(walls), 2)

    print(f"3/5 rebuild after editing {CHANGED_FILE} …", flush=True)
    tree = work / "llama.cpp"
    top = str(prep.tree.path)
    shutil.copytree(prep.tree.path, tree, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if folder == top and n in PRUNED])
    with open(tree / CHANGED_FILE, "a") as f:
        f.write("\n// builder bench: a small change\n")
    with open(tree / CHANGED_FILE) as f:
        text = f.read()
    (tree / CHANGED_FILE).write_text(text.replace("return", "return  ", 1))
    changed, changed_wall = builder("build", *target, "--llama-cpp-source", str(tree), env=env)
    assert changed["built"] is True
    results["small_change_rebuild_s"] = round(changed_wall, 1)
    results["small_change_vs_cold"] = round(changed_wall / cold_wall, 3)


def measure_speed(opts: argparse.Namespace, results: dict[str, object], prep: "Prepared", work: Path,
                  env: dict[str, str]) -> None:
    image, _ = builder("build", "--target", "cpu", "--engine", opts.engine, env=env)
    print("4/5 native -march=native build of the same source …", flush=True)
    native = native_build(prep.tree.path, work / "native")

    print("5/5 llama-bench, image vs native, alternating …", flush=True)
    model = make_tiny_model(prep.tree.path / "models" / "ggml-vocab-llama-spm.gguf", work / "bench.gguf",
                            **BENCH_MODEL)
    image_cmd = [sys.executable, "-m", "builder", "run", "--image", str(image["image"]), "--engine", opts.engine,
                 "bench", "-m", str(model)]
    image_runs, native_runs = [], []
    for _ in range(opts.runs):
        image_runs.append(llama_bench(image_cmd))
        native_runs.append(llama_bench([str(native), "-m", str(model)]))
    for i, name in enumerate(("pp", "tg")):
        img = statistics.median(r[i] for r in image_runs)
        nat = statistics.median(r[i] for r in native_runs)
        results[f"{name}_image_tps"] = round(img, 2)
        results[f"{name}_native_tps"] = round(nat, 2)
        results[f"{name}_ratio"] = round(img / nat, 3)
    size_mb = model.stat().st_size / 1e6
    results["bench_model"] = f"random llama f16, {BENCH_MODEL}, {size_mb:.0f} MB; pp512, tg128, -r 5, -t 2"


if __name__ == "__main__":
    main()
