"""Each generation's bill of materials (bom.json), `pxe list`'s models, and `pxe diff A B`: what changed between two
generations and exactly which nodes must reboot. Published without booting, from fake netboot sets."""

import hashlib
import json
from pathlib import Path

import yaml
from test_netboot import fake_artifacts
from test_netboot_services import BIG, CHAT, MACS, cluster_file

from builder.cluster.plans import load_for_netboot, models, publish_services
from builder.netboot.bom import model_revision, model_source
from builder.netboot.publish import current_id
from conftest import run_cli_inproc


def publish(tmp_path: Path, path: Path) -> str:
    """Publish the cluster file with the same netboot set every time (so only what the file changes differs)."""
    folder = tmp_path / "artifacts-same"
    manifest = json.loads((folder / "manifest.json").read_text()) if folder.is_dir() else \
        fake_artifacts(tmp_path, "same")[1]
    loaded = load_for_netboot(path)
    gen, _ = publish_services(tmp_path / "pxe-root", loaded, models(loaded, print),
                              {("cpu", "cpu"): (folder, manifest)}, keep=3)
    return gen


def edit(path: Path, change: object) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(yaml.safe_dump(data))


def new_big_model_and_node_d(tmp_path: Path, path: Path) -> bytes:
    """big's model changes (b is its head, c its RPC worker); d joins, serving nothing and with no address (so no
    other node's firewall changes)."""
    bigger = b"GGUF big model, v2"
    (tmp_path / "big2.gguf").write_bytes(bigger)

    def change(data: dict[str, list[dict[str, object]]]) -> None:
        data["services"][1].update(model="big2.gguf", sha256=hashlib.sha256(bigger).hexdigest())
        data["nodes"].append({"name": "d", "mac": MACS[3], "target": "cpu", "memory": "1GiB"})
    edit(path, change)
    return bigger


def pxe(root: Path, *words: str) -> tuple[int, str, str]:
    proc = run_cli_inproc("pxe", *words, "--root", str(root))
    return proc.returncode, proc.stdout, proc.stderr


def test_diff_names_exactly_the_nodes_that_must_reboot(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    first = publish(tmp_path, path)
    bigger = new_big_model_and_node_d(tmp_path, path)
    second = publish(tmp_path, path)
    root = tmp_path / "pxe-root"
    assert first != second and current_id(root) == second
    code, out, err = pxe(root, "diff", "previous", "current")
    assert code == 0, err
    old, new = hashlib.sha256(BIG).hexdigest(), hashlib.sha256(bigger).hexdigest()
    assert out.splitlines() == [
        f"from {first} to {second}",
        f"model big: sha256 {old[:12]} -> {new[:12]}; source big.gguf -> big2.gguf",
        f"node d: added ({MACS[3]}, cpu-cpu; it boots this generation when powered on)",
        f"node b: must reboot ({MACS[1]}; changed: plan, script)",  # big's head: its plan names the model
        "cluster.yaml: changed",
        "reboot: b",  # a (chat only) and c (big's RPC worker: no model in its plan) boot the same files
    ]
    doc = json.loads(pxe(root, "diff", first, second, "--json")[1])
    assert doc["reboot"] == ["b"] and doc["from"] == first and doc["to"] == second
    assert doc["nodes"]["added"] == [{"name": "d", "mac": MACS[3], "set": "cpu-cpu"}]
    assert doc["nodes"]["removed"] == [] and doc["sets"] == []
    assert doc["models"] == [{"service": "big", "change": "changed",
                              "fields": {"sha256": [old, new], "source": ["big.gguf", "big2.gguf"]}}]
    # backwards: d is removed, b must reboot again
    back = json.loads(pxe(root, "diff", second, first, "--json")[1])
    assert back["nodes"]["removed"] == [{"name": "d", "mac": MACS[3]}] and back["reboot"] == ["b"]
    # the same generation: nothing changed, nobody reboots
    assert pxe(root, "diff", "current", second)[1].splitlines()[1:] == [
        f"no changes between {second} and {second}", "reboot: no node"]


def test_gateway_settings_change_reboots_no_node(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    publish(tmp_path, path)
    edit(path, lambda data: data.update(gateway={"port": 8081}))
    publish(tmp_path, path)
    code, out, _ = pxe(tmp_path / "pxe-root", "diff", "previous", "current")
    assert code == 0
    assert out.splitlines()[1:] == ["cluster.yaml: changed",
                                     "gateway: settings changed (run `builder cluster up` again to apply them)",
                                     "reboot: no node"]


def test_bom_records_every_node_set_and_model(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    gen = publish(tmp_path, path)
    root = tmp_path / "pxe-root"
    bom = json.loads((root / "generations" / gen / "bom.json").read_text())
    chat = hashlib.sha256(CHAT).hexdigest()
    assert bom["models"]["chat"] == {"engine": "llama.cpp", "sha256": chat, "blob_sha256": chat,
                                     "source": "chat.gguf", "revision": None}
    assert bom["cluster_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = json.loads((tmp_path / "artifacts-same" / "manifest.json").read_text())
    assert bom["sets"]["cpu-cpu"]["root_sha256"] == manifest["files"]["root.squashfs"]["sha256"]
    assert bom["sets"]["cpu-cpu"]["kernel_version"] == "6.1.0-0-amd64"
    b = bom["nodes"]["b"]
    nodes = root / "generations" / gen / "nodes"
    stem = MACS[1].replace(":", "-")
    assert b["mac"] == MACS[1] and b["set"] == "cpu-cpu"
    for key, suffix in (("script_sha256", "ipxe"), ("plan_sha256", "plan"), ("firewall_sha256", "nft")):
        assert b[key] == hashlib.sha256((nodes / f"{stem}.{suffix}").read_bytes()).hexdigest()
    assert sorted(bom["nodes"]) == ["a", "b", "c"]


def test_list_shows_each_generations_images_and_models(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    publish(tmp_path, path)
    code, out, err = pxe(tmp_path / "pxe-root", "list")
    assert code == 0, err
    chat, big = (hashlib.sha256(m).hexdigest()[:12] for m in (CHAT, BIG))
    assert out.splitlines()[1:] == [f"    cpu-cpu                  image sha256:{'0' * 12}",
                                    f"    models big: {big}, chat: {chat}"]
    doc = json.loads(pxe(tmp_path / "pxe-root", "list", "--json")[1])
    assert [m["service"] for m in doc[0]["models"]] == ["big", "chat"]
    assert doc[0]["models"][0]["source"] == "big.gguf"


def test_a_generation_without_a_bill_of_materials_lists_and_diffs_by_its_node_files(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    first = publish(tmp_path, path)
    root = tmp_path / "pxe-root"
    (root / "generations" / first / "bom.json").unlink()  # as publish wrote generations before this change
    new_big_model_and_node_d(tmp_path, path)
    second = publish(tmp_path, path)
    code, out, err = pxe(root, "list")
    assert code == 0, err
    assert out.splitlines()[2] == "    no bill of materials (published before builder recorded one)"
    code, out, err = pxe(root, "diff", first, second)
    assert code == 0, err
    assert out.splitlines()[1:] == [
        f"models: not compared ({first} has no bill of materials); the node plans that name them are",
        f"node d: added ({MACS[3]}, cpu-cpu; it boots this generation when powered on)",
        f"node b: must reboot ({MACS[1]}; changed: plan, script)",
        "cluster.yaml: changed",
        "reboot: b"]


def test_a_damaged_or_hand_edited_bill_of_materials_is_one_line(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    gen = publish(tmp_path, path)
    root = tmp_path / "pxe-root"
    target = root / "generations" / gen / "bom.json"
    good = json.loads(target.read_text())
    bad_source = json.loads(json.dumps(good))
    bad_source["models"]["chat"]["source"] = "\x1b[2Jgotcha"
    bad_set = json.loads(json.dumps(good))
    bad_set["nodes"]["a"]["set"] = "cpu-other"
    for text, message in [
        ("{not json", "bom.json: not readable JSON"),
        ("[1, 2]", "bom.json: expected a JSON object"),
        (json.dumps(bad_source), "bom.json: models.chat.source: "),
        (json.dumps(bad_set), "bom.json: nodes.a.set: cpu-other is not one of the sets"),
    ]:
        target.write_text(text)
        for words in (("list",), ("diff", "current", "current")):
            code, out, err = pxe(root, *words)
            assert code == 2 and "Traceback" not in err, err
            assert err.startswith("error: ") and message in err.splitlines()[0], err
            assert "\x1b" not in err


def test_a_wrong_generation_id_is_one_line_with_the_closest_one(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    gen = publish(tmp_path, path)
    root = tmp_path / "pxe-root"
    typo = gen[:-1] + ("0" if gen[-1] != "0" else "1")
    code, _, err = pxe(root, "diff", typo, "current")
    assert code == 2 and f"no generation '{typo}'" in err and f"did you mean '{gen}'?" in err, err
    code, _, err = pxe(root, "diff", "previous", "current")
    assert code == 2 and f"no generation before the current one ({gen})" in err, err
    code, out, err = pxe(root, "diff", gen[:6], "current")  # a unique start of an id is enough
    assert code == 0 and out.splitlines()[0] == f"from {gen} to {gen}", err


def test_a_model_source_keeps_no_credentials_and_names_its_revision(tmp_path: Path) -> None:
    assert model_source("https://user:hunter2@models.example:8443/m.gguf?token=abc#x", tmp_path) == \
        "https://models.example:8443/m.gguf"
    assert model_source(str(tmp_path / "models" / "m.gguf"), tmp_path) == "models/m.gguf"
    assert model_source("m.gguf", tmp_path) == "m.gguf"
    assert model_revision("hf://org/repo@0123abcd/file.gguf") == "0123abcd"
    assert model_revision("https://models.example/m.gguf") is None


def test_a_new_root_reboots_every_node_that_boots_it(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    publish(tmp_path, path)
    root = tmp_path / "pxe-root"
    folder, manifest = fake_artifacts(tmp_path, "rebuilt")  # the same image digest, another root (and kernel)
    manifest["image_digest"] = "sha256:" + "1" * 64
    loaded = load_for_netboot(path)
    publish_services(root, loaded, models(loaded, print), {("cpu", "cpu"): (folder, manifest)}, keep=3)
    lines = pxe(root, "diff", "previous", "current")[1].splitlines()
    old_root = json.loads((tmp_path / "artifacts-same" / "manifest.json").read_text())["files"]["root.squashfs"]
    assert lines[1].startswith(f"set cpu-cpu: image sha256:{'0' * 12} -> sha256:{'1' * 12}; "
                               f"root {old_root['sha256'][:12]} -> {manifest['files']['root.squashfs']['sha256'][:12]}")
    assert lines[-1] == "reboot: a, b, c"
    assert lines[2:5] == [f"node {n}: must reboot ({mac}; changed: root, script)"
                          for n, mac in zip("abc", MACS[:3], strict=True)]


def test_a_sets_kernel_packages_are_recorded_and_a_hostile_one_stops_the_publish(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    folder, manifest = fake_artifacts(tmp_path, "pinned")
    loaded = load_for_netboot(path)
    root = tmp_path / "pxe-root"
    manifest["kernel_packages"] = {"linux-image-amd64": "6.1.192-3", "firmware-misc-nonfree": ""}
    gen, _ = publish_services(root, loaded, models(loaded, print), {("cpu", "cpu"): (folder, manifest)}, keep=3)
    assert json.loads((root / "generations" / gen / "bom.json").read_text())["sets"]["cpu-cpu"]["kernel_packages"] \
        == {"firmware-misc-nonfree": "", "linux-image-amd64": "6.1.192-3"}
    (tmp_path / "sets").mkdir()
    folder.rename(tmp_path / "sets" / "cpu-cpu")
    (tmp_path / "sets" / "cpu-cpu" / "manifest.json").write_text(
        json.dumps({**manifest, "kernel_packages": {"linux-image-amd64": "1\nrm -rf /"}}))
    proc = run_cli_inproc("pxe", "publish", str(path), "--root", str(root), "--artifacts", str(tmp_path / "sets"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "kernel_packages: 'linux-image-amd64': expected a Debian package name and version" in \
        proc.stderr.splitlines()[0]
    assert current_id(root) == gen and len(list((root / "generations").iterdir())) == 1  # nothing half-written


def test_a_generation_without_a_bill_of_materials_and_a_hand_edited_nodes_json_is_one_line(tmp_path: Path) -> None:
    gen = publish(tmp_path, cluster_file(tmp_path))
    folder = tmp_path / "pxe-root" / "generations" / gen
    (folder / "bom.json").unlink()
    nodes = json.loads((folder / "nodes.json").read_text())
    nodes["a"]["artifacts"] = "\x1b[2Jcpu"
    (folder / "nodes.json").write_text(json.dumps(nodes))
    code, _, err = pxe(tmp_path / "pxe-root", "diff", "current", "current")
    assert code == 2 and "Traceback" not in err and "\x1b" not in err, err
    assert "nodes.json: 'a': expected a node name with mac and artifacts" in err.splitlines()[0]
