"""`builder run` command lines: host network, model files mounted read-only, roles passed through."""

import os
from pathlib import Path

import pytest

from builder.engines.docker import DockerEngine
from builder.engines.podman import PodmanEngine
from builder.recipe.targets import Host
from builder.use.launch import container_argv
from conftest import require_engine, run_cli_inproc


def test_model_file_is_mounted_read_only_and_path_rewritten(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    argv = container_argv(DockerEngine(), "img:1", "server", ["-m", str(model), "--rpc", "h:1"], detach=True)
    assert argv[:2] == ["docker", "run"]
    assert argv[argv.index("--network") + 1] == "host"
    assert "--detach" in argv and "--rm" in argv
    assert argv[argv.index("--volume") + 1] == f"{model}:/models/tiny.gguf:ro"
    assert argv[argv.index("img:1"):] == ["img:1", "server", "-m", "/models/tiny.gguf", "--rpc", "h:1"]


def test_model_given_with_equals_and_missing_paths_are_left_alone(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    argv = container_argv(DockerEngine(), "img", "server", [f"--model={model}", "-m", "/models/in-image.gguf"])
    assert argv[-3:] == ["--model=/models/m.gguf", "-m", "/models/in-image.gguf"]
    assert argv.count("--volume") == 1


def test_run_print_shows_the_engine_command() -> None:
    require_engine("docker")
    proc = run_cli_inproc("run", "--engine", "docker", "--image", "localhost/x:y", "--print", "rpc-worker",
                          "--port", "50099")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-4:] == ["localhost/x:y", "rpc-worker", "--port", "50099"]
    assert "--network host" in proc.stdout


def test_unknown_role_lists_the_roles() -> None:
    proc = run_cli_inproc("run", "--image", "x", "serve")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == "error: unknown role 'serve' (did you mean 'server'?)"
    assert "rpc-worker, rpc-seed, server, bench, shell, smoke" in proc.stderr


def test_device_flags_give_devices_by_group_id_security_and_env(tmp_path: Path) -> None:
    dri = tmp_path / "dri"
    dri.mkdir()
    (dri / "renderD128").write_text("")
    host = Host(devices=(str(dri), str(tmp_path / "absent")), security=("seccomp=unconfined",),
                env={"GGML_OPENVINO_DEVICE": "NPU"}, cdi="nvidia.com/gpu=all")
    flags = DockerEngine().device_flags(host)
    gid = (dri / "renderD128").stat().st_gid
    assert flags == ["--device", str(dri), "--group-add", str(gid), "--security-opt", "seccomp=unconfined",
                     "--env", "GGML_OPENVINO_DEVICE=NPU", "--gpus", "all"]
    podman = PodmanEngine().device_flags(host)
    assert podman[-2:] == ["--device", "nvidia.com/gpu=all"]
    assert podman[podman.index("--group-add") + 1] == (str(gid) if os.geteuid() == 0 else "keep-groups")


def test_cpu_variant_needs_no_device_flags() -> None:
    from builder.recipe.load import select

    assert DockerEngine().device_flags(select("cpu", None)[1].host) == []


def test_run_print_mounts_the_host_npu_driver_where_the_image_loader_finds_it(tmp_path: Path) -> None:
    """Intel's NPU driver comes from the host, read-only, under the name the Level Zero loader opens."""
    require_engine("podman")
    lib = tmp_path / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libze_intel_npu.so.1.38.0").write_bytes(b"\x7fELF")
    (lib / "libze_intel_npu.so.1").symlink_to("libze_intel_npu.so.1.38.0")
    (lib / "libnpu_driver_compiler.so").write_bytes(b"\x7fELF")
    proc = run_cli_inproc("run", "-t", "intel-npu", "--engine", "podman", "--image", "localhost/x:y",
                          "--driver-dir", str(lib), "--print", "shell")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    volumes = [words[i + 1] for i, word in enumerate(words) if word == "--volume"]
    assert f"{lib}/libze_intel_npu.so.1.38.0:/usr/lib/x86_64-linux-gnu/libze_intel_npu.so.1:ro" in volumes
    assert f"{lib}/libnpu_driver_compiler.so:/usr/lib/x86_64-linux-gnu/libnpu_driver_compiler.so:ro" in volumes
    assert "--env GGML_OPENVINO_DEVICE=NPU" in proc.stdout
    assert "Intel NPU user-space driver" not in proc.stderr


def test_run_without_the_npu_driver_warns_and_mounts_nothing(tmp_path: Path) -> None:
    require_engine("podman")
    if any((Path(d) / "libze_intel_npu.so.1").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib")):
        pytest.skip("the missing-driver warning needs a host without Intel's NPU driver; CI machines have none")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli_inproc("run", "-t", "intel-npu", "--engine", "podman", "--image", "localhost/x:y",
                          "--driver-dir", str(empty), "--print", "shell")
    assert proc.returncode == 0, proc.stderr
    assert "libze_intel_npu" not in proc.stdout
    assert ("warning: Intel NPU user-space driver (libze_intel_npu.so.1, libnpu_driver_compiler.so) not found "
            "on this host") in proc.stderr
    assert "builder doctor --target intel-npu" in proc.stderr


def test_driver_dir_that_does_not_exist_is_one_error(tmp_path: Path) -> None:
    proc = run_cli_inproc("run", "-t", "intel-npu", "--image", "localhost/x:y", "--driver-dir", str(tmp_path / "nope"),
                          "--print", "shell")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == f"error: --driver-dir {tmp_path / 'nope'}: no such folder"
