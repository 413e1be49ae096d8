#!/usr/bin/env bash
# The 1 %-changed figure of bench/sync/run.sh alone, repeated and interleaved with rsync's, for
# iterating on a change without the full benchmark: 64 bytes edited in 1 % of the files
# (gen.py change), everything written before flushed, then one timed sync by each tool
# (rsync first in odd rounds, the corral binaries in turn first in odd and last in even ones),
# then the edits undone and every copy synced back, untimed.
# Needs root (sshd, drop_caches). Makes the tree and the copies it needs when they are missing.
#
#   WORK=/var/tmp/corral-bench-sync PORT=22987 SCALE=1 N=5 bench/sync/change.sh
#
# Environment: as run.sh, plus N (rounds, default 5) and CORRAL_B (a second corral binary
# measured in the same rounds, into a copy of its own, e.g. a build of the base commit;
# optional). LOG=1 keeps both ends' debug logs of the last round of each binary in
# $WORK/change-corral*.log.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SCALE="${SCALE:-0.1}"
SEED="${SEED:-1}"
WORK="${WORK:-/var/tmp/corral-bench-sync}"
PORT="${PORT:-22987}"
N="${N:-5}"
CORRAL="${CORRAL:-$REPO/target/release/corral}"
CORRAL_B="${CORRAL_B:-}"
SRC="$WORK/src-$SCALE"
[ "$(id -u)" -eq 0 ] || { echo "change.sh: needs root (sshd, drop_caches)" >&2; exit 2; }
[ -x "$CORRAL" ] || { echo "change.sh: no corral binary at $CORRAL (cargo build --release)" >&2; exit 2; }
mkdir -p "$WORK"
source "$HERE/lib.sh"
[ -e "$SRC.undo" ] && [ -e "$SRC.complete" ] && python3 "$HERE/gen.py" undo "$SRC.undo"
ensure_data tree "$SRC"
trap 'stop_sshd; [ -e "$SRC.undo" ] && python3 "$HERE/gen.py" undo "$SRC.undo"' EXIT
export CORRAL_STATE_DIR="$WORK/state"
start_sshd
corral_ssh_args

BINS=("$CORRAL"); [ -n "$CORRAL_B" ] && BINS+=("$CORRAL_B")
# Each binary syncs a copy of its own (the first binary the one run.sh uses).
dest() { if [ "$1" = 0 ]; then echo "$WORK/dst-corral"; else echo "$WORK/dst-corral-$1"; fi; }
rs() { rsync -a --delete -e "$SSH" "$@" "$SRC/" "root@127.0.0.1:$WORK/dst-rsync/"; }
push() { # INDEX [remote env...]
    local b="${BINS[$1]}" i=$1; shift
    "$b" sync push --delete "${CSSH[@]}" --remote-corral "${*:+env $* }$b" "$SRC/" "root@127.0.0.1:$(dest "$i")/"
}
ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null 2>>"$WORK/corral.log"; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }
median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }

echo "== copies (made when missing) and brought up to date" >&2
mkdir -p "$WORK/dst-rsync"; rs
for i in "${!BINS[@]}"; do mkdir -p "$(dest "$i")"; push "$i" >/dev/null 2>>"$WORK/corral.log"; done
sync

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-6s %10s' round rsync; for i in "${!BINS[@]}"; do printf ' %10s %6s' "corral$i" ratio; done; echo "   (ms)"
declare -a RT; declare -A CT
for r in $(seq "$N"); do
    python3 "$HERE/gen.py" change "$SRC" --seed "$SEED" --percent 1 --undo "$SRC.undo"
    step_r() { sync; sleep 1; RT+=("$(ms rs)"); }
    step_c() {
        local i order=("${!BINS[@]}")
        # The binaries take turns going first (the first after rsync's run was seen faster or
        # slower by more than a change measured).
        ((r % 2)) || order=($(printf '%s\n' "${order[@]}" | sort -rn))
        for i in "${order[@]}"; do
            sync; sleep 1
            if [ "${LOG:-0}" = 1 ] && [ "$r" = "$N" ]; then
                local t0 t1; t0=$(date +%s%N)
                RUST_LOG=corral_sync=debug push "$i" RUST_LOG=corral_sync=debug >/dev/null 2>"$WORK/change-corral$i.log" || true
                t1=$(date +%s%N); CT[$i,$r]=$(( (t1 - t0) / 1000000 ))
            else
                CT[$i,$r]=$(ms push "$i")
            fi
        done
    }
    if ((r % 2)); then step_r; step_c; else step_c; step_r; fi
    printf '%-6s %10s' "$r" "${RT[-1]}"
    for i in "${!BINS[@]}"; do
        printf ' %10s %6s' "${CT[$i,$r]}" "$(python3 -c "print(f'{${CT[$i,$r]}/${RT[-1]}:.2f}')")"
    done
    echo
    python3 "$HERE/gen.py" undo "$SRC.undo"
    rs; for i in "${!BINS[@]}"; do push "$i" >/dev/null 2>>"$WORK/corral.log"; done
done
mr=$(median "${RT[@]}")
printf '%-6s %10s' median "$mr"
for i in "${!BINS[@]}"; do
    vals=(); for r in $(seq "$N"); do vals+=("${CT[$i,$r]}"); done
    mc=$(median "${vals[@]}")
    printf ' %10s %6s' "$mc" "$(python3 -c "print(f'{$mc/$mr:.2f}')")"
done
echo
