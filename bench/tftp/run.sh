#!/usr/bin/env bash
# TFTP benchmark: corral-tftp against dnsmasq and tftp-hpa (in.tftpd), in the same run.
#
# Two network namespaces joined by a veth pair (server 10.77.0.1, client 10.77.0.2); client and
# server share the machine's cores, so only ratios from one run mean anything.
#   1. a 64 MiB file fetched with atftp at blksize 1432, without windowsize and with windowsize 16;
#   2. 200 atftp clients fetching a 4 MiB file at once: how many complete, and the total time.
# corral runs as crates/corral-tftp/examples/tftp_server on tokio's multi-threaded runtime
# ("corral") and on the single-threaded one ("corral-1t", TFTP_RUNTIME=current).
# Every fetched file is compared with the original. For the 64 MiB fetches the script also
# prints the server's CPU time per MB (utime+stime from /proc/PID/stat around each fetch, the
# lowest of the runs), which other load on the machine distorts much less than the rates.
#
# atftpd (the only one of the peers that honours windowsize) cannot be installed beside
# tftpd-hpa: Debian's packages conflict. With ATFTPD=1 the script measures it last, installing
# `atftpd` with apt-get (which removes tftpd-hpa) and reinstalling `tftpd-hpa` afterwards.
# Without it, corral's windowsize figure is compared with the issue's atftpd reference,
# 139.5 MB/s, and the output says so.
#
# Needs root, atftp, dnsmasq, tftpd-hpa (in.tftpd). Usage: [ATFTPD=1] bench/tftp/run.sh [RUNS]
# (RUNS = repetitions of the single-client fetches, best taken; default 3).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${1:-3}
SRV=tftpb-srv-$$
CLI=tftpb-cli-$$
SIP=10.77.0.1
CIP=10.77.0.2
WORK=$(mktemp -d /tmp/tftpbench.XXXXXX)
ROOT=$WORK/root
mkdir -p "$ROOT" "$WORK/out"
chmod 755 "$WORK" "$ROOT"
ATFTPD_REF=139.5

[ "$(id -u)" -eq 0 ] || { echo "run.sh: needs root (network namespaces)" >&2; exit 1; }
for p in atftp dnsmasq in.tftpd ip; do
    command -v "$p" >/dev/null || { echo "run.sh: $p is missing (apt-get install atftp dnsmasq tftpd-hpa iproute2)" >&2; exit 1; }
done

SERVER_PID=
CG=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    ip netns del "$SRV" 2>/dev/null || true
    ip netns del "$CLI" 2>/dev/null || true
    rm -rf "$WORK"
    if [ -n "$CG" ]; then sleep 0.3; rmdir "$CG" 2>/dev/null || true; fi
    if [ "${ATFTPD:-0}" = 1 ] && ! command -v in.tftpd >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tftpd-hpa >/dev/null || true
    fi
}
trap cleanup EXIT

echo "building corral's tftp_server example (release)..." >&2
cargo build -q --release -p corral-tftp --example tftp_server
CORRAL=$PWD/target/release/examples/tftp_server

ip netns add "$SRV"
ip netns add "$CLI"
ip link add veth-s$$ netns "$SRV" type veth peer name veth-c$$ netns "$CLI"
ip -n "$SRV" addr add $SIP/24 dev veth-s$$
ip -n "$CLI" addr add $CIP/24 dev veth-c$$
for ns in "$SRV" "$CLI"; do
    ip -n "$ns" link set lo up
done
ip -n "$SRV" link set veth-s$$ up
ip -n "$CLI" link set veth-c$$ up

head -c $((64 << 20)) /dev/urandom > "$ROOT/big.bin"
head -c $((4 << 20)) /dev/urandom > "$ROOT/four.bin"
chmod 644 "$ROOT"/*.bin

start_server() {
    case $1 in
        dnsmasq)
            ip netns exec "$SRV" dnsmasq --keep-in-foreground --port=0 --enable-tftp \
                --tftp-root="$ROOT" --tftp-max=1000 --listen-address=$SIP --bind-interfaces \
                --user=root --pid-file="$WORK/dnsmasq.pid" --log-facility="$WORK/dnsmasq.log" &
            ;;
        tftp-hpa)
            ip netns exec "$SRV" in.tftpd --foreground --address $SIP:69 --secure --permissive \
                --user root "$ROOT" &
            ;;
        corral)
            ip netns exec "$SRV" "$CORRAL" "$ROOT" 0.0.0.0:69 1000 2>"$WORK/corral.log" &
            ;;
        corral-1t)
            ip netns exec "$SRV" env TFTP_RUNTIME=current "$CORRAL" "$ROOT" 0.0.0.0:69 1000 \
                2>"$WORK/corral.log" &
            ;;
        atftpd)
            ip netns exec "$SRV" atftpd --daemon --no-fork --port 69 --bind-address $SIP \
                --user root.root --maxthread 1000 --logfile "$WORK/atftpd.log" "$ROOT" &
            ;;
    esac
    SERVER_PID=$!
    if [ -n "$CG" ]; then echo "$SERVER_PID" > "$CG/cgroup.procs"; fi
    sleep 0.5
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    sleep 0.2
}

now() { date +%s.%N; }

# Server CPU so far in clock ticks. Each server runs in a cgroup of its own (cgroup v1
# cpuacct or v2) when the machine has one, so every thread and child counts, also those that
# ended (tftp-hpa forks a child per transfer and does not collect its times); otherwise
# utime + stime + cutime + cstime of SERVER_PID from /proc.
HZ=$(getconf CLK_TCK)
if [ -d /sys/fs/cgroup/cpuacct ] && mkdir -p "/sys/fs/cgroup/cpuacct/tftpbench-$$" 2>/dev/null; then
    CG=/sys/fs/cgroup/cpuacct/tftpbench-$$
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && mkdir -p "/sys/fs/cgroup/tftpbench-$$" 2>/dev/null; then
    CG=/sys/fs/cgroup/tftpbench-$$
fi
server_ticks() {
    if [ -f "$CG/cpuacct.usage" ]; then
        awk -v hz="$HZ" '{ printf "%.3f\n", $1 * hz / 1e9 }' "$CG/cpuacct.usage"
    elif [ -f "$CG/cpu.stat" ]; then
        awk -v hz="$HZ" '$1 == "usage_usec" { printf "%.3f\n", $2 * hz / 1e6 }' "$CG/cpu.stat"
    else
        awk '{ print $14 + $15 + $16 + $17 }' "/proc/$SERVER_PID/stat"
    fi
}

# One 64 MiB fetch; prints "MB/s CPU-ms-per-MB" (MB = 10^6 bytes; CPU is the server's, read
# from /proc before and after the fetch), or FAIL / CORRUPT.
fetch_big() {
    local opts=() o
    for o in "$@"; do opts+=(--option "$o"); done
    rm -f "$WORK/out/big"
    local t0 t1 c0 c1
    c0=$(server_ticks)
    t0=$(now)
    if ! ip netns exec "$CLI" timeout 300 atftp "${opts[@]}" -g -r big.bin -l "$WORK/out/big" $SIP 69 \
            >/dev/null 2>&1; then
        echo FAIL; return
    fi
    t1=$(now)
    # Let the server's transfer thread, task or child finish and be accounted.
    sleep 0.3
    c1=$(server_ticks)
    if ! cmp -s "$WORK/out/big" "$ROOT/big.bin"; then echo CORRUPT; return; fi
    awk -v a="$t0" -v b="$t1" -v c="$(awk -v a="$c0" -v b="$c1" 'BEGIN { print b - a }')" -v hz="$HZ" \
        'BEGIN { printf "%.1f %.1f\n", 67108864 / (b - a) / 1e6, c / hz * 1000 / 67.108864 }'
}

# Best rate and lowest server CPU per MB over RUNS fetches: "MB/s CPU-ms-per-MB".
best_of() {
    local best=0 cpu=999999 r c i
    for ((i = 0; i < RUNS; i++)); do
        read -r r c < <(fetch_big "$@")
        case $r in FAIL|CORRUPT) echo "$r $r"; return ;; esac
        best=$(awk -v a="$best" -v b="$r" 'BEGIN { print (b > a) ? b : a }')
        cpu=$(awk -v a="$cpu" -v b="$c" 'BEGIN { print (b < a) ? b : a }')
    done
    echo "$best $cpu"
}

# 200 clients at once; prints "completed seconds".
crowd() {
    rm -rf "$WORK/out/crowd"; mkdir -p "$WORK/out/crowd"
    local t0 t1 i pids=()
    t0=$(now)
    for ((i = 0; i < 200; i++)); do
        ip netns exec "$CLI" timeout 120 atftp --option "blksize 1432" -g -r four.bin \
            -l "$WORK/out/crowd/$i" $SIP 69 >/dev/null 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    t1=$(now)
    local ok=0
    for ((i = 0; i < 200; i++)); do
        cmp -s "$WORK/out/crowd/$i" "$ROOT/four.bin" && ok=$((ok + 1))
    done
    awk -v a="$t0" -v b="$t1" -v ok="$ok" 'BEGIN { printf "%d %.1f\n", ok, b - a }'
}

SERVERS=(dnsmasq tftp-hpa corral corral-1t)
[ "${ATFTPD:-0}" = 1 ] && SERVERS+=(atftpd)
declare -A PLAIN WIN PLAIN_CPU WIN_CPU CROWD_OK CROWD_T
for s in "${SERVERS[@]}"; do
    echo "== $s" >&2
    if [ "$s" = atftpd ]; then
        echo "installing atftpd (removes tftpd-hpa; reinstalled after)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq atftpd >/dev/null
    fi
    start_server "$s"
    read -r PLAIN[$s] PLAIN_CPU[$s] < <(best_of "blksize 1432" "tsize 0")
    read -r WIN[$s] WIN_CPU[$s] < <(best_of "blksize 1432" "tsize 0" "windowsize 16")
    read -r CROWD_OK[$s] CROWD_T[$s] < <(crowd)
    stop_server
    if [ "$s" = atftpd ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tftpd-hpa >/dev/null
        echo "tftpd-hpa reinstalled" >&2
    fi
    echo "   64 MiB blksize 1432: ${PLAIN[$s]} MB/s (${PLAIN_CPU[$s]} ms CPU/MB); windowsize 16: ${WIN[$s]} MB/s (${WIN_CPU[$s]} ms CPU/MB); 200 x 4 MiB: ${CROWD_OK[$s]}/200 in ${CROWD_T[$s]} s" >&2
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a ~ /^[0-9.]+$/) printf "%.2f", a / b; else print "n/a" }'; }

echo
echo "TFTP benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r)"
echo "load average at the end: $(cut -d" " -f1-3 /proc/loadavg)"
echo "dnsmasq $(dnsmasq --version | head -1 | awk '{print $3}'), tftp-hpa $(dpkg-query -W -f='${Version}' tftpd-hpa 2>/dev/null), atftp $(dpkg-query -W -f='${Version}' atftp 2>/dev/null); best of $RUNS"
echo
row() {
    local label=$1
    local -n values=$2
    printf '%-28s' "$label"
    for s in "${SERVERS[@]}"; do printf ' %12s' "${values[$s]}"; done
    echo
}
printf '%-28s' ""; for s in "${SERVERS[@]}"; do printf ' %12s' "$s"; done; echo
row "64 MiB, blksize 1432 (MB/s)" PLAIN
row "  server CPU (ms per MB)" PLAIN_CPU
row "  + windowsize 16 (MB/s)" WIN
row "  server CPU (ms per MB)" WIN_CPU
row "200 x 4 MiB: completed" CROWD_OK
row "200 x 4 MiB: time (s)" CROWD_T
echo
echo "corral / dnsmasq, no windowsize:     $(ratio "${PLAIN[corral]}" "${PLAIN[dnsmasq]}")  (target >= 1)"
echo "dnsmasq / corral server CPU per MB, no windowsize: $(ratio "${PLAIN_CPU[dnsmasq]}" "${PLAIN_CPU[corral]}")  (> 1: corral cheaper)"
echo "corral-1t / dnsmasq, no windowsize:  $(ratio "${PLAIN[corral-1t]}" "${PLAIN[dnsmasq]}")"
echo "corral / tftp-hpa, no windowsize:    $(ratio "${PLAIN[corral]}" "${PLAIN[tftp-hpa]}")"
if [ -n "${WIN[atftpd]:-}" ]; then
    echo "corral / atftpd, windowsize 16:      $(ratio "${WIN[corral]}" "${WIN[atftpd]}")  (same run; target >= 1)"
fi
echo "corral windowsize 16 / atftpd ref:   $(ratio "${WIN[corral]}" "$ATFTPD_REF")  (atftpd ${ATFTPD_REF} MB/s from the issue, not this run)"
echo "corral windowsize 16 / dnsmasq:      $(ratio "${WIN[corral]}" "${PLAIN[dnsmasq]}")"
echo "200 clients, tftp-hpa time / corral: $(ratio "${CROWD_T[tftp-hpa]}" "${CROWD_T[corral]}")  (target >= 1, all 200 complete)"
echo "200 clients, tftp-hpa / corral-1t:   $(ratio "${CROWD_T[tftp-hpa]}" "${CROWD_T[corral-1t]}")"
