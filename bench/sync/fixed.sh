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
SEED="${SEED:-1}"
source "$HERE/lib.sh"
trap stop_sshd EXIT
start_sshd
t() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null 2>>"$WORK/corral.log" || true; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
corral_ssh_args
push() { "$1" sync push --delete "${CSSH[@]}" --remote-corral "$1" "$SRC/" "root@127.0.0.1:$WORK/dst-corral/"; }
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
