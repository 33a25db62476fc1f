#!/bin/bash
# Install apt packages on top of a registry base image (Ubuntu/Debian), with what builder placed in
# /usr/local/lib/builder/apt: vendor repositories (sources.list.d/*.list, keyrings/*.asc) and pinned
# .deb files (debs/*.deb, installed with their dependencies).
# Usage: apt-install.sh [PACKAGE[=VERSION]...]
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -o Acquire::Retries=3 -o APT::Install-Recommends=false)
staged=/usr/local/lib/builder/apt
packages=("$@")

"${apt[@]}" update
if [ -d "$staged/sources.list.d" ]; then
    # Vendor repositories are https: certificates first, from the distribution's own archive.
    "${apt[@]}" install -y ca-certificates
    install -d -m 0755 /etc/apt/keyrings
    install -m 0644 "$staged"/keyrings/*.asc /etc/apt/keyrings/
    install -m 0644 "$staged"/sources.list.d/*.list /etc/apt/sources.list.d/
    "${apt[@]}" update
fi
if [ -d "$staged/debs" ]; then
    packages+=("$staged"/debs/*.deb)
fi
"${apt[@]}" install -y "${packages[@]}"
"${apt[@]}" clean
rm -rf /var/lib/apt/lists/* "$staged"
