"""CMake flags from recipes reach images/scripts/build-llama.sh as one argument each, whatever they hold.

The toolchain stage's RUN line is a shell command (`/bin/sh -c`, as podman and docker run it): a value such as
CUDA's "86;89" spliced in unquoted would end the command at the `;`. Here the rendered Containerfile is parsed
with moby's own parser, and its RUN command is run by a real /bin/sh with the build script swapped for one that
prints the arguments it gets.
"""

import subprocess
from pathlib import Path

import dockerfile
import pytest
import yaml
from test_recipes import assert_one_clear_error, with_change, write_recipe

from builder.plan.make import make_plan
from builder.recipe.load import load_recipe, recipe_path_for
from builder.recipe.models import SourceInfo
from builder.render.context import render_files
from conftest import run_cli_inproc

SCRIPT = "/usr/local/lib/builder/build-llama.sh"
HOSTILE = {
    "CMAKE_CUDA_ARCHITECTURES": "86;89",
    "SPACES": "a b  c",
    "QUOTES": "it's \"quoted\"",
    "SUBSTITUTION": "$(touch {marker}) `touch {marker}` ${{HOME}}",
    "CONTINUATION": "ends with a backslash \\",
    "COMMENT": "#not a comment",
    "GLOB": "*",
}


def _render(cmake: dict[str, str]) -> tuple[dict[str, str], str]:
    recipe = load_recipe(recipe_path_for("cpu"))
    assert recipe.llama_cpp is not None
    recipe = recipe.model_copy(update={"llama_cpp": recipe.llama_cpp.model_copy(update={"cmake": cmake})})
    source = SourceInfo(locator="x", identity="sha256:" + "a" * 64, version="1", epoch=1_700_000_000)
    plan = make_plan(recipe, "recipes/cpu.yaml", source)
    return plan.cmake, render_files(plan)["Containerfile"].decode()


def _build_run(containerfile: str) -> tuple[list[str], str]:
    """The instruction names of the Containerfile and the shell command of the RUN that calls the script."""
    commands = dockerfile.parse_string(containerfile)
    runs = [c.value[0] for c in commands if c.cmd == "RUN" and SCRIPT in c.value[0]]
    assert len(runs) == 1
    return [c.cmd for c in commands], runs[0]


def test_every_cmake_value_arrives_as_one_argument_and_adds_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "substituted"
    hostile = {key: value.format(marker=marker) for key, value in HOSTILE.items()}
    cmake, containerfile = _render(hostile)
    instructions, command = _build_run(containerfile)
    assert instructions == _build_run(_render({})[1])[0], "a value added or removed an instruction"

    printer = tmp_path / "print-args"
    printer.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    printer.chmod(0o755)
    # Run where a `*` would match files, so an unquoted glob would show.
    (tmp_path / "a-file").touch()
    proc = subprocess.run(["/bin/sh", "-c", command.replace(SCRIPT, str(printer), 1)], cwd=tmp_path,
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.decode().split("\0")[:-1]
    assert args[:4] == ["/src/llama.cpp", "/build", "/opt/llama", "llama-server ggml-rpc-server llama-cli llama-bench"]
    assert args[4:] == [f"-D{key}={value}" for key, value in cmake.items()]
    assert "-DCMAKE_CUDA_ARCHITECTURES=86;89" in args
    assert not marker.exists(), "a command substitution in a value ran"


def test_a_plain_flag_stays_readable() -> None:
    _, containerfile = _render({"GGML_BLAS": "ON"})
    assert "    -DGGML_BLAS=ON \\\n" in containerfile


@pytest.mark.parametrize(("cmake", "needle"), [
    # The recipe loader refuses these first (render's own check guards plans made by library callers).
    ({"GGML_CUDA": "ON\nRUN touch /pwned"}, "cmake.GGML_CUDA: Value error, must be one line"),
    ({"BAD KEY": "1"}, "cmake['BAD KEY'] (key): Value error, must be a CMake variable name"),
    ({"A=B": "1"}, "cmake['A=B'] (key): Value error, must be a CMake variable name"),
])
def test_a_flag_that_cannot_be_one_word_is_refused_in_one_line(cmake: dict[str, str], needle: str,
                                                                tmp_path: Path) -> None:
    path = write_recipe(tmp_path, yaml.safe_dump(with_change(["variants", "cpu", "cmake"], cmake)))
    out = tmp_path / "ctx"
    proc = run_cli_inproc("render", "--recipe", str(path), "--out", str(out))
    assert_one_clear_error(proc, f"{path.name}: ", needle)
    assert not out.exists(), "nothing is written for a refused recipe"
