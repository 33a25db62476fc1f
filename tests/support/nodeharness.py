"""A netbooted node's units, run in an image's container without systemd (tests/engine: test_node_ready.py,
test_engines_vllm_serve.py): the node's own scripts (images/netboot/node.sh and plan.sh) as the node runs them,
with stand-ins for what only a booted node has. The initramfs's files (the leased address 127.0.0.1 on lo, RAM
mode) and the kernel command line (builder.plan=URL builder.plan_sha256=HEX) are written first; `node plan` then
fetches and checks the plan and starts its units through `systemctl`, here a stand-in that runs each unit's
commands as systemd would: the agent, the qualification before the first server that wants it, and per process
`node process SERVICE-ROLE` with `node ready SERVICE-ROLE` beside it (MAINPID: the process). Nothing is
restarted: a test that needs restarts boots QEMU (tests/qemu/test_netboot_shared_qemu.py).
"""

from pathlib import Path

from conftest import ROOT

SYSTEMCTL = r"""#!/bin/bash
# systemctl for a node's units in a container without systemd (tests/support/nodeharness.py)
[ "$1" = start ] || exit 0
qualified=""
for unit in "${@:2}"; do
    case "$unit" in
        builder-agent.service) /usr/lib/builder/node agent & ;;
        builder-process@*.service)
            instance=${unit#builder-process@} instance=${instance%.service}
            if [ -z "$qualified" ] && grep -qs builder-qualify "/run/systemd/system/$unit.d/builder.conf"; then
                /usr/lib/builder/node qualify
                qualified=1
            fi
            (
                /usr/lib/builder/node process "$instance" &
                MAINPID=$! /usr/lib/builder/node ready "$instance"
                wait
            ) &
            ;;
    esac
done
"""
NODE = ("set -u; mkdir -p /run/builder /run/systemd/system; "
        "printf 'NODE_IFACE=lo\\nNODE_IP=127.0.0.1\\nNODE_PREFIX=8\\n' >/run/builder/net.env; "
        "echo ROOT_MODE=ram >/run/builder/root.env; "
        "echo 'builder.name=ci builder.plan={plan} builder.plan_sha256={sha}' >/run/builder/cmdline; "
        "export NODE_CMDLINE=/run/builder/cmdline PATH=/usr/lib/builder/stand-in:$PATH; "
        "/usr/lib/builder/node plan; wait; sleep infinity")


def node_volumes(work: Path, busybox: str) -> list[str]:
    """The engine's --volume arguments: the node's scripts, `busybox` (a stand-in for the applets the scripts call,
    for an image without busybox) and the systemctl stand-in."""
    (work / "stand-in").mkdir(exist_ok=True)
    for path, text in ((work / "busybox", busybox), (work / "stand-in" / "systemctl", SYSTEMCTL)):
        path.write_text(text)
        path.chmod(0o755)
    scripts = ROOT / "images" / "netboot"
    return ["--volume", f"{scripts / 'node.sh'}:/usr/lib/builder/node:ro",
            "--volume", f"{scripts / 'plan.sh'}:/usr/lib/builder/plan.sh:ro",
            "--volume", f"{work / 'busybox'}:/usr/lib/builder/busybox:ro",
            "--volume", f"{work / 'stand-in'}:/usr/lib/builder/stand-in:ro"]


def node_command(plan_url: str, plan_sha256: str) -> str:
    """The container's shell command: the node's files written, then `node plan`, then waiting."""
    return NODE.format(plan=plan_url, sha=plan_sha256)
