"""The quickstarts without an engine: their local cluster files name only the tiny models their pages make, with
the sha256 tiny_gguf.py gives on every machine; the checker the engine test uses tells right output from wrong;
every relative link of the README and the quickstarts leads to a file. tests/engine/test_quickstarts.py runs them."""

import hashlib
import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

import gguf
import pytest
import yaml

from builder.cluster.model import load_cluster
from conftest import ROOT, run_cli_inproc
from quickstarts import FOLDER, PAGES, mismatch, steps


def tiny_gguf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tiny_gguf", FOLDER / "tiny_gguf.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def local_file(page: str) -> Path:
    up = [s.command for s in steps((FOLDER / page).read_text()) if s.command.startswith("builder cluster up --local")]
    assert len(up) == 1, (page, up)
    return FOLDER / up[0].split()[-1]


@pytest.mark.parametrize("page", PAGES)
def test_local_file_names_only_the_models_its_page_makes(page: str, tmp_path: Path) -> None:
    made = {}
    for step in steps((FOLDER / page).read_text()):
        match = re.fullmatch(r"python3 tiny_gguf\.py (\S+) --seed (\d+)", step.command)
        if match:
            made[match.group(1)] = int(match.group(2))
    path = local_file(page)
    data = yaml.safe_load(path.read_text())
    writer = tiny_gguf()
    for service in data["services"]:
        assert service["model"] in made, f"{path.name}: {service['model']} is not made by {page}"
        expected = hashlib.sha256(writer.gguf_bytes(made[service["model"]])).hexdigest()
        assert service["sha256"] == expected, f"{path.name}: {service['name']}: sha256"
    assert all(n["target"] == "cpu" for n in data["nodes"])  # what any machine builds
    assert "http" not in path.read_text().split("# ", 1)[0]
    for model, seed in made.items():  # the page's commands, in a folder of their own
        (tmp_path / model).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / model).write_bytes(writer.gguf_bytes(seed))
    shutil.copy(path, tmp_path / path.name)
    loaded = load_cluster(tmp_path / path.name)  # a valid services-form file
    assert loaded.cluster.gateway.key_file == "api-key"


def test_tiny_gguf_is_a_gguf_llama_reads(tmp_path: Path) -> None:
    writer = tiny_gguf()
    first, again, other = writer.gguf_bytes(1), writer.gguf_bytes(1), writer.gguf_bytes(2)
    assert first == again and first != other and len(first) == 265120
    (tmp_path / "m.gguf").write_bytes(first)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 354
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["token_embd.weight"] == [64, 354] and shapes["blk.1.ffn_down.weight"] == [128, 64]
    assert len(shapes) == 2 + 2 * 9 + 1


@pytest.mark.parametrize(("shows", "output", "wrong"), [
    (("a", "b"), "a\nb", None),
    (("a", "…", "c"), "a\nb\nb\nc", None),
    (("model:  x…",), "model: xyz", None),  # runs of spaces are one, … inside a line is any text
    (("a", "c"), "a\nb\nc", "a"),  # lines shown together are printed together
    (("a",), "a\nb", "a"),  # the output ends as shown unless a … line follows
    (("…", "b"), "a\nb\nc", "b"),
    (("b", "…"), "a\nb", "b"),  # and starts as shown unless a … line comes first
    (('"model": "tiny-big",', "…"), '"model": "tiny-chat",\nx', '"model": "tiny-big",'),
])
def test_the_checker_tells_shown_output_from_other_output(shows: tuple[str, ...], output: str,
                                                          wrong: str | None) -> None:
    assert mismatch(shows, output) == wrong


def test_console_blocks_are_commands_and_what_they_print() -> None:
    text = "```console\n$ echo a \\\n    b\na b\n$ true\n```\n```sh\n$ not run\n```\n"
    found = steps(text)
    assert [(s.command, s.shows) for s in found] == [("echo a \\\n    b", ("a b",)), ("true", ())]


PAGES_WITH_LINKS = [ROOT / "README.md", *sorted(FOLDER.glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES_WITH_LINKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(page: Path) -> None:
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md":
            headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
            if anchor not in headings:
                missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: links to nothing: {missing}"


def test_the_box_3_line_of_docs_clusters_is_what_cluster_commands_prints() -> None:
    doc = (ROOT / "docs" / "clusters.md").read_text()
    # the page writes the example's placeholder sha256 as SHA
    shown = next(line.strip() for line in doc.splitlines() if "--name builder-codellama-34b " in line
                 ).replace("SHA", "0" * 64)
    proc = run_cli_inproc("cluster", "commands", str(ROOT / "docs" / "examples" / "rtx-3060-x4.yaml"),
                          "--node", "rtx3")
    assert proc.returncode == 0, proc.stderr
    assert shown in proc.stdout.splitlines(), proc.stdout
