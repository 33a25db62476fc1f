"""`builder run` command lines: host network, model files mounted read-only, roles passed through."""

import os
from pathlib import Path

from builder.engines.docker import DockerEngine
from builder.engines.podman import PodmanEngine
from builder.launch import container_argv
from builder.targets import Host
from conftest import require_engine, run_cli


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
    proc = run_cli("run", "--engine", "docker", "--image", "localhost/x:y", "--print", "rpc-worker", "--port", "50099")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-4:] == ["localhost/x:y", "rpc-worker", "--port", "50099"]
    assert "--network host" in proc.stdout


def test_unknown_role_lists_the_roles() -> None:
    proc = run_cli("run", "--image", "x", "serve")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == "error: unknown role 'serve'"
    assert "rpc-worker, server, bench, shell, smoke" in proc.stderr


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
    from builder.recipes import select

    assert DockerEngine().device_flags(select("cpu", None)[1].host) == []
