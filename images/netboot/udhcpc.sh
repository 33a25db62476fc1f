#!/bin/busybox sh
# shellcheck shell=sh
# shellcheck disable=SC2154  # udhcpc sets interface, ip, mask, router, dns and serverid
# udhcpc's event script in the netboot initramfs: configure the leased address and remember it for node-init.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound | renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for gateway in $router; do
            ip route add default via "$gateway" dev "$interface" && break
        done
        : >/run/builder/resolv.conf
        for server in $dns; do echo "nameserver $server" >>/run/builder/resolv.conf; done
        cat >/run/builder/net.env <<ENV
NODE_IFACE=$interface
NODE_IP=$ip
NODE_PREFIX=${mask:-24}
NODE_ROUTER=${router%% *}
NODE_SERVER=$serverid
ENV
        ;;
esac
exit 0
