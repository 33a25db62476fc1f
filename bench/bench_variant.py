"""Build one target/variant and report its build time, image size and compiler-cache hits.

Usage: python bench/bench_variant.py --target intel-npu [--variant openvino] [--engine podman] [--cold]

--cold builds with a private, empty builder cache (no compiler cache, no bootstrapped bases: the time
includes bootstrapping them); without it the build reuses the shared caches but not the engine's
layer cache (--no-cache). Results are printed and written to bench/results-<target>-<variant>.json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def builder(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=7200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--variant")
    parser.add_argument("--engine", default="podman")
    parser.add_argument("--cold", action="store_true", help="private empty builder cache")
    opts = parser.parse_args()
    selection = ["--target", opts.target, "--engine", opts.engine]
    selection += ["--variant", opts.variant] if opts.variant else []
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="builder-bench-") as private:
        if opts.cold:
            env["BUILDER_CACHE"] = private
        started = time.monotonic()
        proc = builder("build", *selection, "--no-cache", "--json", env=env)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            sys.exit(f"build failed:\n{proc.stderr[-3000:]}")
        doc = json.loads(proc.stdout)
        log = Path(doc["log"]).read_text(errors="replace")
        cache = re.search(r"compiler cache: (.*)", log)
    result = {
        "target": opts.target, "variant": opts.variant, "engine": opts.engine, "cold": opts.cold,
        "image": doc["image"], "size_mb": round(doc["size"] / 1e6, 1), "build_s": round(seconds, 1),
        "compiler_cache": cache.group(1).strip() if cache else None,
        "load_average_after": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=2))
    name = f"results-{opts.target}-{opts.variant or 'default'}.json"
    (ROOT / "bench" / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
