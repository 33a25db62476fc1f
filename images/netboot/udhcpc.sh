#!/bin/busybox sh
# shellcheck shell=sh
# shellcheck disable=SC2154  # udhcpc sets interface, ip, mask, router, dns and serverid
# udhcpc's event script on a netbooted node: configure the leased address and remember it for the node's units.
# The initramfs runs udhcpc once for the first lease; builder-dhcp.service then keeps one running while the node runs,
# which renews the lease (a copy of this script in the root, its first line naming the root's busybox). Once the
# node holds a lease its address stays: the processes are bound to it, so a restart of udhcpc (deconfig), a lost
# server (leasefail, nak) or a renewal of the same address changes nothing; a server that hands out another
# address is said on the console and applied (reserve each node's address in the DHCP server).
bb=/bin/busybox
[ -x "$bb" ] || bb=/usr/lib/builder/busybox
state=/run/builder/net.env
held=""
[ -f "$state" ] && held=$("$bb" sed -n 's/^NODE_IP=//p' "$state")
case "$1" in
    deconfig)
        [ -n "$held" ] && exit 0
        "$bb" ip addr flush dev "$interface"
        "$bb" ip link set "$interface" up
        ;;
    bound | renew)
        [ "$ip" = "$held" ] && exit 0
        [ -n "$held" ] && echo "builder-node: DHCP: $interface's lease changed from $held to $ip" >/dev/console
        "$bb" ip addr flush dev "$interface"
        "$bb" ip addr add "$ip/${mask:-24}" dev "$interface"
        for gateway in $router; do
            "$bb" ip route add default via "$gateway" dev "$interface" && break
        done
        : >/run/builder/resolv.conf
        for server in $dns; do echo "nameserver $server" >>/run/builder/resolv.conf; done
        cat >"$state" <<ENV
NODE_IFACE=$interface
NODE_IP=$ip
NODE_PREFIX=${mask:-24}
NODE_ROUTER=${router%% *}
NODE_SERVER=$serverid
ENV
        ;;
esac
exit 0
