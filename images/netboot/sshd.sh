#!/bin/bash
# The ssh server of a netbooted node (its plan's ssh line): `sshd.sh ADDRESS PORT STATE`. One process, run in
# the foreground by its unit (builder-sshd.service). ADDRESS and PORT: where it
# listens (the node's own address, never a wildcard one); STATE: the folder of its host key, made here on first
# start (on the node's cache disk when it has one, so the key survives reboots; else in /run, made per boot).
# The authorized keys are root's, /run/builder/ssh/authorized_keys (from the plan's admin-key lines); the
# config is /usr/lib/builder/sshd_config (key-only login). It prints the host key's fingerprint, publishes the
# public key at /run/builder/ssh/host_key.pub (the gateway agent answers it), says when it accepts connections.
set -eu
address=$1 port=$2 state=$3
say() { echo "builder-node: $*"; }
mkdir -p /run/sshd /run/builder/ssh
chmod 0755 /run/sshd
(umask 077 && mkdir -p "$state")
key=$state/ssh_host_ed25519_key
if [ ! -s "$key" ] || [ ! -s "$key.pub" ]; then
    rm -f "$key" "$key.pub"
    (umask 077 && ssh-keygen -q -t ed25519 -N '' -C "$(hostname)" -f "$key")
    sync
    say "ssh host key made"
fi
cp "$key.pub" /run/builder/ssh/host_key.pub.part
chmod 0644 /run/builder/ssh/host_key.pub.part
mv /run/builder/ssh/host_key.pub.part /run/builder/ssh/host_key.pub
fingerprint=$(ssh-keygen -l -E sha256 -f "$key.pub")
read -r _ sha256 _ <<<"$fingerprint"  # BITS SHA256:… COMMENT (TYPE)
say "ssh host key $sha256 ${fingerprint##* }"
/usr/sbin/sshd -D -e -f /usr/lib/builder/sshd_config -h "$key" -o "ListenAddress=$address" -o "Port=$port" &
child=$!
trap 'kill "$child" 2>/dev/null' TERM INT
for _ in $(seq 1 120); do
    if (exec 3<>"/dev/tcp/$address/$port") 2>/dev/null; then
        say "ssh server ready on $address:$port (key-only login)"
        break
    fi
    kill -0 "$child" 2>/dev/null || break
    sleep 0.5
done
wait "$child"
