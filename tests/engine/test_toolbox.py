"""`builder toolbox`: the commands each tool gets (--print), and the plain-podman path for real with the cpu image."""

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.engines.podman import PodmanEngine
from conftest import require, require_engine, require_tool, run_cli, run_cli_inproc

IMAGE = "localhost/example/tool:1"


def printed(*args: str) -> list[str]:
    proc = run_cli_inproc("toolbox", args[0], "--print", *args[1:])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_podman_create_mounts_home_on_the_host_network_and_keeps_the_container_up() -> None:
    create, start = printed("create", "--target", "cpu", "--image", IMAGE, "--tool", "podman")
    words = create.split()
    home = str(Path.home())
    assert words[words.index("--name") + 1] == "builder-cpu-cpu"
    assert words[words.index("--network") + 1] == "host"
    assert f"{home}:{home}" in words and f"HOME={home}" in words
    assert "dev.builder.toolbox=true" in words
    assert ("--userns" in words) == (os.geteuid() != 0)
    assert words[-4:] == ["sleep", "--", IMAGE, "infinity"] and words[-5] == "--entrypoint"
    assert start.split()[-2:] == ["start", "builder-cpu-cpu"]


def test_podman_create_carries_the_variant_contract() -> None:
    proc = run_cli_inproc("toolbox", "create", "-t", "intel-npu", "--image", IMAGE, "--tool", "podman", "--print")
    assert proc.returncode == 0, proc.stderr
    assert "--env GGML_OPENVINO_DEVICE=NPU" in proc.stdout.splitlines()[0]
    if not Path("/dev/accel").exists():
        assert "/dev/accel not on this host; see `builder doctor --target intel-npu`" in proc.stderr
    rocm = printed("create", "-t", "strix-halo", "--variant", "rocm", "--image", IMAGE, "--tool", "podman")[0]
    assert "--security-opt seccomp=unconfined" in rocm
    assert rocm.split()[rocm.split().index("--name") + 1] == "builder-strix-halo-rocm"


def test_podman_enter_starts_then_execs_a_command_or_a_login_shell() -> None:
    start, enter = printed("enter", "--target", "cpu", "--tool", "podman", "--", "llama-cli", "--version")
    assert start.split()[-2:] == ["start", "builder-cpu-cpu"]
    assert enter.split()[-3:] == ["builder-cpu-cpu", "llama-cli", "--version"]
    assert "exec" in enter.split() and "--interactive" in enter.split()
    shell = printed("enter", "--name", "mine", "--tool", "podman")[-1]
    assert shell.split()[-3:] == ["mine", "bash", "--login"]


def test_toolbx_gets_no_flags_and_the_environment_goes_on_the_command() -> None:
    # On a host with podman quirks (hybrid cgroups, low limits) each line starts with CONTAINERS_CONF=FILE.
    [create] = printed("create", "-t", "cpu", "--image", IMAGE, "--tool", "toolbox")
    assert create.endswith(f"toolbox create --image {IMAGE} builder-cpu-cpu")
    [enter] = printed("enter", "-t", "cpu", "--tool", "toolbox")
    assert enter.endswith("toolbox enter builder-cpu-cpu")
    [npu] = printed("enter", "-t", "intel-npu", "--tool", "toolbox", "--", "llama-cli", "--version")
    assert npu.endswith("toolbox run --container builder-intel-npu-openvino env GGML_OPENVINO_DEVICE=NPU "
                        "llama-cli --version")
    [rm] = printed("rm", "-t", "cpu", "--tool", "toolbox")
    assert rm.endswith("toolbox rm --force builder-cpu-cpu")


def test_toolbx_gets_the_login_shell_when_shell_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Toolbx refuses to create without $SHELL (as under cron or CI); builder passes the account's login shell."""
    login_shell = pwd.getpwuid(os.getuid()).pw_shell
    monkeypatch.delenv("SHELL", raising=False)
    [create] = printed("create", "-t", "cpu", "--image", IMAGE, "--tool", "toolbox")
    assert create.split()[:create.split().index("toolbox")].count(f"SHELL={login_shell}") == 1
    monkeypatch.setenv("SHELL", "/bin/zsh")
    [create] = printed("create", "-t", "cpu", "--image", IMAGE, "--tool", "toolbox")
    assert "SHELL=" not in create
    [podman_create, _] = printed("create", "-t", "cpu", "--image", IMAGE, "--tool", "podman")
    assert not podman_create.startswith(("SHELL=", "CONTAINERS_CONF="))


def test_distrobox_gets_the_contract_through_additional_flags() -> None:
    create = printed("create", "-t", "intel-npu", "--image", IMAGE, "--tool", "distrobox")[-1]
    assert create.endswith(f"distrobox create --yes --no-entry --image {IMAGE} --name builder-intel-npu-openvino "
                           "--additional-flags '--label com.github.containers.toolbox=false "
                           "--env GGML_OPENVINO_DEVICE=NPU'")
    assert printed("create", "-t", "cpu", "--image", IMAGE, "--tool", "distrobox")[-1].endswith(
        "--name builder-cpu-cpu --additional-flags '--label com.github.containers.toolbox=false'")
    [enter] = printed("enter", "-t", "cpu", "--tool", "distrobox", "--", "id")
    assert enter.endswith("distrobox enter --name builder-cpu-cpu -- id")


def test_auto_prefers_toolbx_then_distrobox_then_podman() -> None:
    expected = "toolbox" if shutil.which("toolbox") else "distrobox" if shutil.which("distrobox") else "podman"
    first = printed("rm", "--name", "x")[0]
    assert [word for word in first.split() if "=" not in word][0] == expected


@pytest.mark.parametrize("args, message", [
    (["create", "--print"], "error: no target chosen"),
    (["create", "-t", "cpu", "--image", IMAGE, "--tool", "lxc", "--print"], "error: --tool: unknown tool 'lxc'"),
    (["enter", "-t", "cpu", "--variant", "cuda", "--print"], "error: --variant: cpu has no variant 'cuda'"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = run_cli_inproc("toolbox", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == message


@pytest.mark.engine
def test_podman_toolbox_of_the_cpu_image_end_to_end(tmp_path: Path) -> None:
    """create, enter with commands (binaries on PATH in a login shell, home shared), refuse a second create, rm."""
    require_engine("podman")
    build = run_cli("build", "--target", "cpu", "--engine", "podman", timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    name = f"builder-test-toolbox-{os.getpid()}"
    common = ["--target", "cpu", "--name", name, "--tool", "podman"]
    podman = PodmanEngine().command()
    try:
        created = run_cli("toolbox", "create", *common, timeout=120)
        assert created.returncode == 0, created.stderr
        state = subprocess.run([*podman, "container", "inspect", "-f", "{{.State.Running}}", name],
                               capture_output=True, text=True)
        assert state.stdout.strip() == "true"

        # Not Toolbx's, though the image carries Toolbx's label: `toolbox list` must not show it.
        label = subprocess.run([*podman, "container", "inspect", "-f",
                                '{{index .Config.Labels "com.github.containers.toolbox"}}', name],
                               capture_output=True, text=True)
        assert label.stdout.strip() == "false"

        # --tool auto (the default) enters through the tool that made the container, whatever is installed.
        version = run_cli("toolbox", "enter", "--target", "cpu", "--name", name, "--", "llama-cli", "--version",
                          timeout=120)
        assert version.returncode == 0, version.stderr
        assert "version:" in version.stdout + version.stderr
        assert "832db0699007" in version.stdout + version.stderr

        # A login shell (what `enter` opens) resets PATH from /etc/profile; the image keeps its binaries on it.
        login = run_cli("toolbox", "enter", *common, "--", "bash", "--login", "-c", "command -v llama-server",
                        timeout=120)
        assert login.stdout.strip() == "/opt/llama/bin/llama-server", login.stderr

        # The home folder is the host's: a file written inside appears outside.
        marker = Path.home() / f".builder-toolbox-test-{os.getpid()}"
        wrote = run_cli("toolbox", "enter", *common, "--", "bash", "-c", f'echo inside > "$HOME/{marker.name}"',
                        timeout=120)
        assert wrote.returncode == 0, wrote.stderr
        assert marker.read_text() == "inside\n"
        marker.unlink()

        again = run_cli("toolbox", "create", *common, timeout=120)
        assert again.returncode == 2 and f"error: container {name} already exists" in again.stderr

        removed = run_cli("toolbox", "rm", *common, timeout=120)
        assert removed.returncode == 0, removed.stderr
        gone = subprocess.run([*podman, "container", "exists", name])
        assert gone.returncode == 1
        after = run_cli("toolbox", "enter", *common, "--", "true", timeout=60)
        assert after.returncode == 2 and f"error: no container {name}" in after.stderr
    finally:
        subprocess.run([*podman, "rm", "--force", "--time", "0", name], capture_output=True)


@pytest.mark.engine
def test_toolbx_runs_the_cpu_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real Toolbx: its init-container starts in our image (entrypoint passes it through, capsh is there) and
    `toolbox run` finds the binaries in its login shell. Toolbx needs the system D-Bus socket to create.
    $SHELL is unset, as under CI and cron, where Toolbx alone would refuse."""
    monkeypatch.delenv("SHELL", raising=False)
    require_tool("toolbox", "podman-toolbox")
    require(None if Path("/run/dbus/system_bus_socket").exists()
            else "Toolbx needs the system D-Bus socket (/run/dbus/system_bus_socket; .ci/run starts the bus)")
    require_engine("podman")
    build = run_cli("build", "--target", "cpu", "--engine", "podman", timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    name = f"builder-test-toolbx-{os.getpid()}"
    common = ["--target", "cpu", "--name", name, "--tool", "toolbox"]
    try:
        created = run_cli("toolbox", "create", *common, timeout=300)
        assert created.returncode == 0, created.stderr
        inside = run_cli("toolbox", "enter", *common, "--", "bash", "-c",
                         "cat /run/.toolboxenv && echo in-toolbx; command -v capsh llama-server; llama-cli --version",
                         timeout=300)
        assert inside.returncode == 0, inside.stderr
        out = inside.stdout + inside.stderr
        assert "in-toolbx" in out and "/opt/llama/bin/llama-server" in out and "832db0699007" in out
        removed = run_cli("toolbox", "rm", *common, timeout=120)
        assert removed.returncode == 0, removed.stderr
        assert subprocess.run([*PodmanEngine().command(), "container", "exists", name]).returncode == 1
    finally:
        subprocess.run([*PodmanEngine().command(), "rm", "--force", "--time", "0", name], capture_output=True)
