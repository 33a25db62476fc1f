"""A node pinned to a generation (`builder pxe pin`, pxe-root/pins/): it boots that generation's files whatever
`current` is, `pxe publish` and `pxe rollback` move only the nodes without a pin, and pruning keeps a pinned
generation and its blobs. The files are served by the real `builder pxe serve` on loopback."""

from pathlib import Path

import requests
from test_netboot import MAC, fake_artifacts, inventory, publish, served_root

from builder.netboot.publish import current_id, generations, rollback
from conftest import run_cli_inproc

STEM = MAC.replace(":", "-")


def squash_of(manifest: dict[str, object]) -> str:
    return manifest["files"]["root.squashfs"]["sha256"]  # type: ignore[index, no-any-return]


def test_a_pinned_node_boots_its_generation_and_keeps_it_from_pruning(tmp_path: Path) -> None:
    root, path = tmp_path / "pxe-root", inventory(tmp_path)
    old_folder, old = fake_artifacts(tmp_path, "old")
    old_id, _ = publish(root, path, {("cpu", "cpu"): (old_folder, old)})
    new_folder, new = fake_artifacts(tmp_path, "new")
    new_id, _ = publish(root, path, {("cpu", "cpu"): (new_folder, new)})
    assert current_id(root) == new_id

    done = run_cli_inproc("pxe", "pin", "--root", str(root), "--", str(path), "node1", "previous")
    assert done.returncode == 0 and done.stdout == f"node1: current -> generations/{old_id}\n", done.stderr
    listing = run_cli_inproc("pxe", "list", "--root", str(root)).stdout
    assert f"  {old_id}" in listing and f"    pinned {MAC}" in listing

    with served_root(root) as (base, _):
        boot = requests.get(f"{base}/current/boot.ipxe", timeout=5)
        # the boot script asks for the node's pin first, then the current generation's script
        lines = boot.text.splitlines()
        chain = next(line for line in lines if line.startswith("chain "))
        assert chain.index("/pins/${mac:hexhyp}.ipxe") < chain.index("/current/nodes/${mac:hexhyp}.ipxe")
        pinned = requests.get(f"{base}/pins/{STEM}.ipxe", timeout=5)
        assert pinned.status_code == 200 and f"builder.sha256={squash_of(old)}" in pinned.text
        live = requests.get(f"{base}/current/nodes/{STEM}.ipxe", timeout=5)
        assert f"builder.sha256={squash_of(new)}" in live.text
        for hidden in ("/pins/", "/pins/52-54-00-12-34-57.ipxe", f"/pins/{STEM}.nft"):
            assert requests.get(base + hidden, timeout=5).status_code == 404, hidden

        # a third publish with keep=0 keeps only the current generation and the pinned one, with its blobs
        third_folder, third = fake_artifacts(tmp_path, "third")
        third_id, _ = publish(root, path, {("cpu", "cpu"): (third_folder, third)}, keep=0)
        assert [g.id for g in generations(root)] == [old_id, third_id]
        assert (root / "blobs" / "sha256" / squash_of(old)).is_file()
        assert not (root / "blobs" / "sha256" / squash_of(new)).exists()
        assert requests.get(f"{base}/pins/{STEM}.ipxe", timeout=5).text == pinned.text
        # a rollback moves `current`, not the pin
        assert rollback(root) == old_id
        done = run_cli_inproc("pxe", "rollback", "--root", str(root), "--to", third_id)
        assert done.returncode == 0
        assert requests.get(f"{base}/pins/{STEM}.ipxe", timeout=5).text == pinned.text

        done = run_cli_inproc("pxe", "pin", "--root", str(root), "--clear", "--", str(path), "node1")
        assert done.returncode == 0 and done.stdout == f"node1: generations/{old_id} -> current (no pin)\n"
        assert requests.get(f"{base}/pins/{STEM}.ipxe", timeout=5).status_code == 404
    # unpinned, the old generation is pruned at the next publish
    publish(root, path, {("cpu", "cpu"): (third_folder, third)}, keep=0)
    assert [g.id for g in generations(root)] == [third_id]


def test_bad_pins_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    root, path = tmp_path / "pxe-root", inventory(tmp_path)
    folder, manifest = fake_artifacts(tmp_path, "a")
    gen, _ = publish(root, path, {("cpu", "cpu"): (folder, manifest)})
    other = tmp_path / "other"
    other.mkdir()
    second = inventory(other, nodes=[{"name": "node2", "mac": "52:54:00:12:34:99", "target": "cpu",
                                      "role": "rpc-worker"}])
    for args, message in [
        (["--", str(path), "node9", "current"], f"error: {path}: no netbooted node 'node9'"),
        (["--", str(path), "node1"], "error: give either GENERATION or --clear"),
        (["--clear", "--", str(path), "node1", "current"], "error: give either GENERATION or --clear"),
        (["--", str(path), "node1", "ffff"], "error: no generation 'ffff'"),
        # a generation published without that node has no boot script for it
        (["--", str(second), "node2", gen], f"error: generation '{gen}' in "),
    ]:
        done = run_cli_inproc("pxe", "pin", "--root", str(root), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(message), (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert not (root / "pins").exists() or not list((root / "pins").iterdir())
