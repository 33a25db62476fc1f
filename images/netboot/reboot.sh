#!/bin/bash
# `builder cluster reboot` runs this on the node over ssh: the node reboots a second later (so the ssh session
# ends cleanly first) and netboots its current generation: busybox's forced reboot, after a sync (the root is a
# tmpfs overlay and the cache disk is synced on every write: nothing needs systemd's slower clean shutdown).
(
    sleep 1
    sync
    exec /usr/lib/builder/busybox reboot -f
) </dev/null >/dev/null 2>&1 &
echo "builder-node: $(hostname) rebooting"
