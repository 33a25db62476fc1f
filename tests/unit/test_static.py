"""Static checks on every golden build context (tests/support/goldens.py puts each together), built here or not.

Contexts of vendor stacks we cannot reach (ROCm, oneAPI, CUDA) are only ever checked this way, so the
checks are the ones a build would otherwise catch: the Containerfile parses (moby's own parser), every base
is pinned, every COPY source exists (or is one of the pinned inputs placed when building: the llama.cpp tree,
SDKs, apt keys and .deb files), no BuildKit-only syntax (docker's legacy builder must build it too),
and every shell script passes shellcheck.
"""

import re
import subprocess
from pathlib import Path

import dockerfile
import pytest

import goldens
from builder.plan.bases import BASE_REPOSITORY
from builder.render.context import STAGED_AT_BUILD
from conftest import require_tool

CONTEXTS = sorted(goldens.folders())
PINNED = re.compile(r"@sha256:[0-9a-f]{64}$")
BOOTSTRAPPED = re.compile(rf"^{re.escape(BASE_REPOSITORY)}:[a-z-]+-[0-9a-f]{{16}}$")


def ids(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


@pytest.mark.parametrize("context", CONTEXTS, ids=ids)
def test_containerfile_parses_pins_bases_and_copies_what_exists(context: Path, tmp_path: Path) -> None:
    context = goldens.assemble(context, tmp_path / context.name)
    commands = dockerfile.parse_file(str(context / "Containerfile"))
    stages: set[str] = set()
    for command in commands:
        if command.cmd == "FROM":
            ref = command.value[0]
            assert ref in stages or PINNED.search(ref) or BOOTSTRAPPED.match(ref), f"unpinned base {ref}"
            if len(command.value) == 3 and command.value[1].upper() == "AS":
                stages.add(command.value[2])
        elif command.cmd in ("COPY", "ADD"):
            assert not any(f.startswith(("--chmod", "--link", "--parents")) for f in command.flags), command.original
            if not any(f.startswith("--from") for f in command.flags):
                for source in command.value[:-1]:
                    staged = source.split("/")[0] in STAGED_AT_BUILD
                    assert staged or (context / source).exists(), f"COPY source missing: {source}"
        elif command.cmd == "RUN":
            assert not command.flags, f"BuildKit-only RUN flags: {command.original}"
            assert "<<" not in command.value[0], "heredocs need BuildKit"
    if context.name.startswith("vllm-"):
        # vLLM images install pinned wheels in one stage, or compile vLLM in a toolchain stage first
        assert commands[-2].cmd == "ENTRYPOINT" and commands[-2].value == ("/usr/local/bin/vllm-entrypoint",)
        return
    assert [c.cmd for c in commands].count("FROM") >= 2, "a toolchain stage and a runtime stage"
    assert commands[-2].cmd == "ENTRYPOINT" and commands[-2].value == ("/usr/local/bin/llama-entrypoint",)


@pytest.mark.parametrize("context", CONTEXTS, ids=ids)
def test_context_scripts_pass_shellcheck(context: Path, tmp_path: Path) -> None:
    require_tool("shellcheck", "shellcheck")
    context = goldens.assemble(context, tmp_path / context.name)
    scripts = sorted(str(p) for p in (context / "scripts").iterdir())
    proc = subprocess.run(["shellcheck", "--severity=info", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
