#!/usr/bin/env bash
# Lock-step profile of one TFTP server: server CPU per MB (utime+stime from /proc/PID/stat
# around one 64 MiB fetch at blksize 1432, no windowsize), then syscalls per block
# (strace -c -f) and context switches per block (perf stat) over an 8 MiB fetch.
# With PERF_RECORD=1 it also prints the top of a `perf record -g` profile.
# Usage: bench/tftp/profile.sh dnsmasq|corral [CORRAL_BINARY]   (root; atftp, dnsmasq, strace, perf)
set -euo pipefail
S=$1; BIN=${2:-$(dirname "$0")/../../target/release/examples/tftp_server}
SRV=tftpp-srv-$$; CLI=tftpp-cli-$$; SIP=10.78.0.1; CIP=10.78.0.2
WORK=$(mktemp -d /tmp/tftpprof.XXXXXX); ROOT=$WORK/root; mkdir -p "$ROOT"; chmod 755 "$WORK" "$ROOT"
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; ip netns del $SRV 2>/dev/null; ip netns del $CLI 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
ip netns add $SRV; ip netns add $CLI
ip link add vs$$ netns $SRV type veth peer name vc$$ netns $CLI
ip -n $SRV addr add $SIP/24 dev vs$$; ip -n $CLI addr add $CIP/24 dev vc$$
ip -n $SRV link set vs$$ up; ip -n $CLI link set vc$$ up
head -c $((64 << 20)) /dev/urandom > "$ROOT/big.bin"; head -c $((8 << 20)) /dev/urandom > "$ROOT/eight.bin"
chmod 644 "$ROOT"/*.bin
case $S in
  dnsmasq) ip netns exec $SRV dnsmasq --keep-in-foreground --port=0 --enable-tftp --tftp-root="$ROOT" \
      --listen-address=$SIP --bind-interfaces --user=root --log-facility="$WORK/d.log" & ;;
  *) ip netns exec $SRV "$BIN" "$ROOT" 0.0.0.0:69 1000 2>"$WORK/c.log" & ;;
esac
PID=$!; sleep 0.5
fetch() { ip netns exec $CLI atftp --option "blksize 1432" --option "tsize 0" -g -r "$1" -l "$WORK/out" $SIP 69 >/dev/null 2>&1; }
ticks() { awk '{print $14 + $15}' /proc/$PID/stat; }
HZ=$(getconf CLK_TCK)
c0=$(ticks); t0=$(date +%s.%N); fetch big.bin; t1=$(date +%s.%N); sleep 0.3; c1=$(ticks)
cmp -s "$WORK/out" "$ROOT/big.bin" || echo "CORRUPT"
awk -v c=$((c1 - c0)) -v hz=$HZ -v a=$t0 -v b=$t1 -v s=$S 'BEGIN { printf "%s: 64 MiB lock-step %.1f MB/s, server CPU %.2f s = %.1f ms per MB, %.1f us per block\n", s, 67.108864/(b-a), c/hz, c/hz*1000/67.108864, c/hz*1e6/46869 }'
strace -c -f -p $PID -o "$WORK/strace" & SP=$!; sleep 0.5; fetch eight.bin; sleep 0.2; kill -INT $SP; wait $SP 2>/dev/null || true
echo "strace -c over an 8 MiB fetch (5858 blocks):"; head -20 "$WORK/strace"
perf stat -e context-switches,cpu-migrations,task-clock -p $PID -o "$WORK/perf" & PP=$!; sleep 0.5; fetch eight.bin; sleep 0.2; kill -INT $PP; wait $PP 2>/dev/null || true
grep -E 'context|migr|task-clock' "$WORK/perf"
if [ "${PERF_RECORD:-0}" = 1 ]; then
    perf record -q -g -p $PID -o "$WORK/perf.data" 2>/dev/null & PR=$!; sleep 0.5; fetch eight.bin; sleep 0.2
    kill -INT $PR; wait $PR 2>/dev/null || true
    echo "perf record -g, top self time over an 8 MiB fetch:"
    perf report -i "$WORK/perf.data" --no-children --stdio --sort dso,sym 2>/dev/null | grep -E '^ +[0-9.]+%' | head -25
fi
