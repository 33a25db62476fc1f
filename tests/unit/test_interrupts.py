"""Interrupted runs and concurrent runs, without an engine: a real `builder` process, a real HTTP server on
127.0.0.1 that sends slowly, signals sent at a known moment, and two publishes into one pxe-root at once.

What a user would notice: a Ctrl-C or SIGTERM ends with exit 130/143 and one line, leaves no temp files and
no claim behind; a download that was cut off or carries other bytes is never taken for the pinned file; a
run killed outright leaves only recorded temp files, which the next run removes; a second run waits for the
first with a message.
"""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from builder.core.locks import locked
from builder.netboot.publish import current_id
from conftest import ROOT, run_cli

CHUNK = 64 * 1024


@dataclass
class Slow:
    """Serves `data` at /src.tar, one chunk per `delay` seconds; `started` is set once bytes have gone out."""

    data: bytes
    delay: float
    started: threading.Event = field(default_factory=threading.Event)
    port: int = 0


@contextmanager
def serve(slow: Slow) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(slow.data)))
            self.end_headers()
            try:
                for start in range(0, len(slow.data), CHUNK):
                    self.wfile.write(slow.data[start:start + CHUNK])
                    self.wfile.flush()
                    slow.started.set()
                    time.sleep(slow.delay)
            except OSError:
                pass  # the client went away: that is the point of these tests

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/src.tar"
    finally:
        server.shutdown()
        server.server_close()


def archive_bytes(size: int) -> bytes:
    """A llama.cpp-shaped tar with `size` bytes of filler (incompressible, so the download takes a while)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("llama/CMakeLists.txt", b'project("llama.cpp" C CXX)\n'),
                           ("llama/filler.bin", os.urandom(size))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def recipe(tmp_path: Path, url: str, sha256: str) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "cpu.yaml").read_text())
    data["llama_cpp"] = {"source": {"kind": "archive", "url": url, "sha256": sha256}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def builder(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "builder", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, cwd=ROOT)


def leftovers(cache: Path) -> list[str]:
    """Anything in the source cache that is not a finished entry, and claims of runs that ended."""
    found = [p.name for p in (cache / "sources" / "archives").glob(".*")]
    claims = cache / "claims"
    return found + ([f"claims/{p.name}" for p in claims.iterdir()] if claims.is_dir() else [])


@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                      (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_a_download_cleans_up_and_exits_128_plus_the_signal(
        tmp_path: Path, signum: int, code: int, word: str) -> None:
    data = archive_bytes(4 << 20)
    cache = tmp_path / "cache"
    slow = Slow(data, delay=0.05)
    with serve(slow) as url:
        proc = builder("plan", "--recipe", str(recipe(tmp_path, url, hashlib.sha256(data).hexdigest())),
                       env={"BUILDER_CACHE": str(cache)})
        assert slow.started.wait(60), "the download never started"
        time.sleep(0.3)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == word and "Traceback" not in err
    assert list((cache / "sources" / "archives").iterdir()) == []
    assert leftovers(cache) == []


def test_a_killed_download_is_never_trusted_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    data = archive_bytes(4 << 20)
    digest = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    env = {"BUILDER_CACHE": str(cache)}
    slow = Slow(data, delay=0.05)
    with serve(slow) as url:
        path = recipe(tmp_path, url, digest)
        proc = builder("plan", "--recipe", str(path), env=env)
        assert slow.started.wait(60)
        time.sleep(0.5)
        proc.kill()
        proc.communicate(timeout=30)
    archives = cache / "sources" / "archives"
    assert not (archives / f"{digest}.tar").exists(), "a cut-off download was named by its pin"
    assert [p.name for p in archives.iterdir() if not p.name.startswith(".tmp-")] == []
    assert len(list((cache / "claims").iterdir())) == 1  # the dead run's claim, listing its temp file

    fast = Slow(data, delay=0)
    with serve(fast) as url:
        again = run_cli("plan", "--recipe", str(recipe(tmp_path, url, digest)), "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["source"]["identity"] == f"sha256:{digest}"
    assert sorted(p.name for p in archives.iterdir()) == [f"{digest}.tar"]
    assert hashlib.sha256((archives / f"{digest}.tar").read_bytes()).hexdigest() == digest
    assert leftovers(cache) == []


def test_a_download_with_other_bytes_is_not_cached(tmp_path: Path) -> None:
    data = archive_bytes(1 << 20)
    cache = tmp_path / "cache"
    with serve(Slow(data, delay=0)) as url:
        proc = run_cli("plan", "--recipe", str(recipe(tmp_path, url, "ab" * 32)), env={"BUILDER_CACHE": str(cache)})
    assert proc.returncode == 1 and "sha256 mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert list((cache / "sources" / "archives").iterdir()) == []
    assert leftovers(cache) == []


# --- pxe-root: one publish at a time -------------------------------------------------------------------

def pulled_set(dest: Path, seed: str) -> None:
    """DEST/cpu-cpu as `pxe pull` leaves it, with small stand-in files."""
    folder = dest / "cpu-cpu"
    folder.mkdir(parents=True)
    files = {}
    for name in ("vmlinuz", "initrd.img", "root.squashfs"):
        data = f"{name} {seed}".encode() * 1000
        (folder / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = {"schema": 1, "target": "cpu", "variant": "cpu", "image": "localhost/builder/cpu:cpu",
                "image_digest": "sha256:" + "0" * 64, "kernel_version": "6.1.0-0-amd64", "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def cluster(path: Path, name: str) -> Path:
    path.write_text(yaml.safe_dump({
        "control": {"address": "10.0.2.2", "http_port": 8000},
        "nodes": [{"name": name, "mac": "52:54:00:12:34:56", "target": "cpu", "role": "rpc-worker"}],
    }))
    return path


def complete(root: Path, generation: str) -> bool:
    """Every blob the generation's node scripts name is there."""
    scripts = list((root / "generations" / generation / "nodes").glob("*.ipxe"))
    names = {w.rsplit("/", 1)[-1] for s in scripts for w in s.read_text().split() if "/blobs/sha256/" in w}
    return bool(scripts) and bool(names) and all((root / "blobs" / "sha256" / n).is_file() for n in names)


def test_concurrent_pxe_publishes_both_leave_complete_generations(tmp_path: Path) -> None:
    root = tmp_path / "pxe-root"
    for side in ("a", "b"):
        pulled_set(tmp_path / side, side)
        cluster(tmp_path / f"{side}.yaml", f"node-{side}")
    for _ in range(4):
        procs = [builder("pxe", "publish", str(tmp_path / f"{side}.yaml"), "--root", str(root),
                         "--artifacts", str(tmp_path / side), "--keep", "0", env={}) for side in ("a", "b")]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        live = current_id(root)
        assert live is not None and complete(root, live)
    assert not [p for p in root.rglob(".tmp-*")]


def test_a_second_publish_waits_for_the_first_and_says_so(tmp_path: Path) -> None:
    root = tmp_path / "pxe-root"
    pulled_set(tmp_path / "a", "a")
    cluster(tmp_path / "a.yaml", "node-a")
    root.mkdir()
    with locked(root / ".builder.lock", "test"):
        proc = builder("pxe", "publish", str(tmp_path / "a.yaml"), "--root", str(root),
                       "--artifacts", str(tmp_path / "a"), env={})
        time.sleep(5)
        assert proc.poll() is None, proc.communicate()
        assert current_id(root) is None
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"waiting for another builder publishing into {root} (lock {root / '.builder.lock'})" in err
    assert current_id(root) is not None and complete(root, str(current_id(root)))
