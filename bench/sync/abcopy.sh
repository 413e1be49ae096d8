#!/usr/bin/env bash
# Interleaved full copies with each process's CPU: rsync, then each corral VARIANT, ROUNDS
# times, caches dropped before each copy, over the same loopback sshd as run.sh (lib.sh).
#
#   WORK=/var/tmp/bench-fc PORT=23116 SCALE=1 ROUNDS=3 bash bench/sync/abcopy.sh \
#       base=/abs/corral-base new=/abs/corral new-p0=/abs/corral:CORRAL_SYNC_PIPE_SIZE=0
#
# VARIANT is NAME=BIN[:ENV=VALUE] (BIN absolute: it also runs as the remote end; ENV is set
# for both ends). CARGS adds arguments to every corral push (e.g. CARGS="--compress never").
# Prints wall time, CPU seconds of master, ssh, sshd and `sync serve` (cpusample.py, /proc
# every 0.5 s; a process's last half second is not counted), /usr/bin/time's figures and the
# load. Each copy is checked for its file count only (fullcopy.sh checks content). Copies go
# into a new directory each time (the old ones aside, deleted at the end: lib.sh). The data
# is run.sh's (generated when missing; a symlink SRC plus SRC.complete reuses a tree).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SCALE="${SCALE:-0.2}"; SEED="${SEED:-1}"; ROUNDS="${ROUNDS:-3}"
WORK="${WORK:-/var/tmp/corral-bench-sync}"; PORT="${PORT:-22987}"
[ "$#" -ge 1 ] || { echo "usage: abcopy.sh NAME=BIN[:ENV=VALUE]..." >&2; exit 2; }
SRC="$WORK/src-$SCALE"; DST="$WORK/dst-ab"
export WORK
mkdir -p "$WORK"
source "$HERE/lib.sh"
ensure_data tree "$SRC"
NFILES=$(find "$SRC/" -type f | wc -l)
trash_init
trap 'stop_sshd; trash_empty' EXIT
start_sshd
corral_ssh_args
now() { date +%s.%N; }
samp() { python3 "$HERE/cpusample.py" "$WORK/cpu-samples.txt" & SP=$!; }
sampend() {
    kill "$SP"; wait "$SP" 2>/dev/null || true
    python3 - "$WORK/cpu-samples.txt" <<'PY'
import re, sys
s = {}
for l in open(sys.argv[1]):
    for k, v in re.findall(r'(master|ssh|sshd|serve)= *([0-9]+)%', l):
        s[k] = s.get(k, 0) + int(v) * 0.005
print('cpu-s ' + ' '.join(f'{k} {s.get(k, 0):.1f}' for k in ('master', 'ssh', 'sshd', 'serve')))
PY
}
check() { local n; n=$(find "$DST" -type f | wc -l); [ "$n" = "$NFILES" ] || echo "  !! $n files of $NFILES"; }
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
    aside "$DST"; mkdir -p "$DST"; drop_caches
    samp; t0=$(now); rsync -a --delete -e "$SSH" "$SRC/" "root@127.0.0.1:$DST/"; t1=$(now)
    printf 'round %s %-10s %6.2f s  %s  load %s\n' "$r" rsync "$(echo "$t1 - $t0" | bc)" "$(sampend)" "$(cut -d' ' -f1 /proc/loadavg)"
    check
    for v in "$@"; do
        name=${v%%=*}; rest=${v#*=}; bin=${rest%%:*}; envs=""
        [ "$rest" != "$bin" ] && envs=${rest#*:}
        aside "$DST"; mkdir -p "$DST"; drop_caches
        export CORRAL_STATE_DIR="$WORK/state-ab"; rm -rf "$CORRAL_STATE_DIR"
        samp; t0=$(now)
        # shellcheck disable=SC2086 # CARGS and envs are word lists
        env $envs /usr/bin/time -f '%U %S' -o "$WORK/time-master" "$bin" sync push --delete --ssh-persist 0 ${CARGS:-} "${CSSH[@]}" \
            --remote-corral "env $envs /usr/bin/time -f '%U %S' -o $WORK/time-serve $bin" \
            "$SRC/" "root@127.0.0.1:$DST/" >/dev/null 2>>"$WORK/abcopy.log"
        t1=$(now)
        # The remote end's /usr/bin/time writes its figures when it exits, just after the
        # master has its report.
        for _ in $(seq 20); do [ -s "$WORK/time-serve" ] && break; sleep 0.1; done
        printf 'round %s %-10s %6.2f s  %s  (time: master+ssh %s serve %s)  load %s\n' "$r" "$name" \
            "$(echo "$t1 - $t0" | bc)" "$(sampend)" "$(cat "$WORK/time-master")" "$(cat "$WORK/time-serve")" "$(cut -d' ' -f1 /proc/loadavg)"
        check
    done
done
rm -rf "$WORK/state-ab"
