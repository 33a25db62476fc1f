"""Shared fixtures: the CLI (a real process or in this one), the pinned llama.cpp source, a tiny model, engines."""

import io
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from builder.cli.main import execute
from builder.engines import ENGINES, cleanup
from builder.flavours.prepare import prepare
from builder.pipeline.build import Prepared
from builder.recipe.load import recipe_path_for

ROOT = Path(__file__).resolve().parent.parent
# The support modules (tests/support) and each test folder, whose modules import one another by name.
for _folder in ("support", "unit", "engine", "qemu"):
    sys.path.insert(0, str(Path(__file__).resolve().parent / _folder))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tinymodel import make_tiny_model  # noqa: E402

pytest_plugins = ["timing", "vllm_fixtures"]


def loopback_url(url: str) -> bool:
    """An http(s) URL whose host is 127.0.0.0/8, ::1 or localhost."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return False
    if parsed.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parsed.hostname).is_loopback
    except ValueError:
        return False


def _check_hub_endpoint(env: dict[str, str], where: str) -> None:
    """The network rule for huggingface_hub: a test reaches a hub on loopback only."""
    endpoint = env.get("HF_ENDPOINT", "")
    if not loopback_url(endpoint):
        pytest.fail(f"{where}: HF_ENDPOINT={endpoint!r} is not a loopback URL: tests reach no hub but their own "
                    "on 127.0.0.1 (tests/support/hubserver.py)", pytrace=False)


_HF_SESSION: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    """For the whole session, before anything imports huggingface_hub (it reads its environment when imported):
    no telemetry, no token of the user's, a cache of the session's own, and an endpoint on loopback where nothing
    listens (a test that needs a hub starts one and names it)."""
    _HF_SESSION["HF_HOME"] = tempfile.mkdtemp(prefix="builder-test-hf-")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                 "HF_XET_CACHE"):
        os.environ.pop(name, None)
    os.environ.update({"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": _HF_SESSION["HF_HOME"],
                       "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})


def pytest_unconfigure(config: pytest.Config) -> None:
    if "HF_HOME" in _HF_SESSION:
        shutil.rmtree(_HF_SESSION.pop("HF_HOME"), ignore_errors=True)


@pytest.fixture(autouse=True)
def hub_on_loopback(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails any test whose HF_ENDPOINT (this process's, and huggingface_hub's if it is imported) is not loopback,
    and any test that turns telemetry back on."""
    check_hub_session(request.node.nodeid)
    yield
    check_hub_session(request.node.nodeid)


def check_hub_session(nodeid: str) -> None:
    """What hub_on_loopback checks before and after every test."""
    _check_hub_endpoint(dict(os.environ), nodeid)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and not loopback_url(str(getattr(hub, "ENDPOINT", ""))):
        pytest.fail(f"{nodeid}: huggingface_hub's endpoint {hub.ENDPOINT!r} is not loopback", pytrace=False)
    if os.environ.get("HF_HUB_DISABLE_TELEMETRY") != "1":
        pytest.fail(f"{nodeid}: HF_HUB_DISABLE_TELEMETRY is not 1", pytrace=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/data/golden from the renderer")


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`builder ARGS` as a user runs it: a separate process, its exit code and both streams."""
    full_env = {**os.environ, **(env or {})}
    _check_hub_endpoint(full_env, f"builder {' '.join(args)[:80]}")
    started = time.monotonic()
    try:
        return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=cwd)
    finally:
        if args[:1] == ("build",) or args[:2] == ("pxe", "build"):  # image builds, for the time summary
            import timing  # the plugin pytest loaded (pytest_plugins), imported here so pytest rewrites it first

            timing.record_build(" ".join(a for a in args if not a.startswith(("/", "--json"))),
                                time.monotonic() - started)


def run_cli_inproc(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
                   cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`builder ARGS` in this process, for the many bad-input cases: what `run_cli` gives (exit code, both
    streams) without an interpreter start per case. It goes through `execute`, the function the real entry
    point calls after installing its signal handlers, with what a fresh process would have: stdin from
    /dev/null, fds 1 and 2 (so child processes' output too) in files of their own (sys.stdout and sys.stderr
    too, for this thread: see _ThisThread), `env` over os.environ, `cwd`, no logging handlers; all of it put
    back afterwards. An exception that escapes is printed as the interpreter would (a traceback, exit 1);
    past `timeout` (SIGALRM, main thread only) it raises subprocess.TimeoutExpired as subprocess.run does.
    Signals and the entry point itself need `run_cli`."""
    _check_hub_endpoint({**os.environ, **(env or {})}, f"builder {' '.join(args)[:80]}")
    root_log = logging.getLogger()
    saved_log = root_log.handlers[:], root_log.level, logging.getLogger("builder.progress").level
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull) as devnull:
        for stream in saved_streams[1:]:
            stream.flush()
        saved_fds = os.dup(1), os.dup(2)
        try:
            os.environ.update(env or {})
            os.chdir(cwd)
            root_log.handlers = []  # so the CLI's logging.basicConfig writes to this call's stderr
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdin = devnull
            sys.stdout = _ThisThread(_text_fd(1, "strict"), saved_streams[1])  # type: ignore[assignment]
            sys.stderr = _ThisThread(_text_fd(2, "backslashreplace"), saved_streams[2])  # type: ignore[assignment]
            timed_out = False
            try:
                with _alarm(timeout):
                    code = execute(args)
            except _Timeout:
                timed_out, code = True, -1
            except Exception:  # what the interpreter does with an exception nobody caught
                traceback.print_exc()
                code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, _ThisThread):
                    stream.mine.close()
            sys.stdin, sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            for handler in root_log.handlers:
                handler.close()
            root_log.handlers, _, _ = saved_log
            root_log.setLevel(saved_log[1])
            logging.getLogger("builder.progress").setLevel(saved_log[2])
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            cleanup._engine.cache_clear()  # which engines work is checked once per process
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    if timed_out:
        raise subprocess.TimeoutExpired(["builder", *args], timeout, stdout, stderr)
    return subprocess.CompletedProcess(["builder", *args], code, stdout, stderr)


class _Timeout(BaseException):  # not an Exception: the CLI's own `except Exception` must not swallow it
    pass


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise _Timeout in this thread after `seconds` (only the main thread can take signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _ThisThread:
    """sys.stdout or sys.stderr while the CLI runs in process: what this thread writes is the CLI's output;
    other threads (the tests' own servers, which a real CLI process would not share) keep the stream they had."""

    def __init__(self, mine: io.TextIOWrapper, others: object) -> None:
        self.mine, self.others, self.thread = mine, others, threading.get_ident()

    def __getattr__(self, name: str) -> object:
        return getattr(self.mine if threading.get_ident() == self.thread else self.others, name)


def _text_fd(fd: int, errors: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors=errors, write_through=True)


@contextmanager
def local_cluster(folder: Path, data: dict[str, object], engine: str,
                  timeout: float) -> Iterator[tuple[Path, str, str]]:
    """`builder cluster up --local` on a cluster file made of `data` in `folder`, and `down` afterwards.
    Yields the file, what `up` printed and the gateway's key (read from the file `up` names)."""
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = run_cli("cluster", "up", "--local", str(path), "--engine", engine, timeout=timeout)
    try:
        assert proc.returncode == 0, proc.stderr[-4000:]
        key_file = Path(re.search(r"^key\s+(\S+)", proc.stdout, re.M).group(1))  # type: ignore[union-attr]
        yield path, proc.stdout, key_file.read_text().strip()
    finally:
        down = run_cli("cluster", "down", "--local", str(path), timeout=300)
        assert down.returncode == 0, down.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require(missing: str | None) -> None:
    """A tool the real path needs: .ci/run installs it, so its absence fails in CI and skips elsewhere."""
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"must work in CI: {missing}")
    pytest.skip(missing)


def require_tool(command: str, package: str) -> None:
    require(None if shutil.which(command) else f"{command} is not installed (apt-get install {package})")


def require_engine(name: str) -> None:
    reason = ENGINES[name]().available()
    require(None if reason is None else f"{name} is not usable on this machine: {reason}")


@pytest.fixture(scope="session")
def goldens_written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With --update-golden: every image rendered and tests/data/golden rewritten (tests/data/goldens.py), once."""
    if request.config.getoption("--update-golden"):
        import goldens

        out = tmp_path_factory.mktemp("render")
        goldens.update({image: image.render(out / f"{image.flavour}-{image.target}-{image.variant}")
                        for image in goldens.images()})


@pytest.fixture(scope="session")
def cpu_prepared() -> Prepared:
    """The cpu recipe resolved with its pinned source (fetched once into the builder cache)."""
    return prepare(recipe_path_for("cpu"))


@pytest.fixture(scope="session")
def llama_cpu_image() -> str:
    """The cpu image, built with podman once per run with a build's time limit, before tests that start it with
    short limits of their own: on a fresh machine this first build bootstraps both bases and compiles."""
    require_engine("podman")
    proc = run_cli("build", "--target", "cpu", "--engine", "podman", "--json", timeout=5400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return str(json.loads(proc.stdout)["image"])


@pytest.fixture(scope="session")
def tiny_model(cpu_prepared: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = cpu_prepared.tree.path / "models" / "ggml-vocab-llama-spm.gguf"
    return make_tiny_model(vocab, tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
def engine_cli() -> str:
    return shutil.which("podman") or shutil.which("docker") or "podman"
