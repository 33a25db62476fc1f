"""Golden build contexts without copies.

tests/data/golden/<target>/<variant>/ (vllm-<variant> for the vLLM flavour) holds the files that differ per image
(Containerfile, plan.json, requirements.txt, apt sources). A file that every image of a flavour renders alike
is compared once: its shared.txt line names the context file and where the expected bytes are, either the
file under images/ that rendering copies unchanged (the scripts), or one copy in tests/data/golden/shared/<flavour>/
(the ignore files). So a script edit rewrites no golden, and a script a target gains or loses still shows.
`pytest --update-golden` renders every image and rewrites all of it.
"""

import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from builder.flavours.vllm import VLLM_RECIPES, load_vllm_recipe
from builder.recipe.load import load_recipe
from builder.recipe.targets import TARGETS
from conftest import ROOT, run_cli_inproc

GOLDEN = ROOT / "tests" / "data" / "golden"
SHARED = GOLDEN / "shared"
MANIFEST = "shared.txt"


@dataclass(frozen=True)
class Image:
    flavour: str  # llama.cpp or vllm
    target: str
    variant: str

    @property
    def folder(self) -> Path:
        return GOLDEN / self.target / (f"vllm-{self.variant}" if self.flavour == "vllm" else self.variant)

    def render(self, out: Path) -> dict[str, bytes]:
        """`builder render` into `out` (in process: conftest.run_cli_inproc); the context by file."""
        proc = run_cli_inproc("render", "--flavour", self.flavour, "--target", self.target,
                              "--variant", self.variant, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def images(flavour: str | None = None) -> list[Image]:
    """Every image the shipped recipes render, both flavours."""
    found = [Image("llama.cpp", path.stem, variant) for path in sorted((ROOT / "recipes").glob("*.yaml"))
             if path.stem in TARGETS for variant in load_recipe(path).variants]
    found += [Image("vllm", path.stem, variant) for path in sorted(VLLM_RECIPES.glob("*.yaml"))
              for variant in load_vllm_recipe(path).variants]
    return [image for image in found if flavour in (None, image.flavour)]


def folders() -> set[Path]:
    """The per-image golden folders on disk."""
    return {p for p in GOLDEN.glob("*/*") if p.is_dir() and p.parent != SHARED}


def expected(folder: Path) -> dict[str, bytes]:
    """An image's whole golden context: its own files and the shared ones its shared.txt names."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and p.name != MANIFEST}
    manifest = folder / MANIFEST
    for line in manifest.read_text().splitlines() if manifest.is_file() else []:
        name, source = line.split(" ")
        assert name not in files, f"{folder}: {name} is both shared and its own"
        files[name] = (ROOT / source).read_bytes()
    return files


def assemble(folder: Path, out: Path) -> Path:
    """The golden context written out whole (for checks that read a context folder)."""
    for name, data in expected(folder).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return out


def update(rendered: dict[Image, dict[str, bytes]]) -> None:
    """Rewrite every golden: a file is shared when two or more images of a flavour carry it, all alike."""
    versions: dict[tuple[str, str], set[bytes]] = defaultdict(set)
    users: dict[tuple[str, str], int] = defaultdict(int)
    for image, files in rendered.items():
        for name, data in files.items():
            versions[(image.flavour, name)].add(data)
            users[(image.flavour, name)] += 1
    shared = {key for key, seen in versions.items() if len(seen) == 1 and users[key] > 1}
    copied = {p.read_bytes(): p for p in sorted((ROOT / "images").rglob("*"), reverse=True) if p.is_file()}
    shutil.rmtree(SHARED, ignore_errors=True)
    for folder in folders():
        shutil.rmtree(folder)
    for image, files in rendered.items():
        image.folder.mkdir(parents=True)
        lines = []
        for name, data in files.items():
            where = SHARED / image.flavour / name if (image.flavour, name) in shared else image.folder / name
            if where.is_relative_to(SHARED) and data in copied:
                where = copied[data]
            else:
                where.parent.mkdir(parents=True, exist_ok=True)
                where.write_bytes(data)
            if where.is_relative_to(SHARED) or where.is_relative_to(ROOT / "images"):
                lines.append(f"{name} {where.relative_to(ROOT).as_posix()}\n")
        (image.folder / MANIFEST).write_text("".join(sorted(lines)))
