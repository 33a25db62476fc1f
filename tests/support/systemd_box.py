"""A small Debian root that boots systemd in a container, for the control node's units
(tests/engine/test_control_units.py).

It also carries podman (trixie's 5.x, with Quadlet: tests/engine/test_export_quadlet.py renders and runs the
units `builder cluster export --format quadlet` writes, with the cpu image loaded into the box's own storage).

And an ssh server (openssh-server, started by systemd like on any Debian box): tests/engine/test_export_quadlet.py
runs the playbook `builder cluster export --format ansible` writes against it over ssh, with ansible-core's apt
module (python3-apt), become through sudo, and the nodes' firewall loaded with nft. The box has no network: ssh
reaches its port 22 on the box's own loopback through `podman exec … nc` (ssh's ProxyCommand).

It is bootstrapped by builder itself from Debian's archive (mmdebstrap, imported into podman, cached by its
inputs like every bootstrapped base: the second run finds the tag and bootstraps nothing). It has what the
control node runs and what `python3 -m builder` needs from Debian's packages.
"""

from builder.engines.podman import PodmanEngine
from builder.fetch.bootstrap import ensure_base
from builder.recipe.models import BootstrapBase

SYSTEMD_BOX = BootstrapBase(
    kind="bootstrap",
    suite="trixie",
    packages=[
        "systemd", "systemd-sysv", "iproute2", "procps", "haproxy", "dnsmasq-base",
        # podman 5.x with Quadlet (its systemd generator) and crun, which runs the units' containers in the box;
        # runc for `builder run --print` in the box, which refuses crun alone on a host with hybrid cgroups
        "podman", "crun", "runc",
        # what an Ansible-managed Debian box has: sshd, sudo, python3-apt for ansible.builtin.apt; nftables for the
        # nodes' firewall; nc carries ssh into the box's loopback
        "openssh-server", "sudo", "python3-apt", "nftables", "netcat-openbsd",
        # builder's own dependencies (pyproject.toml) that `python3 -m builder` imports when it starts, from Debian
        # (a new one shows as ModuleNotFoundError in tests/engine/test_control_units.py: add its package here)
        "python3", "python3-typer", "python3-pydantic", "python3-jinja2", "python3-requests", "python3-yaml",
        "python3-rich", "python3-docker", "python3-packaging",
    ],
)


if __name__ == "__main__":  # .ci/run makes it in the background while the first tests run
    print(ensure_base(PodmanEngine(), SYSTEMD_BOX))
