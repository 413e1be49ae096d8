#!/usr/bin/env bash
# DHCP benchmark: perfdhcp (ISC, package kea-admin) against dnsmasq, Kea (1 thread) and
# corral-dhcp in the same run, on the same pair of network namespaces joined by a veth pair.
#
# perfdhcp acts as a relay agent (giaddr = its address), so every server answers relayed
# traffic here. Figures per server: DORA exchanges/s, drops, average and p99 delay (from
# perfdhcp's `-x t` per-exchange timers), and the time for 2000 clients arriving at once to be
# all leased. Leases are persisted by every server: dnsmasq to its lease file, Kea to its
# memfile CSV, corral to its lease journal (each ACK sent after one O_DSYNC write of its batch to a preallocated
# file; several may overlap) with its SQLite store brought up to date behind it (crates/corral-dhcp/src/persist.rs).
# SECONDS_RUN (default 10) sets the rate test's length: 30 puts store checkpoints and journal reuse inside it.
#
# Usage: sudo bench/dhcp/run.sh [RATE] [CLIENTS]     (defaults 5000 exchanges/s, 1000 clients)
# Needs root. Everything runs inside namespaces it creates and removes (trap on exit).
set -euo pipefail

RATE=${1:-5000}
CLIENTS=${2:-1000}
SECONDS_RUN=${SECONDS_RUN:-10}
export BURST=${BURST:-2000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/corral-bench-dhcp.XXXXXX)
NS_S=cbdhcp-s$$
NS_C=cbdhcp-c$$
SRV=10.99.0.1
CLI=10.99.0.2

[ "$(id -u)" -eq 0 ] || { echo "run.sh: needs root (network namespaces)" >&2; exit 2; }
command -v perfdhcp >/dev/null || { echo "run.sh: perfdhcp missing: apt-get install kea-admin" >&2; exit 2; }
command -v dnsmasq >/dev/null || { echo "run.sh: dnsmasq missing: apt-get install dnsmasq" >&2; exit 2; }
if ! command -v kea-dhcp4 >/dev/null; then
    echo "run.sh: installing kea-dhcp4-server" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kea-dhcp4-server >/dev/null
fi

cleanup() {
    set +e
    for ns in "$NS_S" "$NS_C"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "building corral-dhcp example (release)..." >&2
(cd "$ROOT" && cargo build --release -q -p corral-dhcp --example dhcp_server)
CORRAL="$ROOT/target/release/examples/dhcp_server"

ip netns add "$NS_S"; ip netns add "$NS_C"
ip -n "$NS_S" link set lo up; ip -n "$NS_C" link set lo up
ip -n "$NS_S" link add s0 type veth peer name c0 netns "$NS_C"
ip -n "$NS_S" addr add $SRV/16 brd + dev s0
ip -n "$NS_C" addr add $CLI/16 brd + dev c0
ip -n "$NS_S" link set s0 up; ip -n "$NS_C" link set c0 up

# One /16 with a pool larger than the number of clients of any run.
POOL_START=10.99.1.0
POOL_END=10.99.40.255

# --- server launchers: each starts in the server namespace and prints its pid ---
start_dnsmasq() {
    : > "$WORK/dnsmasq.leases"
    $PIN_S ip netns exec "$NS_S" dnsmasq --keep-in-foreground --no-ping --port=0 --bind-interfaces \
        --interface=s0 --dhcp-range=$POOL_START,$POOL_END,255.255.0.0,1h \
        --dhcp-leasefile="$WORK/dnsmasq.leases" --dhcp-authoritative --dhcp-lease-max=100000 --quiet-dhcp \
        --log-facility="$WORK/dnsmasq.log" --pid-file="$WORK/dnsmasq.pid" >/dev/null 2>&1 &
    echo $!
}

start_kea() {
    rm -f "$WORK/kea-leases4.csv"*
    cat > "$WORK/kea.json" <<JSON
{ "Dhcp4": {
    "interfaces-config": { "interfaces": [ "s0" ], "dhcp-socket-type": "udp" },
    "lease-database": { "type": "memfile", "persist": true, "name": "$WORK/kea-leases4.csv", "lfc-interval": 0 },
    "multi-threading": { "enable-multi-threading": false },
    "valid-lifetime": 3600,
    "authoritative": true,
    "subnet4": [ { "id": 1, "subnet": "10.99.0.0/16", "pools": [ { "pool": "$POOL_START - $POOL_END" } ] } ],
    "loggers": [ { "name": "kea-dhcp4", "severity": "WARN", "output_options": [ { "output": "$WORK/kea.log" } ] } ]
} }
JSON
    mkdir -p /run/kea
    KEA_PIDFILE_DIR=$WORK KEA_LOCKFILE_DIR=$WORK $PIN_S ip netns exec "$NS_S" kea-dhcp4 -c "$WORK/kea.json" >"$WORK/kea.out" 2>&1 &
    echo $!
}

start_corral() {
    rm -rf "$WORK/site" "$WORK/corral.db"*
    mkdir -p "$WORK/site/machines" "$WORK/site/profiles"
    cat > "$WORK/site/site.toml" <<TOML
[server]
interfaces = ["s0"]
[dhcp]
mode = "full"
[[dhcp.network]]
name = "bench"
cidr = "10.99.0.0/16"
pool = "$POOL_START-$POOL_END"
lease = "1h"
TOML
    RUST_LOG=${RUST_LOG:-corral_dhcp=info} $PIN_S ip netns exec "$NS_S" "$CORRAL" --site "$WORK/site" --interface s0 --server-ip $SRV \
        --store "$WORK/corral.db" >"$WORK/corral.out" 2>"$WORK/corral.log" &
    echo $!
}

# The launchers run in command substitutions, so their servers are not our children: poll.
stop() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
}

# CPU seconds (user + system) a process has used so far, from /proc/PID/stat.
cpu_s() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# Per-thread scheduling of a server (tid, name, then /proc/PID/task/TID/schedstat: ns on CPU,
# ns waiting on a run queue, timeslices), to tell a slow disk from threads that wait for a core.
thread_sched() {
    for t in /proc/"$1"/task/*; do
        printf '%s %s %s\n' "${t##*/}" "$(tr ' ' '_' < "$t/comm")" "$(cat "$t/schedstat")"
    done 2>/dev/null
}
# Differences of two thread_sched snapshots, per thread: CPU ms, run-queue wait ms, slices.
sched_diff() {
    awk 'NR == FNR { c[$1] = $3; w[$1] = $4; n[$1] = $5; next }
         { dc = ($3 - c[$1]) / 1e6; dw = ($4 - w[$1]) / 1e6; dn = $5 - n[$1]
           if (dc + dw > 1) printf " %s %.0f/%.0f/%d", $2, dc, dw, dn }' "$1" "$2"
}

# Samples the UDP receive queues of a namespace (/proc/net/udp: bytes of buffers queued, as
# the kernel accounts them, and drops) every 10 ms for SECS seconds, then prints one summary:
# whether requests wait in the server's socket before it reads them, or replies in perfdhcp's.
queue_sampler() { # NS SECS LABEL PORT_HEX (empty: every socket)
    timeout $(($2 + 10)) ip netns exec "$1" python3 - "$2" "$3" "$4" <<'PY' &
import sys, time
secs, label, port = float(sys.argv[1]), sys.argv[2], sys.argv[3]
qs, drops0, drops1, end = [], None, 0, time.time() + secs
while time.time() < end:
    q = d = 0
    for line in open("/proc/net/udp").readlines()[1:]:
        f = line.split()
        p = f[1].split(":")[1]
        if not port or p == port:
            q += int(f[4].split(":")[1], 16); d += int(f[12])
    qs.append(q); drops0 = d if drops0 is None else drops0; drops1 = d
    time.sleep(0.01)
qs.sort()
k = lambda p: qs[(len(qs) - 1) * p // 100] / 1024
print("   %s receive queue: p50 %.0f KiB, p99 %.0f KiB, max %.0f KiB (%d samples), drops %d" % (
    label, k(50), k(99), qs[-1] / 1024, len(qs), drops1 - (drops0 or 0)))
PY
}

# perfdhcp DORA at RATE over CLIENTS clients for SECONDS_RUN seconds; prints a result line.
# One perfdhcp alone on the shared cores delivered only about 4200 of 5000 exchanges/s asked
# (run 4), so PERF_INSTANCES (default 2) instances share the rate and the clients, each as its
# own relay (its own giaddr, 10.99.0.2, .3, ...) with its own MAC prefix; their figures are
# summed (rate, packets, drops) and merged (delays, p99).
PERF_INSTANCES=${PERF_INSTANCES:-2}
for i in $(seq 2 "$PERF_INSTANCES"); do
    ip -n "$NS_C" addr add 10.99.0.$((i + 1))/16 dev c0
done
run_perf() {
    local name=$1 files=() pids=() i
    local n=$((RATE * SECONDS_RUN / PERF_INSTANCES))
    for i in $(seq 1 "$PERF_INSTANCES"); do
        local out=$WORK/perf-$name-$i.txt
        files+=("$out")
        timeout $((SECONDS_RUN + 30)) $PIN_C ip netns exec "$NS_C" perfdhcp -4 -r "$((RATE / PERF_INSTANCES))" \
            -R "$((CLIENTS / PERF_INSTANCES))" -n "$n" -p "$((SECONDS_RUN + 5))" -W 2000000 \
            -l 10.99.0.$((i + 1)) -b "mac=00:0c:0$i:00:00:00" -x t $SRV >"$out" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}" || true
    python3 "$ROOT/bench/dhcp/summarise.py" "$name" "${files[@]}"
}

# BURST clients booting at once: perfdhcp's avalanche scenario sends every client's DISCOVER
# at once and retransmits until each holds a lease (as PXE firmware does), so the run ends
# when ALL are leased. Prints one line ending in all_leased_s=SECONDS.
run_burst() {
    local name=$1 out=$WORK/burst-$1.txt start end
    start=$(date +%s.%N)
    timeout 60 $PIN_C ip netns exec "$NS_C" perfdhcp -4 --scenario avalanche -R "$BURST" \
        -p 30 -W 2000000 -l $CLI -b mac=00:0c:01:02:03:04 $SRV >"$out" 2>&1 || true
    end=$(date +%s.%N)
    python3 "$ROOT/bench/dhcp/summarise.py" --burst "$name" "$out" "$start" "$end"
}

# SERVER_CPUS / CLIENT_CPUS (e.g. 0 and 1): pin the servers and perfdhcp to those CPUs
# (taskset -c), so that the load generator does not take the server's core.
PIN_S=${SERVER_CPUS:+taskset -c $SERVER_CPUS}
PIN_C=${CLIENT_CPUS:+taskset -c $CLIENT_CPUS}

# SERVERS (default all three) and SKIP_RATE=1 (burst only) narrow a run for quick checks.
SERVERS=${SERVERS:-dnsmasq kea corral}
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
# The floor for a durable ACK: this disk's own fdatasync latency (4 KiB overwrite + fdatasync,
# 2000 times, in the directory that holds the lease store), measured before any server runs.
sync
python3 - "$WORK" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"\0" * (1 << 20), 0); os.fsync(fd)
ts = []
for i in range(2000):
    os.pwrite(fd, os.urandom(4096), (i % 256) * 4096)
    t = time.perf_counter(); os.fdatasync(fd); ts.append((time.perf_counter() - t) * 1000)
os.close(fd); os.unlink(path)
ts.sort()
q = lambda p: ts[(len(ts) - 1) * p // 100]
print("disk fdatasync of 4 KiB, no server running: p50 %.2f ms, p99 %.2f ms, max %.2f ms" % (q(50), q(99), ts[-1]))
PY
if [ "${SKIP_RATE:-0}" != 1 ]; then
echo "== $CLIENTS clients, target $RATE exchanges/s for ${SECONDS_RUN}s (DORA, relayed, $PERF_INSTANCES perfdhcp instances) =="
RESULTS=()
for srv in $SERVERS; do
    # Each server starts on a disk with nothing left to write back: Kea's lease file (appended,
    # never fsynced) and the bench's own build leave tens of MB of dirty pages whose writeback
    # otherwise lands inside the next server's run and stalls its fsyncs (corral after Kea:
    # ACK p99 46-53 ms; corral alone on the same binary: 9.1 ms).
    sync
    pid=$(start_$srv); sleep 1.5
    cpu0=$(cpu_s "$pid")
    thread_sched "$pid" > "$WORK/sched0"
    queue_sampler "$NS_S" "$SECONDS_RUN" "server socket (port 67)" 0043 > "$WORK/q-server"
    queue_sampler "$NS_C" "$SECONDS_RUN" "perfdhcp sockets" "" > "$WORK/q-client"
    RESULTS+=("$(run_perf $srv)")
    wait
    cpu1=$(cpu_s "$pid")
    thread_sched "$pid" > "$WORK/sched1"
    echo "${RESULTS[-1]}"
    echo "   server threads (CPU ms/run-queue wait ms/slices):$(sched_diff "$WORK/sched0" "$WORK/sched1")"
    cat "$WORK/q-server" "$WORK/q-client"
    # Server CPU per exchange: less sensitive to other load on the machine than the rate.
    awk -v a="$cpu0" -v b="$cpu1" -v r="$(awk '{ print $2 }' <<<"${RESULTS[-1]}")" -v t="$SECONDS_RUN" \
        'BEGIN { c = b - a; n = r * t; printf "   server CPU %.2f s = %.1f us per exchange\n", c, (n > 0 ? c / n * 1e6 : 0) }'
    stop "$pid"
    case $srv in
        dnsmasq) echo "   dnsmasq leases on disk: $(wc -l < "$WORK/dnsmasq.leases")" ;;
        kea) echo "   kea leases on disk: $(grep -c '^10\.' "$WORK/kea-leases4.csv" 2>/dev/null || echo 0) rows (memfile, appended, not fsynced)" ;;
        corral) echo "   corral lease writer: $(sed 's/\x1b\[[0-9;]*m//g' "$WORK/corral.log" | grep -o 'commits=.*' | tail -1)"
                echo "   corral answer times (receive to send, in the server): $(sed 's/\x1b\[[0-9;]*m//g' "$WORK/corral.log" | grep -o 'received=.*' | tail -1)"
                echo "   corral leases on disk: $(sqlite3 "$WORK/corral.db" "select count(*) from dhcp_leases where state='bound'") bound in the store (each ACKed after its lease journal write)" ;;
    esac
done
fi

echo
echo "== $BURST clients at once =="
declare -A ALL_LEASED
for srv in $SERVERS; do
    [ "$srv" = dnsmasq ] && continue
    sync
    pid=$(start_$srv); sleep 1.5
    line=$(run_burst $srv)
    echo "$line"
    ALL_LEASED[$srv]=${line##*all_leased_s=}
    stop "$pid"
done
if [ -n "${ALL_LEASED[kea]:-}" ] && [ -n "${ALL_LEASED[corral]:-}" ]; then
    awk -v k="${ALL_LEASED[kea]}" -v c="${ALL_LEASED[corral]}" \
        'BEGIN { printf "burst: all %s leased in kea %s s, corral %s s: corral/kea time ratio %.2f (< 1: corral faster)\n", ENVIRON["BURST"], k, c, (k > 0 ? c / k : -1) }'
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
