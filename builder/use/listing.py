"""`builder targets`: one entry per target/variant: what you can do with it on your machine (per flavour, from
the recipes, by the same rules `builder build` applies) and, apart, how builder's own test suite checks it."""

from pathlib import Path

from builder.flavours.lock import built_images
from builder.netboot.kernels import KERNELS
from builder.recipe.load import recipes_dir
from builder.recipe.targets import TARGETS, UNSUPPORTED, state_of
from builder.use.matrix import jobs

READY = "ready to build"


def _can_do(job: dict[str, str], why: str | None) -> tuple[str, str]:
    """What a user does before `builder build` accepts this image, as (the table's word, the line saying it):
    nothing (`ready`), `builder pin` or `builder lock`."""
    if why is None:
        return "ready", READY
    where = f"--target {job['target']} --variant {job['variant']}"
    flavour = "" if job["flavour"] == "llama.cpp" else f" --flavour {job['flavour']}"  # after the target
    if why.endswith(": placeholder pin"):
        field = why.rsplit(": ", 2)[-2]
        return "needs pin", (f"needs `builder pin {where}{flavour}` first ({field} is a placeholder for the "
                             "vendor's value)")
    if why.endswith(": no wheel lock"):
        return "needs lock", (f"needs `builder lock {where}{flavour}` first (no wheel lock yet), where its "
                              "package index is reachable")
    return "needs a fix", why


def target_entries(recipes: Path | None = None) -> list[dict[str, object]]:
    """Each variant: its default mark, per flavour whether a recipe of the run's recipes folder (--recipes, else
    the shipped one) has it and what you can do with it (`None`: no recipe of that flavour), and how the test
    suite checks it."""
    build, render_only = jobs(recipes or recipes_dir())
    known: dict[tuple[str, str, str], str | None] = {(j["flavour"], j["target"], j["variant"]): None for j in build}
    known |= {(j["flavour"], j["target"], j["variant"]): j["why"] for j in render_only}
    rdma = {(recipe.target, variant) for _, recipe, variant in built_images(recipes or recipes_dir())
            if recipe.variants[variant].rpc_rdma}
    entries: list[dict[str, object]] = []
    for target in TARGETS.values():
        for variant in target.variants.values():
            state = state_of(target.name, variant.name)
            can: dict[str, tuple[str, str] | None] = {}
            for flavour in ("llama.cpp", "vllm"):
                key = (flavour, target.name, variant.name)
                can[flavour] = _can_do(dict(zip(("flavour", "target", "variant"), key, strict=True)),
                                       known[key]) if key in known else None
            entries.append({
                "target": target.name, "variant": variant.name, "default": variant.name == target.default_variant,
                "llama_cpp": can["llama.cpp"] is not None, "vllm": can["vllm"] is not None,
                "llama_cpp_status": _text(can["llama.cpp"]), "vllm_status": _text(can["vllm"]),
                "llama_cpp_step": _word(can["llama.cpp"]), "vllm_step": _word(can["vllm"]),
                "tested": state.kind, "tested_text": state.text(), "ran_on": state.ran_on,
                "description": variant.description, "target_description": target.description,
                "rpc_rdma": (target.name, variant.name) in rdma,
            })
    return entries


def _text(step: tuple[str, str] | None) -> str | None:
    return None if step is None else step[1]


def _word(step: tuple[str, str] | None) -> str:
    return "-" if step is None else step[0]


def target_rows(entries: list[dict[str, object]]) -> list[str]:
    """The text table (TARGET, VARIANT with the default marked *, LLAMA.CPP, VLLM, TESTED BY BUILDER), then one
    line per image that needs a step first, and the hardware no target serves."""
    rows = [("TARGET", "VARIANT", "LLAMA.CPP", "VLLM", "TESTED BY BUILDER")]
    rows += [(str(e["target"]), f"{e['variant']}{'*' if e['default'] else ''}", str(e["llama_cpp_step"]),
              str(e["vllm_step"]), str(e["tested_text"])) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(f"{cell:<{width}}" for cell, width in zip(row[:4], widths, strict=True)) + f"  {row[4]}"
             for row in rows]
    steps = [f"  {e['target']}/{e['variant']} ({flavour}): {e[key]}" for e in entries
             for flavour, key in (("llama.cpp", "llama_cpp_status"), ("vllm", "vllm_status"))
             if e[key] not in (None, READY)]
    if steps:
        lines += ["", "before building:", *steps]
    lines += ["", *vllm_scope(entries)]
    rdma = [f"{e['target']}/{e['variant']}" for e in entries if e["rpc_rdma"]]
    lines += ["", f"RPC over RDMA (a variant's rpc_rdma: true; docs/recipes.md): {', '.join(rdma)}" if rdma else
              "RPC over RDMA: off in every recipe (a variant's rpc_rdma: true builds it; docs/recipes.md)"]
    lines += ["", "not supported:", *(f"  {name}: {why}" for name, why in UNSUPPORTED.items())]
    return lines


def vllm_scope(entries: list[dict[str, object]]) -> list[str]:
    """Where a cluster file's vLLM services can run: a variant whose vLLM image builds, on a node builder
    netboots (its target has a netboot kernel) or through `builder cluster commands` lines on a box it does not."""
    ready = [(str(e["target"]), str(e["variant"])) for e in entries if e["vllm_step"] == "ready"]
    netbooted = [f"{t}/{v}" for t, v in ready if t in KERNELS]
    boxes = [f"{t}/{v}" for t, v in ready if t not in KERNELS]
    later = sorted({f"{e['target']}/{e['variant']}" for e in entries if e["vllm"] and e["vllm_step"] != "ready"})
    lines = ["vLLM services of a cluster file (docs/clusters.md; --local runs them on one machine):"]
    lines += [f"  netbooted nodes: {', '.join(netbooted)}"] if netbooted else []
    lines += [f"  boxes builder does not boot, by `builder cluster commands`: {', '.join(boxes)}"] if boxes else []
    lines += [f"  not yet: {', '.join(later)} (their vLLM images are rendered only, until locked)"] if later else []
    return lines
