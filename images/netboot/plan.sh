# shellcheck shell=bash
# What a netbooted node's units have in common, sourced by images/netboot/node.sh (each unit runs one of its
# commands): fetching and checking the plan and the models, the device check, readiness, the gateway's agent.
# builder/netboot/plan.py writes the plan and documents its lines. What it needs from the one that sources it:
# `say`; `name` (the node's), `plan` and `plan_sha256`; `bb` (a busybox with wget, mount, dmesg, grep and
# reboot); NODE_IP and NODE_IFACE (the leased address and its interface); RPC_IP (where RPC workers listen: the
# data network's address, else NODE_IP) and DATA_IFACE (the data network's interface, or empty); ROOT_MODE,
# ROOT_BLOB, MODEL_CACHED, VERITY_ERRORS and CACHE_DIR (from the initramfs).
# shellcheck disable=SC2154  # the variables above are set by node.sh

# The model at URL $1 goes to the overlay's tmpfs; one published on the control node comes with its sha256 ($2)
# and, on a node with a cache disk that has room for it (the initramfs made the room), is kept there by it.
# Several units may ask for one model at once: the first fetches it, the others wait on its lock and take it.
# A subshell: the lock goes with it.
fetch_model() (
    local model=$1 model_sha256=$2 dest
    mkdir -p /run/builder/models
    exec 8>"/run/builder/models/${model_sha256:-${model##*/}}.lock"
    flock 8
    if [ -n "$model_sha256" ] && [ -s "/run/builder/models/$model_sha256" ]; then
        cat "/run/builder/models/$model_sha256"  # fetched and checked by another unit in this boot
        return 0
    fi
    dest=$(fetch_model_once "$model" "$model_sha256") || return 1
    [ -n "$model_sha256" ] && echo "$dest" >"/run/builder/models/$model_sha256"
    echo "$dest"
)

fetch_model_once() {
    local model=$1 model_sha256=$2
    local dest=/var/cache/llama.cpp/models/${model##*/} attempt got
    if [ -n "$model_sha256" ] && [[ " $MODEL_CACHED " == *" $model_sha256 "* ]]; then
        dest=$CACHE_DIR/blobs/sha256/$model_sha256
        if [ -f "$dest" ]; then
            # No dm-verity for a model: hash it (a local read) before serving from it
            got=$(sha256sum "$dest") && got=${got%% *}
            if [ "$got" = "$model_sha256" ]; then
                touch "$dest"
                say "model from the cache: sha256 $got (no download)" >&2
                echo "$dest"
                return 0
            fi
            say_error "cached model sha256 mismatch (got $got): dropping it and fetching it again" >&2
            rm -f "$dest"
        fi
    fi
    mkdir -p "${dest%/*}"
    for attempt in 1 2 3 4 5; do
        if "$bb" wget -q -O "$dest.part" "$model"; then
            got=$(sha256sum "$dest.part") && got=${got%% *}
            if [ -z "$model_sha256" ] || [ "$got" = "$model_sha256" ]; then
                mv "$dest.part" "$dest"
                sync  # on the cache disk, the model survives a power cut from here on
                [ -n "$model_sha256" ] && say "model verified: sha256 $got" >&2
                echo "$dest"
                return 0
            fi
            say_error "model sha256 mismatch: got $got, expected $model_sha256 (attempt $attempt of 5)" >&2
            rm -f "$dest.part"
        else
            say_error "download of $model failed (attempt $attempt of 5)" >&2
        fi
        sleep $((attempt * 2))
    done
    return 1
}

# What the node has left for models once it is up (the benchmark reads this line).
say_memory() {
    local key value available="" total=""
    while read -r key value _; do
        case "$key" in
            MemTotal:) total=$value ;;
            MemAvailable:) available=$value ;;
        esac
    done </proc/meminfo
    say "memory: MemAvailable $available kB of MemTotal $total kB"
}

# dm-verity fails the read of a corrupted block of the root (the kernel logs it); a cached root with one is
# dropped from the cache disk and the node reboots to fetch it again.
check_root() {
    [ "$("$bb" dmesg | "$bb" grep -c 'verity.*corrupted')" -gt "$VERITY_ERRORS" ] || return 0
    if [ "$ROOT_MODE" = cache ]; then
        say_error "the cached root image failed dm-verity while running: dropping ${ROOT_BLOB##*/} and rebooting to fetch it"
        rm -f "$ROOT_BLOB"
        sync
        "$bb" reboot -f
    fi
    say_error "the root image failed dm-verity while running: rebooting to fetch it again"
    "$bb" reboot -f
}

# ggml-rpc-server's tensor cache (-c) survives reboots on the cache disk.
rpc_cache() {
    [ "$ROOT_MODE" = cache ] || return 0
    grep -q " /var/cache/llama.cpp/rpc " /proc/mounts && return 0  # a restart of the worker: bound already
    mkdir -p "$CACHE_DIR/rpc" /var/cache/llama.cpp/rpc
    mount --bind "$CACHE_DIR/rpc" /var/cache/llama.cpp/rpc &&
        say "RPC tensor cache on the cache disk ($(find "$CACHE_DIR/rpc" -type f | wc -l) files kept)"
}

# Ready means the process ($1: its role) on port $2 answers: a TCP connection for a worker (on RPC_IP), /health
# saying ok for a server.
is_ready() {
    if [ "$1" != rpc-worker ]; then
        exec 3<>"/dev/tcp/$NODE_IP/$2" || return 1
        printf 'GET /health HTTP/1.0\r\nHost: %s\r\n\r\n' "$NODE_IP" >&3
        local status
        read -r -t 10 _ status _ <&3  # bounded: a process that accepts and never answers is not ready
        exec 3<&-
        [ "$status" = 200 ]
    else
        (exec 3<>"/dev/tcp/$RPC_IP/$2") 2>/dev/null
    fi
}

# Poll every half second, at most TRIES times, until ROLE on PORT answers (then print "LABEL ready on ADDRESS:PORT"
# and NOTE, "answers on" instead of "ready on" with VERB, and the node's memory) or the process $child has exited
# (its unit's main process).
await_ready() {
    local tries=$1 label=$2 role=$3 port=$4 note=${5:-} verb=${6:-ready on} address=$NODE_IP
    [ "$role" = rpc-worker ] && address=$RPC_IP
    for _ in $(seq 1 "$tries"); do
        if is_ready "$role" "$port" 2>/dev/null; then
            say "$label $verb $address:$port${note:+ $note}"
            say_memory
            return 0
        fi
        kill -0 "$child" 2>/dev/null || return 1
        sleep 0.5
    done
    return 1
}

# The node's plan, downloaded from the control node and checked against its sha256 (retried until it comes).
fetch_plan() {
    local attempt=1 got
    while :; do
        if "$bb" wget -q -O /run/builder/plan.part "$plan"; then
            got=$(sha256sum /run/builder/plan.part) && got=${got%% *}
            if [ "$got" = "$plan_sha256" ]; then
                mv /run/builder/plan.part /run/builder/plan
                say "node plan verified: sha256 $got"
                return 0
            fi
            say_error "node plan sha256 mismatch: got $got, expected $plan_sha256 (attempt $attempt)"
        else
            say_error "download of the node plan failed (attempt $attempt)"
        fi
        rm -f /run/builder/plan.part
        sleep $((attempt < 5 ? attempt * 2 : 10))
        attempt=$((attempt + 1))
    done
}

# --- ready means right: the device, the gateway's agent, the qualification ---

# The string field NAME of the one JSON line $2 (llama-entrypoint's check-device and qualify), unescaped, on
# one line; the list field with `list`.
json_field() {
    local value
    if [ "${3:-}" = list ]; then
        [[ $2 =~ \"$1\":\ \[([^]]*)\] ]] && echo "${BASH_REMATCH[1]}"
        return 0
    fi
    [[ $2 =~ \"$1\":\ \"(([^\"\\]|\\.)*)\" ]] || return 0
    value=${BASH_REMATCH[1]}
    value=${value//\\n/ } value=${value//\\t/ } value=${value//\\r/}
    value=${value//\\\"/\"}
    echo "${value//\\\\/\\}"
}

# Does the image list the device it is built for? Sets device (ready, degraded or fallback: degraded, and the
# node's env allows serving on what llama.cpp lists) and device_why (check-device's why, one line).
check_device() {
    local report
    report=$(/usr/local/bin/llama-entrypoint check-device 2>/dev/null)
    device_why=$(json_field why "$report")
    if [ "$(json_field state "$report")" = ready ]; then
        device=ready
    elif [ "${LLAMA_ALLOW_FALLBACK:-0}" = 1 ]; then
        device=fallback
    else
        device=degraded
        [ -n "$device_why" ] || device_why="check-device gave no answer: ${report:-nothing}"
    fi
    # what the agent's `state` answer reports: the latest check's result, the devices it saw, its why
    local listed
    listed=$(json_field devices "$report" list)
    listed=${listed//\"/} listed=${listed// /}
    node_state device "$device"
    node_state devices "$listed"
    node_state device_why "$device_why"
}

# The node's state for the agent's `state` answer (builder cluster status): one value per file under
# NODE_STATE_DIR, its first line only, written whole (the agent bounds and encodes it).
node_state() {
    local folder=${NODE_STATE_DIR:-/run/builder/state}
    mkdir -p "$folder"
    printf '%s\n' "${2:0:400}" | tr -d '\000-\011\013-\037\177' >"$folder/$1.part"
    mv "$folder/$1.part" "$folder/$1"
}

# The last error the node printed (a process exited, a device degraded, a checksum mismatch, a failed
# qualification): said on the console and kept for `builder cluster status`.
say_error() {
    say "$*"
    node_state error "$*"
}

# What the gateway's agent-check reads for the server on port $1: up, or down with a reason ($2...).
agent_state() {
    local port=$1
    shift
    [ -n "$AGENT_PORT" ] || return 0
    printf '%s\n' "$*" | tr -d '\000-\011\013-\037' >"/run/builder/agent/$port.part"
    mv "/run/builder/agent/$port.part" "/run/builder/agent/$port"
}

# HAProxy's agent-check protocol: the gateway connects to the node's agent port, sends the port of the server
# it checks and a newline (its agent-send), and reads one line: `up`, or `down #reason` (the server leaves the
# rotation while its /health check may still pass). Perl's core sockets (perl-base, in every Debian and Ubuntu
# root) listen on the node's own address only; busybox's nc would listen on every address.
# shellcheck disable=SC2016,SC2034  # perl's own variables; run by node.sh
AGENT_SCRIPT='
use strict; use warnings; use IO::Socket::IP; use IO::Select;
my ($addr, $port, $dir, $statedir, $cmdline, $imagefile) = @ARGV;
$statedir //= "/run/builder/state";
$cmdline //= "/proc/cmdline";
$imagefile //= "/usr/lib/builder/image.digest";
# The first line of a small file (at most $max characters, 400 by default), or undef.
sub first_line {
    my ($path, $max) = @_;
    open(my $in, "<", $path) or return undef;
    my $line = <$in>;
    close $in;
    return undef unless defined $line;
    $line =~ s/[\r\n]+\z//;
    return substr($line, 0, $max // 400);
}
# KEY=VALUE, the value percent-encoded: the answer stays one line of plain ASCII whatever a file holds.
sub token {
    my ($key, $value) = @_;
    $value =~ s/([^A-Za-z0-9._~:\/\@+,-])/sprintf("%%%02X", ord($1))/ge;
    return "$key=$value";
}
$SIG{PIPE} = "IGNORE";
my $listen = IO::Socket::IP->new(LocalHost => $addr, LocalPort => $port, Listen => 16, ReuseAddr => 1)
    or die "cannot listen on $addr:$port: $@\n";
while (1) {
    my $client = $listen->accept or next;
    my ($asked, $buffer) = ("", "");
    my $ready = IO::Select->new($client);
    while ($asked !~ /\n/ && length($asked) < 16 && $ready->can_read(2)) {
        sysread($client, $buffer, 16) or last;
        $asked .= $buffer;
    }
    my $answer = "down #the agent takes a port number and a newline\n";
    if ($asked =~ /\Assh\r?\n/) {
        # the node ssh host key (public): builder cluster status shows it, cluster reboot checks it
        $answer = "none #no ssh server\n";
        if (open(my $key, "<", "/run/builder/ssh/host_key.pub")) {
            my $line = <$key>;
            close $key;
            $answer = "$1 $2\n" if defined $line && $line =~ /\A([a-z0-9@.-]{1,64}) ([A-Za-z0-9+\/]+={0,2})[ \n]/;
        }
    } elsif ($asked =~ /\Aunits\r?\n/) {
        # builder cluster status: the state of each unit the plan started (their names in units.list), as
        # NAME=ACTIVE/SUB on one line
        $answer = "none\n";
        my @names;
        if (open(my $list, "<", "/run/builder/units.list")) {
            @names = grep { /\A[A-Za-z0-9@._-]{1,120}\z/ } map { s/\s+\z//r } <$list>;
            close $list;
        }
        splice(@names, 64) if @names > 64;
        if (@names && open(my $show, "-|", "systemctl", "show", "--property=Id,ActiveState,SubState", "--", @names)) {
            my (@units, %unit);
            while (my $line = <$show>) {
                if ($line =~ /\A(Id|ActiveState|SubState)=([A-Za-z0-9@._-]{1,120})\n?\z/) {
                    $unit{$1} = $2;
                } elsif ($line =~ /\A\s*\z/) {
                    push @units, "$unit{Id}=$unit{ActiveState}/$unit{SubState}" if keys %unit == 3;
                    %unit = ();
                }
            }
            push @units, "$unit{Id}=$unit{ActiveState}/$unit{SubState}" if keys %unit == 3;
            close $show;
            $answer = join(" ", @units) . "\n" if @units;
        }
    } elsif ($asked =~ /\Astate\r?\n/) {
        # builder cluster status: the root, plan and firewall the node booted (its kernel command line), the
        # image its root was made from, the latest device check, the qualification and the last error; what
        # the node does not know is left out
        my (@tokens, %seen);
        my %named = (sha256 => "root", plan_sha256 => "plan", firewall_sha256 => "firewall");
        for my $word (split / /, first_line($cmdline, 8192) // "") {
            next unless $word =~ /\Abuilder\.(sha256|plan_sha256|firewall_sha256)=([0-9a-f]{64})\z/;
            push @tokens, token($named{$1}, $2) unless $seen{$1}++;
        }
        my $image = first_line($imagefile);
        push @tokens, token("image", $image) if defined $image && $image =~ /\Asha256:[0-9a-f]{64}\z/;
        for my $key (qw(device devices device_why qualify qualify_device qualify_why error)) {
            my $value = first_line("$statedir/$key");
            push @tokens, token($key, $value) if defined $value && length $value;
        }
        $answer = (@tokens ? join(" ", @tokens) : "none") . "\n";
    } elsif ($asked =~ /\A([0-9]{1,5})\r?\n/) {
        $answer = "down #no server on port $1\n";
        if (open(my $state, "<", "$dir/$1")) {
            my $line = <$state>;
            close $state;
            $answer = $line if defined $line && $line =~ /\n\z/;
        }
    }
    syswrite($client, $answer);
    close $client;
}'
AGENT_PORT=""

# Hold a process whose device is missing: re-check every DEVICE_RECHECK seconds, saying so again only when the
# reason changes, until the device is there (or the node's env allows the fallback).
hold_degraded() {
    local label=$1 said=""
    while [ "$device" = degraded ]; do
        if [ "$device_why" != "$said" ]; then
            say_error "$label degraded: $device_why"
            said=$device_why
        fi
        sleep "${DEVICE_RECHECK:-60}"
        check_device
    done
}

