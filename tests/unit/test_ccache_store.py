"""The ccache remote store: a real HTTP server on 127.0.0.1 and the real ccache binary using it."""

import http.client
import os
import subprocess
from pathlib import Path

import requests

from builder.fetch.ccache import CcacheStore
from conftest import require_tool


def test_put_get_head_delete_round_trip(tmp_path: Path) -> None:
    with CcacheStore(tmp_path / "store") as store:
        url = store.url + "ab/cdef0123"
        assert url.startswith(f"http://127.0.0.1:{store.server.server_address[1]}/{store.secret}/")
        assert requests.get(url, timeout=5).status_code == 404
        assert requests.put(url, data=b"object bytes", timeout=5).status_code == 201
        assert requests.get(url, timeout=5).content == b"object bytes"
        assert requests.head(url, timeout=5).status_code == 200
        assert requests.delete(url, timeout=5).status_code == 200
        assert requests.head(url, timeout=5).status_code == 404
    assert store.url.startswith("http://127.0.0.1:")


def test_without_the_build_secret_nothing_is_written_or_read(tmp_path: Path) -> None:
    """Another local process that finds the port can neither plant an object nor read one."""
    with CcacheStore(tmp_path / "store") as store:
        base = store.url.removesuffix(f"{store.secret}/")
        assert requests.put(store.url + "ab/known", data=b"genuine", timeout=5).status_code == 201
        wrong = "0" * len(store.secret)
        for url in (base + "ab/planted", f"{base}{wrong}/ab/planted", f"{base}{store.secret[:-1]}/ab/planted",
                    f"{base}{store.secret}x/ab/planted", f"{base}{store.secret.upper()}/ab/planted"):
            assert requests.put(url, data=b"poison", timeout=5).status_code in (400, 403), url
        for url in (base + "ab/known", f"{base}{wrong}/ab/known"):
            assert requests.get(url, timeout=5).status_code == 403
            assert requests.head(url, timeout=5).status_code == 403
            assert requests.delete(url, timeout=5).status_code == 403
        assert requests.get(store.url + "ab/known", timeout=5).content == b"genuine"
    assert sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file()) == ["known"]
    with CcacheStore(tmp_path / "store") as again:  # every build its own secret and port
        assert again.secret != store.secret and again.url != store.url
        assert requests.get(again.url + "ab/known", timeout=5).content == b"genuine"  # objects are kept


def test_paths_outside_the_store_are_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("no")
    with CcacheStore(tmp_path / "store") as store:
        host, port = store.server.server_address[:2]
        for path in (f"/{store.secret}/../secret", f"/{store.secret}/a/../../secret",
                     f"/{store.secret}/%2e%2e/secret"):
            for method in ("GET", "PUT"):
                conn = http.client.HTTPConnection(str(host), port, timeout=5)
                conn.request(method, path, body=b"x" if method == "PUT" else None)
                assert conn.getresponse().status == 400, (method, path)
                conn.close()
    assert (tmp_path / "secret").read_text() == "no"


def test_real_ccache_hits_through_the_store(tmp_path: Path) -> None:
    """Two compiles with empty local caches, each with its own store (its own secret and port) on one folder:
    the second is a remote hit, so a new secret per build costs no cache hits."""
    require_tool("ccache", "ccache")
    source = tmp_path / "unit.c"
    source.write_text("int answer(void) { return 42; }\n")

    def compile_once(store_url: str, local: Path) -> str:
        env = {**os.environ, "CCACHE_DIR": str(local), "CCACHE_REMOTE_STORAGE": store_url,
               "CCACHE_REMOTE_ONLY": "true", "CCACHE_COMPILERCHECK": "content"}
        subprocess.run(["ccache", "gcc", "-c", str(source), "-o", str(tmp_path / "unit.o")],
                       check=True, env=env, cwd=tmp_path)
        return subprocess.run(["ccache", "--print-stats"], check=True, env=env, capture_output=True,
                              text=True).stdout

    with CcacheStore(tmp_path / "store") as store:
        first = dict(line.split("\t") for line in compile_once(store.url, tmp_path / "a").splitlines())
    with CcacheStore(tmp_path / "store") as store:
        second = dict(line.split("\t") for line in compile_once(store.url, tmp_path / "b").splitlines())
    assert int(first["cache_miss"]) == 1
    assert int(second["remote_storage_hit"]) == 1 and int(second["cache_miss"]) == 0
    assert any((tmp_path / "store").rglob("*")), "the store kept no objects"
