"""OCI layouts from engine output: the legacy `docker save` archive (Debian's docker 20.10) converted."""

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from builder.engines.oci import LAYER_GZIP, layout_from_docker_archive, read_layout


def _tar_with(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_legacy_docker_archive_becomes_a_gzip_oci_image(tmp_path: Path) -> None:
    layers = [_tar_with("etc/one", b"first layer\n"), _tar_with("etc/two", b"second layer\n" * 1000)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    archive = tmp_path / "save.tar"
    with tarfile.open(archive, "w") as tar:
        members = {config_name: config, "manifest.json": json.dumps([{
            "Config": config_name, "RepoTags": ["x:y"], "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]).encode(),
            "aaa/layer.tar": layers[0], "bbb/layer.tar": layers[1]}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    layout = tmp_path / "layout"
    layout.mkdir()
    layout_from_docker_archive(archive, layout)
    image = read_layout(layout)
    assert image.digest == "sha256:" + hashlib.sha256(image.manifest).hexdigest()
    assert image.config.path.read_bytes() == config
    assert [layer.media_type for layer in image.layers] == [LAYER_GZIP, LAYER_GZIP]
    # Compressed for the registry, the same bytes underneath: the config's diff_ids still hold.
    assert [gzip.decompress(layer.path.read_bytes()) for layer in image.layers] == layers
    for blob in image.blobs:
        assert blob.digest == "sha256:" + hashlib.sha256(blob.path.read_bytes()).hexdigest()
        assert blob.size == blob.path.stat().st_size
    # Deterministic: converting again gives the same manifest digest.
    again = tmp_path / "again"
    again.mkdir()
    layout_from_docker_archive(archive, again)
    assert read_layout(again).digest == image.digest
