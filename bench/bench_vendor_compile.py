#!/usr/bin/env python3
"""Time one ggml GPU backend compiled with Debian's own toolchain (no GPU needed), once.

  python bench/bench_vendor_compile.py hip|cuda [--engine podman] [--out bench/results-vendor-NAME.json]

hip: ggml-hip for gfx1151 with the strix-halo/rocm toolchain base (ROCm 7.2 from experimental on sid,
clang 22); cuda: ggml-cuda for sm_86 with trixie's nvidia-cuda-toolkit 12.4 (non-free). The toolchain base
is bootstrapped first if it is not cached (its time is not counted); the compile runs at nice 19 inside the
container. Prints and writes the result as JSON: wall seconds, whether the module was produced, its size,
and the device code objects it carries.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "support")]

from builder.core.paths import cache_subdir  # noqa: E402
from builder.engines import get_engine  # noqa: E402
from builder.fetch.source import resolve  # noqa: E402
from builder.recipe.load import load_recipe, recipe_path_for  # noqa: E402
from vendor_compile import TOOLCHAINS, compile_backend  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("toolchain", choices=sorted(TOOLCHAINS))
    parser.add_argument("--engine", default="podman")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    toolchain = TOOLCHAINS[args.toolchain]
    recipe = load_recipe(recipe_path_for("cpu"))
    assert recipe.llama_cpp is not None
    tree = resolve(recipe.llama_cpp.source)
    engine = get_engine(args.engine)
    result = compile_backend(engine, toolchain, tree, cache_subdir("vendor-compile") / toolchain.name)
    doc = json.dumps({**result.as_dict(), "machine": f"{os.cpu_count()} cores, {platform.machine()}"}, indent=2)
    print(doc)
    out = args.out or ROOT / "bench" / f"results-vendor-{toolchain.name}.json"
    out.write_text(doc + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
