#!/usr/bin/env bash
# Interleaved full copies (caches dropped before each): rsync and one or more corral binaries
# over the same loopback sshd as run.sh, with CPU time of each end (/usr/bin/time on the
# master and, through --remote-corral, on `corral sync serve`; sshd's CPU is not counted).
#
#   ROUNDS=3 SCALE=0.2 PORT=22991 WORK=/var/tmp/corral-bench-x bash bench/sync/fullcopy.sh BIN...
#
# Each BIN is a corral binary; the data is run.sh's (generated here when missing). Each corral
# run gets an empty state directory (no master hash cache: a fresh tree, as in run.sh, whose
# tree is regenerated every run). Needs root.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SCALE="${SCALE:-0.2}"; SEED="${SEED:-1}"; ROUNDS="${ROUNDS:-3}"
WORK="${WORK:-/var/tmp/corral-bench-sync}"; PORT="${PORT:-22987}"
[ "$#" -ge 1 ] || { echo "usage: fullcopy.sh CORRAL_BIN..." >&2; exit 2; }
SRC="$WORK/src-$SCALE"
mkdir -p "$WORK"
source "$HERE/lib.sh"
ensure_data tree "$SRC"
trash_init
trap 'stop_sshd; trash_empty' EXIT
start_sshd
corral_ssh_args
now() { date +%s.%N; }
DST="$WORK/dst-full"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
    aside "$DST"; mkdir -p "$DST"; drop_caches
    t0=$(now); rsync -a --delete -e "$SSH" "$SRC/" "root@127.0.0.1:$DST/"; t1=$(now)
    printf 'round %s rsync            %6.2f s  load %s\n' "$r" "$(echo "$t1 - $t0" | bc)" "$(cut -d' ' -f1 /proc/loadavg)"
    for bin in "$@"; do
        aside "$DST"; mkdir -p "$DST"; drop_caches
        export CORRAL_STATE_DIR="$WORK/state-fullcopy"; rm -rf "$CORRAL_STATE_DIR"
        t0=$(now)
        /usr/bin/time -f '%U %S' -o "$WORK/time-master" "$bin" sync push --delete --ssh-persist 0 "${CSSH[@]}" \
            --remote-corral "/usr/bin/time -f '%U %S' -o $WORK/time-serve $bin" \
            "$SRC/" "root@127.0.0.1:$DST/" >/dev/null 2>>"$WORK/fullcopy.log"
        t1=$(now)
        # The remote end's /usr/bin/time writes its figures when it exits, just after the
        # master has its report.
        for _ in $(seq 20); do [ -s "$WORK/time-serve" ] && break; sleep 0.1; done
        printf 'round %s %-16s %6.2f s  master+ssh user/sys %s  serve user/sys %s  load %s\n' "$r" "$(basename "$bin")" \
            "$(echo "$t1 - $t0" | bc)" "$(cat "$WORK/time-master")" "$(cat "$WORK/time-serve")" "$(cut -d' ' -f1 /proc/loadavg)"
        left=$(rsync -a -c -n -i "$SRC/" "$DST/" | { grep -v '^\.d' || true; } | wc -l)
        [ "$left" -eq 0 ] || echo "  !! copy differs from the source in $left entries"
    done
done
rm -rf "$WORK/state-fullcopy"
