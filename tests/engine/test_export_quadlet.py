"""The units `builder cluster export --format quadlet` writes, read by podman's own Quadlet and run by a real
systemd: PID 1 of a privileged Debian trixie container (tests/support/systemd_box.py, with trixie's podman 5.x),
whose podman has its own storage.

1. Quadlet's generator (dry run) renders each unit's `podman run`: it carries every device, group, volume,
   security option and variable that `builder run --print` gives for the same `cluster commands` line, and the
   same image arguments. The device nodes are made in the box (mknod), with groups of their own. The same for
   docs/examples/rtx-3060-x4.yaml: each container gets the GPUs through CDI as `builder run --target nvidia` does.
2. The units run, placed by the playbook `builder cluster export --format ansible` writes: the cpu image loaded
   into the box's storage (`podman save | podman load` through a mounted tar), `ansible-playbook` provisions the
   box over ssh (a key the test makes; root through sudo) as each of the file's three nodes: podman from apt,
   each model fetched from the control node's `builder pxe serve` (in the box) by sha256, the node's firewall
   loaded, the units placed and started. Then: a server, a split's RPC worker and head, and a strix-halo server
   (the cpu image under that tag: its container gets the device nodes and their groups as systemd expands
   them): `systemctl is-active`, a completion from each llama-server; the control node's gateway started in front
   of them as an operator starts it (`builder cluster up FILE`, in the box), a completion through it with its key
   for each model equal to the server's own (greedy), and `builder cluster status` shows every server and worker
   UP; the playbook run again restarts no unit and fetches no model; a `kill -9` of a server and its restart by
   systemd, the gateway serving it again, and a model that differs from its sha256 stops its unit before the
   container starts.

The box has no network but its loopback (`--network none`): every server binds 127.0.0.x, and ssh reaches the
box's sshd on its own 127.0.0.1:22 through `podman exec … nc` (ssh's ProxyCommand), not through any network.
"""

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from systemd_box import SYSTEMD_BOX
from test_control_units import PROBE, SETTLE, Box

from builder.core.digests import sha256_file
from builder.engines.podman import PodmanEngine
from builder.fetch.bootstrap import ensure_base
from conftest import ROOT, require_engine, require_tool, run_cli_inproc

pytestmark = pytest.mark.engine

# Device nodes made in the box for the strix-halo node: (path, major, minor, gid), as a ROCm host has them
DEVICES = (("/dev/dri/card0", 226, 0, 44), ("/dev/dri/renderD128", 226, 128, 993), ("/dev/kfd", 235, 0, 993))
# The options whose values must reach the container (`-v` and `-e` are Quadlet's spellings)
COMPARED = {"--device": "--device", "--group-add": "--group-add", "--volume": "--volume", "-v": "--volume",
            "--security-opt": "--security-opt", "--env": "--env", "-e": "--env", "--shm-size": "--shm-size"}
COMPLETION = """
import json, sys, urllib.request
body = json.dumps({"prompt": "Once upon a time", "n_predict": 4, "temperature": 0}).encode()
request = urllib.request.Request(sys.argv[1], data=body, headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=30) as answer:
        sys.stdout.write(json.loads(answer.read())["content"])
except OSError as exc:
    sys.exit(f"no answer: {exc}")
"""
# A greedy completion from an OpenAI-style endpoint, a server's own or the gateway's (with the key in the file
# argv[3] names): URL MODEL [KEY_FILE]; its text
OPENAI = """
import json, sys, urllib.request
url, model = sys.argv[1], sys.argv[2]
body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                   "seed": 42}).encode()
headers = {"Content-Type": "application/json"}
if sys.argv[3:]:
    with open(sys.argv[3]) as key:
        headers["Authorization"] = "Bearer " + key.read().strip()
try:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as answer:
        sys.stdout.write(json.loads(answer.read())["choices"][0]["text"])
except OSError as exc:
    sys.exit(f"no answer: {exc}")
"""
GATEWAY = "http://127.0.0.1:8080/v1/completions"  # the cluster file's gateway: on the box's loopback


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    require_engine("podman")
    require_tool("mmdebstrap", "mmdebstrap")
    engine = PodmanEngine()
    image = ensure_base(engine, SYSTEMD_BOX)  # cached by its inputs, shared with test_control_units
    work = tmp_path_factory.mktemp("quadlet")
    work.chmod(0o755)
    (work / "probe.py").write_text(PROBE)
    (work / "complete.py").write_text(COMPLETION)
    (work / "openai.py").write_text(OPENAI)
    name = f"builder-quadlet-{uuid.uuid4().hex[:8]}"
    command = engine.command()
    # privileged: the box's podman runs containers, and the box makes device nodes; its storage is a volume
    # of its own (an anonymous one, removed with the box), not the layers of the box's own root
    subprocess.run([*command, "run", "--detach", "--name", name, *engine.container_flags(), "--network", "none",
                    "--privileged", "--systemd", "always", "--volume", "/var/lib/containers",
                    "--env", "PODMAN_IGNORE_CGROUPSV1_WARNING=1",
                    "--volume", f"{ROOT}:/src:ro", "--volume", f"{work}:/work", image, "/sbin/init"],
                   check=True, capture_output=True, timeout=120)
    try:
        found = Box(name, work, command)
        found.booted()
        script = "; ".join(f"mknod -m 660 {path} c {major} {minor} && chgrp {gid} {path}"
                           for path, major, minor, gid in DEVICES)
        found.run("sh", "-c", f"mkdir -p /dev/dri /srv/models /etc/containers/systemd; {script}")
        yield found
    finally:
        subprocess.run([*command, "rm", "--force", "--volumes", "--time", "5", name], capture_output=True,
                       timeout=120)


def cluster_file(folder: Path, model: Path, args: tuple[str, ...] = (), env: str = "2") -> Path:
    """Nodes a and b (cpu) and amd (strix-halo/rocm) on the box's loopback: a server on a (with `args`), a split
    with its head on a and its RPC worker on b, and a server on amd; node a's OMP_NUM_THREADS is `env`."""
    sha = sha256_file(model)
    node = {"memory": "2GiB"}  # no mac: boxes builder does not boot, which the playbook provisions
    data = {"control": {"address": "127.0.0.1", "http_port": 8000},
            "gateway": {"address": "127.0.0.1", "port": 8080},
            "nodes": [{"name": "a", "target": "cpu", "address": "127.0.0.11", "env": {"OMP_NUM_THREADS": env}, **node},
                      {"name": "b", "target": "cpu", "address": "127.0.0.12", **node},
                      {"name": "amd", "target": "strix-halo", "variant": "rocm", "address": "127.0.0.13", **node}],
            "services": [{"name": "chat", "model": model.name, "sha256": sha, "nodes": ["a"], "port": 8189,
                          "args": list(args)},
                         {"name": "big", "model": model.name, "sha256": sha, "topology": "split", "head": "a",
                          "workers": ["b"], "port": 8190},
                         {"name": "rocm", "model": model.name, "sha256": sha, "nodes": ["amd"], "port": 8191}]}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def export(path: Path, out: Path, form: str = "quadlet") -> dict[str, Any]:
    proc = run_cli_inproc("cluster", "export", str(path), "--format", form, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def provision(box: Box, work: Path) -> str:
    """`ansible-playbook` with the exported inventory and playbook, over ssh into the box as root (a key made
    here, sudo for become); ssh's ProxyCommand carries the connection into the box's loopback, where its sshd
    listens. The play's recap."""
    require_tool("ssh", "openssh-client")
    playbook = Path(sys.executable).parent / "ansible-playbook"
    assert playbook.is_file(), f"{playbook}: missing (pip install -e '.[test]' installs ansible-core)"
    key = work / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "builder-test", "-f", str(key)],
                       check=True, capture_output=True, timeout=60)
    box.run("sh", "-c", "install -d -m 700 /root/.ssh && install -m 600 /work/run/id_ed25519.pub "
                        "/root/.ssh/authorized_keys")
    box.wait("sshd", lambda: box.state("ssh.service") == "active")
    proxy = shlex.join([*box.command, "exec", "-i", box.name, "nc", "127.0.0.1", "22"])
    settings = {"ansible_user": "root", "ansible_ssh_private_key_file": str(key),
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_ssh_common_args": f"-o ProxyCommand={shlex.quote(proxy)} -o UserKnownHostsFile=/dev/null "
                                           "-o StrictHostKeyChecking=no"}
    (work / "ssh.json").write_text(json.dumps(settings))
    env = {**os.environ, "ANSIBLE_HOME": str(work / ".ansible"), "ANSIBLE_LOCAL_TEMP": str(work / ".ansible-tmp"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    proc = subprocess.run([str(playbook), "-i", "inventory.yml", "-e", f"@{work / 'ssh.json'}", "site.yml"],
                          cwd=work / "play", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout.split("PLAY RECAP", 1)[1]


def rendered(box: Box, units: str) -> dict[str, list[str]]:
    """Quadlet's dry run over a folder of units: each generated service's lines."""
    out = box.run("env", f"QUADLET_UNIT_DIRS={units}", "/usr/libexec/podman/quadlet", "-dryrun").stdout
    services: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("---") and line.endswith(".service---"):
            current = services.setdefault(line.strip("-").removesuffix(".service"), [])
        else:
            current.append(line)
    return services


def systemd_command(line: str) -> list[str]:
    """An Exec*= value as the words systemd runs: unquoted, $$ and %% undoubled."""
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(line)]


def options(words: list[str], image: str) -> set[tuple[str, str]]:
    """The compared options of a `podman run` command line, up to its image."""
    found = set()
    end = words.index(image)
    for i, word in enumerate(words[:end]):
        if word in COMPARED:
            found.add((COMPARED[word], words[i + 1]))
    return found


def render_and_compare(box: Box, path: Path, folder: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """`path` exported as Quadlet units into `folder`, rendered by Quadlet's dry run in the box, and each
    `cluster commands` line given to `builder run --print` in the box (its devices, their groups, the model
    file): every compared option it prints is in the rendered ExecStart, and the image's arguments are the same.
    Per container: (what builder run prints, the ExecStart's words, the image)."""
    answer = export(path, folder / "out")
    units = folder / "units"
    units.mkdir()
    for unit in (folder / "out").glob("*/*"):
        (units / unit.name).write_bytes(unit.read_bytes())
    services = rendered(box, f"/work/{units.relative_to(box.work)}")
    proc = run_cli_inproc("cluster", "commands", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [(entry["node"], argv) for entry in json.loads(proc.stdout) for argv in entry["argv"]]
    assert {argv[argv.index("--name") + 1] for _, argv in lines} <= set(services)
    found = {}
    for node, argv in lines:
        name = argv[argv.index("--name") + 1]
        image = next(image for key, image in answer["images"].items() if key.startswith(f"{node}/"))
        printed = json.loads(box.builder("run", "--print", "--json", "--image", image, *argv[2:]).stdout)
        service = services[name]
        start = next(line for line in service if line.startswith("ExecStart="))
        words = systemd_command(start.removeprefix("ExecStart="))
        if "$BUILDER_GROUPS" in words:  # the groups the unit's ExecStartPre finds when it starts, run here
            finder = next(line for line in service if line.startswith("ExecStartPre=") and "--group-add" in line)
            box.run(*systemd_command(finder.removeprefix("ExecStartPre=")))
            groups = box.run("cat", f"/run/builder/{name}.env").stdout.strip().split("=", 1)[1].split()
            at = words.index("$BUILDER_GROUPS")
            words[at:at + 1] = groups
        wanted = options(printed, image)
        assert wanted <= options(words, image), (name, wanted - options(words, image))
        assert printed[printed.index(image) + 1:] == words[words.index(image) + 1:], name
        found[name] = (printed, words, image)
    return found


def test_quadlet_renders_every_option_that_builder_run_gives(box: Box) -> None:
    work = box.work / "dry"
    work.mkdir()
    model = work / "tiny.gguf"
    model.write_bytes(b"GGUF" + bytes(2000))
    # words systemd and Quadlet would read otherwise: specifiers, variables, quotes, spaces, backslashes
    template = """{% for m in messages %}{{ m['content'] }} $HOME ${X} "q" \\n 100%{% endfor %}"""
    path = cluster_file(work, model, ("--chat-template", template), env="2 $X %n")
    box.run("cp", f"/work/dry/{model.name}", f"/srv/models/{sha256_file(model)}.gguf")
    found = render_and_compare(box, path, work)
    services = rendered(box, "/work/dry/units")
    assert sorted(found) == ["builder-big", "builder-big-rpc", "builder-chat", "builder-rocm"]
    assert "builder-big-rpc-cache-volume" in services
    # the comparison is not empty: the devices, both groups, seccomp, the model
    printed, _, image = found["builder-rocm"]
    model_volume = f"/srv/models/{sha256_file(model)}.gguf:/models/{sha256_file(model)}.gguf:ro"
    assert {("--device", "/dev/dri"), ("--device", "/dev/kfd"), ("--group-add", "44"), ("--group-add", "993"),
            ("--security-opt", "seccomp=unconfined"), ("--volume", model_volume)} <= options(printed, image)
    printed, _, image = found["builder-chat"]
    assert ("--env", "OMP_NUM_THREADS=2 $X %n") in options(printed, image) and template in printed
    # as systemd reads the line: $ and % doubled, so it expands neither
    start = next(line for line in services["builder-chat"] if line.startswith("ExecStart="))
    assert "$$HOME $${X}" in start and "100%%" in start and "$X %n" not in start
    _, worker, image = found["builder-big-rpc"]
    assert ("--volume", "systemd-builder-big-rpc-cache:/var/cache/llama.cpp/rpc") in options(worker, image)


def test_quadlet_renders_the_rtx_example_as_builder_run_gives(box: Box) -> None:
    """docs/examples/rtx-3060-x4.yaml (four NVIDIA boxes on an installed OS): every unit renders, and each
    container gets the GPUs through CDI as `builder run --target nvidia` gives them, with its model."""
    work = box.work / "rtx"
    work.mkdir()
    path = work / "rtx-3060-x4.yaml"
    path.write_bytes((ROOT / "docs" / "examples" / "rtx-3060-x4.yaml").read_bytes())
    zeros = "0" * 64  # the example's placeholder sha256: a file there, for builder run's model volume
    box.run("sh", "-c", f"printf GGUF > /srv/models/{zeros}.gguf")
    found = render_and_compare(box, path, work)
    assert sorted(found) == ["builder-codellama-34b", "builder-codellama-34b-rpc", "builder-llama-2-13b",
                             "builder-llama-3.1-8b", "builder-qwen2.5-7b"]
    for name, (printed, words, image) in found.items():
        assert ("--device", "nvidia.com/gpu=all") in options(printed, image), name
        if name != "builder-codellama-34b-rpc":
            assert ("--volume", f"/srv/models/{zeros}.gguf:/models/{zeros}.gguf:ro") in options(words, image), name
    _, worker, image = found["builder-codellama-34b-rpc"]
    assert ("--volume", "systemd-builder-codellama-34b-rpc-cache:/var/cache/llama.cpp/rpc") in options(worker, image)


def test_the_units_run_under_systemd_and_come_back(box: Box, llama_cpu_image: str, tiny_model: Path) -> None:
    work = box.work / "run"
    work.mkdir()
    model = work / "tiny.gguf"
    model.write_bytes(tiny_model.read_bytes())
    sha = sha256_file(model)
    started = time.monotonic()
    subprocess.run(["podman", "save", "-o", str(work / "cpu.tar"), llama_cpu_image],
                   check=True, capture_output=True, timeout=300)
    box.run("podman", "load", "--quiet", "--input", "/work/run/cpu.tar", timeout=300)
    for tag in ("localhost/builder/cpu:cpu", "localhost/builder/strix-halo:rocm"):
        box.run("podman", "tag", llama_cpu_image, tag)
    print(f"\nthe cpu image into the box's storage: {time.monotonic() - started:.0f} s")
    path = cluster_file(work, model)
    answer = export(path, work / "play", "ansible")
    assert set(answer["images"].values()) == {"localhost/builder/cpu:cpu", "localhost/builder/strix-halo:rocm"}
    # the control node's model server: `builder pxe serve`, its blobs by sha256 (as `pxe publish` leaves them)
    root = work / "pxe-root"
    (root / "generations" / "g1").mkdir(parents=True)
    (root / "generations" / "g1" / "cluster.yaml").write_bytes(path.read_bytes())
    (root / "current").symlink_to("generations/g1")
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "blobs" / "sha256" / sha).write_bytes(model.read_bytes())
    box.run("systemd-run", "--unit=model-server", "--property=WorkingDirectory=/src", "python3", "-m", "builder",
            "pxe", "serve", "--root", "/work/run/pxe-root")
    started = time.monotonic()
    recap = provision(box, work)
    print(f"\nansible-playbook over ssh: {time.monotonic() - started:.0f} s")
    for host in ("a", "b", "amd"):  # every node's play ran, each changed something, none failed
        line = next(line for line in recap.splitlines() if line.startswith(f"{host} "))
        assert " failed=0 " in line and " unreachable=0 " in line and " changed=0 " not in line, line
    units = ["builder-big-rpc.service", "builder-chat.service", "builder-big.service", "builder-rocm.service"]
    # what the play left: the model fetched by sha256, the firewall loaded (and enabled for the next boot)
    assert box.run("sha256sum", f"/srv/models/{sha}.gguf").stdout.split()[0] == sha
    assert "table inet builder_cluster" in box.run("nft", "list", "tables").stdout
    assert box.state("builder-firewall.service") == "active"

    def complete(port: int) -> bool:
        answer = box.run("python3", "/work/complete.py", f"http://127.0.0.{11 if port < 8191 else 13}:{port}"
                         "/completion", check=False, timeout=60)
        return answer.returncode == 0 and bool(answer.stdout)

    # the split's head may start before its worker listens: it exits, and systemd starts it again
    for unit in units:
        box.wait(f"{unit} active", lambda unit=unit: box.state(unit) == "active")
    for port in (8189, 8190, 8191):
        box.wait(f"a completion on port {port}", lambda port=port: complete(port))
    assert box.run("systemctl", "is-enabled", "builder-chat.service", check=False).stdout.strip() == "generated"

    # the control node's gateway in front of the units' servers, as an operator starts it there (the nodes are
    # not netbooted: it only checks their servers' health)
    started = time.monotonic()
    up = box.builder("cluster", "up", "/work/run/cluster.yaml", "--timeout", "120")
    key_file = next(line.split()[1] for line in up.stdout.splitlines() if line.startswith("key "))
    assert "endpoint  http://127.0.0.1:8080/v1" in up.stdout and "DOWN" not in up.stderr, up.stderr

    def openai(url: str, model: str, *key: str) -> subprocess.CompletedProcess[str]:
        return box.run("python3", "/work/openai.py", url, model, *key, check=False, timeout=90)

    for service, server in (("chat", "127.0.0.11:8189"), ("big", "127.0.0.11:8190"), ("rocm", "127.0.0.13:8191")):
        direct = openai(f"http://{server}/v1/completions", service)
        through = openai(GATEWAY, service, key_file)
        assert direct.returncode == 0 and direct.stdout, (service, direct.stderr)
        assert through.returncode == 0 and through.stdout == direct.stdout, (service, through.stderr, direct.stdout)
    assert "401" in openai(GATEWAY, "chat").stderr  # without the key: refused
    status = json.loads(box.builder("cluster", "status", "/work/run/cluster.yaml", "--json").stdout)
    health = {(s["name"], p["node"], p["role"]): p["health"] for s in status["services"] for p in s["processes"]}
    assert status["ok"] and status["gateway"]["running"] and health == {
        ("chat", "a", "server"): "UP", ("big", "a", "server"): "UP", ("big", "b", "rpc-worker"): "UP",
        ("rocm", "amd", "server"): "UP"}, health
    print(f"\nthe gateway in front of the units: {time.monotonic() - started:.0f} s")

    # the playbook again: nothing restarted, no model fetched again (get_url keeps a file whose sha256 matches)
    def fetches() -> int:
        journal = box.run("journalctl", "--no-pager", "-o", "cat", "-u", "model-server.service").stdout
        return journal.count(f"GET /blobs/sha256/{sha}")

    before = ({unit: box.main_pid(unit) for unit in units}, fetches())
    assert before[1] >= 1
    provision(box, work)
    assert ({unit: box.main_pid(unit) for unit in units}, fetches()) == before

    # the strix-halo container got the device nodes and their groups, as systemd expanded $BUILDER_GROUPS
    inspected = json.loads(box.run("podman", "inspect", "builder-rocm").stdout)[0]["HostConfig"]
    assert sorted(inspected["GroupAdd"]) == ["44", "993"]
    assert sorted(d["PathOnHost"] for d in inspected["Devices"]) == sorted(p for p, *_ in DEVICES)
    assert "seccomp=unconfined" in inspected["SecurityOpt"]

    # a crash of the server: systemd starts the unit again, and it answers
    def server_pid() -> int:
        return int(box.run("podman", "inspect", "--format", "{{.State.Pid}}", "builder-chat", check=False).stdout
                   .strip() or 0)

    killed = server_pid()
    assert box.run("ps", "-o", "comm=", "-p", str(killed)).stdout.strip() == "llama-server"
    box.run("kill", "-9", str(killed))
    box.wait("the server after kill -9", lambda: box.state("builder-chat.service") == "active"
             and server_pid() not in (0, killed) and complete(8189))
    box.wait("the restarted server through the gateway", lambda: openai(GATEWAY, "chat", key_file).stdout != "")
    restarts = box.run("systemctl", "show", "--property=NRestarts", "--value", "builder-chat.service").stdout
    assert int(restarts) >= 1

    # a model that is not the one the cluster file names: the unit stops before its container starts
    box.run("sh", "-c", f"printf 'GGUF other' > /srv/models/{sha}.gguf")
    assert box.run("systemctl", "restart", "builder-chat.service", check=False).returncode != 0
    journal = box.run("journalctl", "--no-pager", "-u", "builder-chat.service", "-n", "20").stdout
    assert f"the cluster file says {sha}" in journal
    assert box.run("podman", "container", "exists", "builder-chat", check=False).returncode != 0
    deadline = time.monotonic() + SETTLE
    while box.state("builder-chat.service") == "active" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert box.state("builder-chat.service") != "active"
