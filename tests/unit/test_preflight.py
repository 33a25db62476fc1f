"""The control node's tools are checked before a verb does any work: a machine without them gets one line
naming every missing tool and one `apt-get install` line, and nothing is fetched, built or written."""

from pathlib import Path

import yaml

from conftest import run_cli


def bare(tmp_path: Path) -> dict[str, str]:
    """A PATH with none of the tools, and a cache of the test's own (so "nothing written" can be seen)."""
    (tmp_path / "bin").mkdir()
    return {"PATH": str(tmp_path / "bin"), "BUILDER_CACHE": str(tmp_path / "cache")}


def test_pxe_build_names_every_missing_tool_and_the_one_install_line(tmp_path: Path) -> None:
    proc = run_cli("pxe", "build", "--target", "cpu", env=bare(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: builder pxe build needs mmdebstrap, mksquashfs, veritysetup, depmod, zstd, dpkg-deb, which this "
        "machine does not have",
        "hint: apt-get install mmdebstrap squashfs-tools cryptsetup-bin kmod zstd dpkg"]
    # nothing fetched or written before the refusal (the run's own claims folder is all there is, and empty)
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir()] == ["claims"] and not any((cache / "claims").iterdir())


def test_cluster_up_needs_haproxy_before_it_starts_anything(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF tiny")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "nodes": [{"name": "a", "mac": "52:54:00:00:00:01", "target": "cpu", "memory": "1GiB"}],
        "services": [{"name": "m", "model": "m.gguf", "sha256": "0" * 64, "nodes": ["a"]}]}))
    proc = run_cli("cluster", "up", "--local", str(path), env=bare(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: builder cluster up needs haproxy, which this machine does not have",
                                        "hint: apt-get install haproxy"]
