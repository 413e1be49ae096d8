#!/usr/bin/env bash
# The two fixed-cost figures of bench/sync/run.sh, repeated and interleaved with rsync's, for
# iterating on a change without the full benchmark: a no-change sync after drop_caches (cold)
# and the content-verified check with nothing changed (warm). Needs a WORK dir that run.sh
# has filled (the tree, both copies, the ssh keys and the site), and root.
#
#   WORK=/var/tmp/corral-bench-sync PORT=22987 SCALE=0.2 N=5 bench/sync/fixed.sh
#
# Environment: as run.sh, plus N (rounds, default 5) and CORRAL_B (a second corral binary
# measured in the same rounds, e.g. a build of the base commit; optional).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SCALE="${SCALE:-0.1}"
WORK="${WORK:-/var/tmp/corral-bench-sync}"
PORT="${PORT:-22987}"
N="${N:-5}"
CORRAL="${CORRAL:-$REPO/target/release/corral}"
CORRAL_B="${CORRAL_B:-}"
SRC="$WORK/src-$SCALE"
SSHDIR="$WORK/ssh"
[ -d "$SRC" ] && [ -e "$SSHDIR/sshd_config" ] && [ -d "$WORK/dst-corral" ] ||
    { echo "fixed.sh: run bench/sync/run.sh with this WORK first" >&2; exit 2; }
mkdir -p /run/sshd
STOCK_BASHRC=/usr/share/base-files/dot.bashrc
if [ -e "$STOCK_BASHRC" ] && [ -e /root/.bashrc ]; then
    unshare -m --propagation private sh -c \
        "mount --bind $STOCK_BASHRC /root/.bashrc && exec /usr/sbin/sshd -f $SSHDIR/sshd_config -D -e" \
        2>"$SSHDIR/sshd.log" &
else
    /usr/sbin/sshd -f "$SSHDIR/sshd_config" -D -e 2>"$SSHDIR/sshd.log" &
fi
SSHD_PID=$!
SSH="ssh -p $PORT -i $SSHDIR/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
cleanup() {
    $SSH -oControlPath="${CORRAL_STATE_DIR:-/var/lib/corral}/ssh/%C" -O exit root@127.0.0.1 2>/dev/null || true
    kill "$SSHD_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 50); do $SSH root@127.0.0.1 true 2>/dev/null && break; sleep 0.1; done

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
t() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null 2>>"$WORK/corral.log" || true; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
push() { "$1" sync push --delete --ssh-arg=-p "--ssh-arg=$PORT" --ssh-arg=-i "--ssh-arg=$SSHDIR/client_key" \
    --ssh-arg=-o --ssh-arg=StrictHostKeyChecking=no --ssh-arg=-o --ssh-arg=UserKnownHostsFile=/dev/null \
    --ssh-arg=-o --ssh-arg=LogLevel=ERROR --remote-corral "$1" "$SRC/" "root@127.0.0.1:$WORK/dst-corral/"; }
# One site per binary, so that the far end runs the same binary as the master.
site_for() {
    local d="$WORK/site-fixed-$(echo "$1" | md5sum | cut -c1-8)"
    mkdir -p "$d/trees"
    cat > "$d/trees/bench.toml" <<TOML
source = "$SRC"
[ssh]
args = ["-p", "$PORT", "-i", "$SSHDIR/client_key", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
remote_corral = "$1"
[[child]]
name = "copy"
host = "root@127.0.0.1"
dest = "$WORK/dst-corral"
TOML
    echo "$d"
}
declare -A SITE
drift() { "$1" drift bench --all --site "${SITE[$1]}"; }
rs() { rsync -a --delete -e "$SSH" "$@" "$SRC/" "root@127.0.0.1:$WORK/dst-rsync/"; }

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
BINS=("$CORRAL"); [ -n "$CORRAL_B" ] && BINS+=("$CORRAL_B")
for b in "${BINS[@]}"; do SITE[$b]=$(site_for "$b"); push "$b" >/dev/null 2>&1 || true; drift "$b" >/dev/null 2>&1 || true; done
printf '%-6s %12s' round "rsync cold"; for i in "${!BINS[@]}"; do printf ' %12s' "corral$i cold"; done
printf ' %12s' "rsync -c"; for i in "${!BINS[@]}"; do printf ' %12s' "drift$i warm"; done; echo "   (ms)"
for r in $(seq "$N"); do
    printf '%-6s' "$r"
    drop_caches; printf ' %12s' "$(t rs)"
    for b in "${BINS[@]}"; do drop_caches; printf ' %12s' "$(t push "$b")"; done
    rs -c -n >/dev/null; printf ' %12s' "$(t rs -c -n)"
    for b in "${BINS[@]}"; do drift "$b" >/dev/null 2>&1 || true; printf ' %12s' "$(t drift "$b")"; done
    echo
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
