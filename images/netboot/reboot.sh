#!/bin/bash
# `builder cluster reboot` runs this on the node over ssh: the node reboots a second later (so the ssh session
# ends cleanly first) and netboots its current generation. The node's PID 1 is node-init (bash), which has no
# reboot of its own: busybox's forced reboot, after a sync.
(
    sleep 1
    sync
    exec /usr/lib/builder/busybox reboot -f
) </dev/null >/dev/null 2>&1 &
echo "builder-node: $(hostname) rebooting"
