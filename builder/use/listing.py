"""`builder targets`: one entry per target/variant, from the target table, the shipped recipes and STATES."""

from builder.flavours.vllm import vllm_variants
from builder.recipe.load import load_recipe, recipes_dir
from builder.recipe.targets import TARGETS, state_of


def target_entries() -> list[dict[str, object]]:
    """Each variant: its default mark, whether the llama.cpp and vLLM recipes build it, and its state here."""
    entries: list[dict[str, object]] = []
    for target in TARGETS.values():
        path = recipes_dir() / f"{target.name}.yaml"
        in_recipe = set(load_recipe(path).variants) if path.is_file() else set()
        in_vllm = set(vllm_variants(target.name))
        for variant in target.variants.values():
            state = state_of(target.name, variant.name)
            entries.append({
                "target": target.name, "variant": variant.name, "default": variant.name == target.default_variant,
                "llama_cpp": variant.name in in_recipe, "vllm": variant.name in in_vllm, "state": state.kind,
                "state_text": state.text(), "ran_on": state.ran_on, "description": variant.description,
                "target_description": target.description,
            })
    return entries


def target_rows(entries: list[dict[str, object]]) -> list[str]:
    """The text table: TARGET, VARIANT (default *), LLAMA.CPP, VLLM, STATE."""
    rows = [("TARGET", "VARIANT", "LLAMA.CPP", "VLLM", "STATE")]
    rows += [(str(e["target"]), f"{e['variant']}{'*' if e['default'] else ''}", "yes" if e["llama_cpp"] else "-",
              "yes" if e["vllm"] else "-", str(e["state_text"])) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(f"{cell:<{width}}" for cell, width in zip(row[:4], widths, strict=True)) + f"  {row[4]}"
            for row in rows]
