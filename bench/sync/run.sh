#!/usr/bin/env bash
# corral sync benchmark: rsync and corral over ssh to localhost on the same generated data, in
# the same run. Prints each figure, the peer's figure and the ratio (corral / rsync).
#
#   SCALE=0.1 bench/sync/run.sh          # quick run (5,000 files, ~330 MB, 100 MiB image)
#   SCALE=1   bench/sync/run.sh          # the issue's size (50,000 files, ~3.3 GB, 1 GiB image)
#
# Environment: SCALE (default 0.1), WORK (default /var/tmp/corral-bench-sync), PORT (sshd port,
# default 22987), CORRAL (the corral binary; default target/release/corral, built if missing),
# SEED (default 1), SKIP_CORRAL=1 (rsync only), SERVER_BASHRC (stock: the sshd sees Debian's
# stock root .bashrc, the default; host: this machine's), FULL_ROUNDS (full copies of each
# tool, default 3), NC_ROUNDS (rounds of no-change syncs, default 6), CH_ROUNDS (rounds of
# 1 %-changed syncs, default 3). Needs root (drop_caches, sshd, iptables).
#
# What is measured:
#   full copy            a new, empty destination directory, caches dropped first;
#                        FULL_ROUNDS copies by each tool, interleaved (rsync first in odd
#                        rounds, corral in even ones: on this kind of machine the first of a
#                        pair tends to be faster), the median of each. Nothing is deleted
#                        before or between the copies (earlier copies and the last run's are
#                        moved aside and deleted when the run ends): on an ext4 without a
#                        journal, as these machines' root, the inode allocator skips every
#                        inode deleted in the last 5 minutes, one by one, so a copy made right
#                        after deleting the previous one (50,000 files) paid for that deletion
#   no-change warm/cold  a sync with nothing changed; cold = caches dropped first; NC_ROUNDS
#                        rounds (default 6) of a warm and a cold run of both tools, in pairs
#                        (rsync first in odd rounds), the median of each
#   content check        rsync -a -c -n vs corral's content-verified check (drift), warm/cold
#   1% changed           64 bytes edited in 1% of the files: time and bytes on the wire
#                        (iptables byte counters on the sshd port, both directions); CH_ROUNDS
#                        rounds (default 3), in pairs, everything written before flushed
#                        first, the median of each
#   image                1 GiB image (scaled): its first copy (caches dropped, corral without
#                        state), then 32 KiB changed in 8 places: bytes written by the
#                        receiving side (rusage of the remote process, iowrap.py)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SCALE="${SCALE:-0.1}"
SEED="${SEED:-1}"
WORK="${WORK:-/var/tmp/corral-bench-sync}"
PORT="${PORT:-22987}"
CORRAL="${CORRAL:-$REPO/target/release/corral}"
CHAIN="CORRAL_BENCH_$PORT"

[ "$(id -u)" -eq 0 ] || { echo "run.sh: needs root (drop_caches, sshd, iptables)" >&2; exit 2; }
mkdir -p "$WORK"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
SRC="$WORK/src-$SCALE"
IMG="$WORK/img-$SCALE"

log() { echo "== $*" >&2; }

# ---- data -----------------------------------------------------------------------------------
source "$HERE/lib.sh"
# The 1 % and image steps edit the data in place and put it back (gen.py undo); a
# run interrupted before that leaves the undo records, applied here.
# (Data not marked complete is generated again anyway: its undo record is dropped.)
for d in "$SRC" "$IMG"; do
    if [ -e "$d.undo" ]; then
        if [ -e "$d.complete" ]; then python3 "$HERE/gen.py" undo "$d.undo"; else rm -f "$d.undo"; fi
    fi
done
ensure_data tree "$SRC"
ensure_data image "$IMG"
NFILES=$(find "$SRC" -type f | wc -l)
NBYTES=$(du -sb "$SRC" | cut -f1)
IMGBYTES=$(stat -c %s "$IMG/image.img")

# ---- sshd on loopback with throwaway keys (lib.sh) ---------------------------------------------
# Old copies go aside (lib.sh) and are deleted when the run ends, not before a copy.
trash_init
cleanup() {
    stop_sshd
    iptables -D INPUT -i lo -p tcp -j "$CHAIN" 2>/dev/null || true
    iptables -F "$CHAIN" 2>/dev/null || true
    iptables -X "$CHAIN" 2>/dev/null || true
    trash_empty
}
trap cleanup EXIT
start_sshd

# Byte counters for traffic to and from the sshd port (this chain only).
iptables -N "$CHAIN" 2>/dev/null || iptables -F "$CHAIN"
iptables -D INPUT -i lo -p tcp -j "$CHAIN" 2>/dev/null || true
iptables -I INPUT -i lo -p tcp -j "$CHAIN"
iptables -A "$CHAIN" -p tcp --dport "$PORT" -j RETURN
iptables -A "$CHAIN" -p tcp --sport "$PORT" -j RETURN
wire_zero() { iptables -Z "$CHAIN"; }
wire_bytes() { iptables -L "$CHAIN" -n -v -x | awk -v p="$PORT" '$0 ~ "pt:" p {s += $2} END {print s + 0}'; }

# ---- helpers --------------------------------------------------------------------------------
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
declare -A R C
# timed NAME CMD...: run, store seconds in TIMED
timed() { local t0 t1; t0=$(now); "$@"; t1=$(now); TIMED=$(elapsed "$t0" "$t1"); }
# median VALUE...: the median (the lower middle one of an even count)
median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
# median3 CMD...: three runs, the median seconds in TIMED (warm figures on a loaded machine)
median3() {
    local a b c
    timed "$@"; a=$TIMED; timed "$@"; b=$TIMED; timed "$@"; c=$TIMED
    TIMED=$(median "$a" "$b" "$c")
}
# pair ROUND RSYNC_STEP CORRAL_STEP: one step of each tool, rsync first in odd rounds and
# corral in even ones (rsync's alone without corral)
pair() {
    if [ "$HAVE_C" != 1 ]; then $2
    elif (($1 % 2)); then $2; $3
    else $3; $2
    fi
}

rsync_push() { rsync -a --delete -e "$SSH" "$@"; }
# The floor under every figure over ssh: connection, key exchange, authentication, a command.
median3 $SSH root@127.0.0.1 true; SSH_START=$TIMED

HAVE_CORRAL=0
if [ "${SKIP_CORRAL:-0}" != 1 ]; then
    if [ ! -x "$CORRAL" ]; then
        log "building corral (release)"
        (cd "$REPO" && cargo build --release -p corral >&2) || true
    fi
    if [ -x "$CORRAL" ] && "$CORRAL" sync push --help >/dev/null 2>&1; then
        HAVE_CORRAL=1
    else
        log "corral sync push is not available in $CORRAL: measuring rsync only"
    fi
fi
# corral over the same ssh (same options, same key); the remote end runs this same binary.
# Its master-side state (hash cache, ssh control socket) lives in $WORK/state, emptied before
# the full copy: a first sync of a tree corral has not seen, as rsync's is.
export CORRAL_STATE_DIR="$WORK/state"
corral_ssh_args
corral_push() { "$CORRAL" sync push --delete "${CSSH[@]}" --remote-corral "$CORRAL" "$@" >/dev/null 2>>"$WORK/corral.log"; }
# The content-verified check is `corral drift` on a tree whose one child is the copy.
SITE="$WORK/site"
mkdir -p "$SITE/trees"
cat > "$SITE/trees/bench.toml" <<TOML
source = "$SRC"
[ssh]
args = ["-p", "$PORT", "-i", "$SSHDIR/client_key", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
remote_corral = "$CORRAL"
[[child]]
name = "copy"
host = "root@127.0.0.1"
dest = "$WORK/dst-corral"
TOML
corral_drift() { "$CORRAL" drift bench --all --site "$SITE" >/dev/null 2>>"$WORK/corral.log"; }

DR="$WORK/dst-rsync"
DC="$WORK/dst-corral"

HAVE_C=$HAVE_CORRAL

# ---- full copies, interleaved ---------------------------------------------------------------
# Each copy into a directory of its own, never used before; the last round's copy is the one
# the later figures use (the earlier ones are moved aside).
aside "$DR" "$DC"
full_rsync() { aside "$DR"; mkdir -p "$DR"; drop_caches; timed rsync_push "$SRC/" "root@127.0.0.1:$DR/"; FULL_R+=("$TIMED"); }
# A first sync of a tree corral has not seen, as rsync's is: no master-side state.
full_corral() { aside "$DC"; rm -rf "$CORRAL_STATE_DIR"; mkdir -p "$DC"; drop_caches; timed corral_push "$SRC/" "root@127.0.0.1:$DC/"; FULL_C+=("$TIMED"); }
FULL_ROUNDS="${FULL_ROUNDS:-3}"
FULL_R=(); FULL_C=()
for ((round = 1; round <= FULL_ROUNDS; round++)); do
    log "full copy, round $round of $FULL_ROUNDS"
    pair "$round" full_rsync full_corral
done
R[full]=$(median "${FULL_R[@]}")
[ "$HAVE_C" = 1 ] && C[full]=$(median "${FULL_C[@]}")
# The copies' data is still being written back: flushed now, so that the figures below do
# not share the disk and the CPU with that writeback.
sync

# ---- no-change syncs, interleaved ------------------------------------------------------------
# NC_ROUNDS rounds (default 6), each a warm run of both tools and then a cold run of both
# (caches dropped before each), rsync first in odd rounds and corral first in even ones; the
# median of each (the lower middle one: each tool comes first in as many rounds). In pairs,
# both tools are timed in the same state of the machine: the cold figures of one binary
# moved by a third within an hour on these guests (RESULTS.md).
# Each run starts a second after the one before has returned (its remote end and its ssh
# connection may still be ending).
settle() { sleep 1; [ "$1" = cold ] && drop_caches; return 0; }
nochange_rsync() {
    settle "$1"; timed rsync_push "$SRC/" "root@127.0.0.1:$DR/"
    if [ "$1" = warm ]; then NC_RW+=("$TIMED"); else NC_RC+=("$TIMED"); fi
}
nochange_corral() {
    settle "$1"; timed corral_push "$SRC/" "root@127.0.0.1:$DC/"
    if [ "$1" = warm ]; then NC_CW+=("$TIMED"); else NC_CC+=("$TIMED"); fi
}
NC_ROUNDS="${NC_ROUNDS:-6}"
NC_RW=(); NC_RC=(); NC_CW=(); NC_CC=()
for ((round = 1; round <= NC_ROUNDS; round++)); do
    log "no-change sync, round $round of $NC_ROUNDS"
    # Warm means every tree in the caches: the other tool's cold run dropped this one's
    # destination (a "warm" run after it was half cold, and 0.1-0.5 s slower).
    rsync_push "$SRC/" "root@127.0.0.1:$DR/"
    [ "$HAVE_C" = 1 ] && corral_push "$SRC/" "root@127.0.0.1:$DC/"
    for mode in warm cold; do
        pair "$round" "nochange_rsync $mode" "nochange_corral $mode"
    done
done
R[nochange_warm]=$(median "${NC_RW[@]}"); R[nochange_cold]=$(median "${NC_RC[@]}")
if [ "$HAVE_C" = 1 ]; then
    C[nochange_warm]=$(median "${NC_CW[@]}"); C[nochange_cold]=$(median "${NC_CC[@]}")
fi

# ---- content checks -------------------------------------------------------------------------
log "rsync: content check"
timed rsync_push -c -n "$SRC/" "root@127.0.0.1:$DR/"
median3 rsync_push -c -n "$SRC/" "root@127.0.0.1:$DR/"; R[check_warm]=$TIMED
drop_caches
timed rsync_push -c -n "$SRC/" "root@127.0.0.1:$DR/"; R[check_cold]=$TIMED

# For reference: rsync with the ssh connection kept between runs, as corral does by default
# (corral: ControlMaster/ControlPersist 60 s; rsync: the same options passed in -e).
log "rsync with a kept ssh connection: no-change sync"
RSSH_MUX="$SSH -oControlMaster=auto -oControlPath=$SSHDIR/rsync-ctl-%C -oControlPersist=60s"
rsync -a --delete -e "$RSSH_MUX" "$SRC/" "root@127.0.0.1:$DR/"
median3 rsync -a --delete -e "$RSSH_MUX" "$SRC/" "root@127.0.0.1:$DR/"; R[nochange_warm_mux]=$TIMED
$SSH -oControlPath="$SSHDIR/rsync-ctl-%C" -O exit root@127.0.0.1 2>/dev/null || true

if [ "$HAVE_C" = 1 ]; then
    log "corral: content check"
    timed corral_drift
    median3 corral_drift; C[check_warm]=$TIMED
    drop_caches
    timed corral_drift; C[check_cold]=$TIMED
fi

# ---- 1% changed, interleaved -----------------------------------------------------------------
# CH_ROUNDS rounds (default 3): the same files edited the same way (gen.py change, same seed),
# a timed sync by each tool (rsync first in odd rounds), then the edits undone and both copies
# synced back, untimed. Everything written before (the edits, the other tool's copy) is
# flushed before each timed sync: these copies share one file system, and the receiver's
# syncfs before its renames would otherwise write back the other tool's files too.
CH_ROUNDS="${CH_ROUNDS:-3}"
CH_R=(); CH_C=(); CH_RW=(); CH_CW=()
change_rsync() {
    sync; sleep 1; wire_zero
    timed rsync_push --stats "$SRC/" "root@127.0.0.1:$DR/" > "$WORK/rsync-stats.txt"
    CH_R+=("$TIMED"); CH_RW+=("$(wire_bytes)")
}
change_corral() {
    sync; sleep 1; wire_zero
    timed corral_push "$SRC/" "root@127.0.0.1:$DC/"
    CH_C+=("$TIMED"); CH_CW+=("$(wire_bytes)")
}
# Both trees warm (the content checks dropped the caches; later rounds follow the syncs back).
rsync_push "$SRC/" "root@127.0.0.1:$DR/"
[ "$HAVE_C" = 1 ] && corral_push "$SRC/" "root@127.0.0.1:$DC/"
for ((round = 1; round <= CH_ROUNDS; round++)); do
    log "1% of files changed, round $round of $CH_ROUNDS"
    python3 "$HERE/gen.py" change "$SRC" --seed "$SEED" --percent 1 --undo "$SRC.undo"
    pair "$round" change_rsync change_corral
    python3 "$HERE/gen.py" undo "$SRC.undo"
    rsync_push "$SRC/" "root@127.0.0.1:$DR/"
    [ "$HAVE_C" = 1 ] && corral_push "$SRC/" "root@127.0.0.1:$DC/"
done
R[change_time]=$(median "${CH_R[@]}"); R[change_wire]=$(median "${CH_RW[@]}")
R[change_sent]=$(awk -F': ' '/^Total bytes sent/ {gsub(",", "", $2); print $2}' "$WORK/rsync-stats.txt")
if [ "$HAVE_C" = 1 ]; then
    C[change_time]=$(median "${CH_C[@]}"); C[change_wire]=$(median "${CH_CW[@]}")
fi

# ---- image with 32 KiB changed --------------------------------------------------------------
log "image: first copy"
for d in "$DR-img" "$DC-img"; do aside "$d"; mkdir -p "$d"; done
# Timed, caches dropped first; corral with a state directory of its own, empty (no hash
# cache of the image, no ssh connection to share), as rsync starts.
drop_caches; timed rsync_push "$IMG/" "root@127.0.0.1:$DR-img/"; R[img_full]=$TIMED
if [ "$HAVE_C" = 1 ]; then
    rm -rf "$WORK/state-img"; drop_caches
    CORRAL_STATE_DIR="$WORK/state-img" timed corral_push "$IMG/" "root@127.0.0.1:$DC-img/"
    C[img_full]=$TIMED; rm -rf "$WORK/state-img"
fi
python3 "$HERE/gen.py" image-edit "$IMG/image.img" --seed "$SEED" --undo "$IMG.undo"
log "image: 32 KiB changed"
wire_zero
timed rsync_push --rsync-path="python3 $HERE/iowrap.py $WORK/io-rsync rsync" "$IMG/" "root@127.0.0.1:$DR-img/"
R[img_time]=$TIMED; R[img_written]=$(cat "$WORK/io-rsync"); R[img_wire]=$(wire_bytes)
if [ "$HAVE_C" = 1 ]; then
    wire_zero
    timed "$CORRAL" sync push --delete "${CSSH[@]}" --remote-corral "python3 $HERE/iowrap.py $WORK/io-corral $CORRAL" "$IMG/" "root@127.0.0.1:$DC-img/" >/dev/null 2>>"$WORK/corral.log"
    C[img_time]=$TIMED; C[img_written]=$(cat "$WORK/io-corral"); C[img_wire]=$(wire_bytes)
fi
cmp "$IMG/image.img" "$DR-img/image.img"
if [ "$HAVE_C" = 1 ]; then cmp "$IMG/image.img" "$DC-img/image.img"; fi
if [ "$HAVE_C" = 1 ]; then
    # Every byte checked: the corral copy equals the source (rsync -c finds nothing to do).
    left=$(rsync -a -c -n -i "$SRC/" "$DC/" | { grep -v '^\.d' || true; } | wc -l)
    [ "$left" -eq 0 ] || { echo "corral copy differs from the source in $left entries" >&2; exit 1; }
fi

# The image as generated again, for the next run (the tree was put back after each round).
python3 "$HERE/gen.py" undo "$IMG.undo"

# ---- report ---------------------------------------------------------------------------------
echo
echo "corral sync benchmark: SCALE=$SCALE seed=$SEED: $NFILES files, $NBYTES bytes, image $IMGBYTES bytes"
echo "rsync $(rsync --version | head -1 | awk '{print $3}'), ssh to 127.0.0.1:$PORT, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "load average at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "ssh start (ssh HOST true, median of 3): $SSH_START s (server .bashrc: $SERVER_BASHRC)"
echo "full copies (s), in round order: rsync ${FULL_R[*]}; corral ${FULL_C[*]:--}"
echo "no-change warm (s), in round order: rsync ${NC_RW[*]}; corral ${NC_CW[*]:--}"
echo "no-change cold (s), in round order: rsync ${NC_RC[*]}; corral ${NC_CC[*]:--}"
echo "1% changed (s), in round order: rsync ${CH_R[*]}; corral ${CH_C[*]:--}"
printf '%-32s %14s %14s %8s  %s\n' "figure" "rsync" "corral" "ratio" "target"
row() { # key label unit target
    local r="${R[$1]:-}" c="${C[$1]:-}" ratio="-"
    if [ -n "$r" ] && [ -n "$c" ]; then
        ratio=$(python3 -c "import sys; r,c=float(sys.argv[1]),float(sys.argv[2]); print(f'{c/r:.2f}' if r else '-')" "$r" "$c")
    fi
    printf '%-32s %14s %14s %8s  %s\n' "$2 ($3)" "${r:--}" "${c:--}" "$ratio" "$4"
}
row full "full copy" s "<= 0.6"
row nochange_warm "no-change sync, warm" s "<= 0.4"
row nochange_cold "no-change sync, cold" s "<= 0.4"
R[nochange_warm_ref]=${R[nochange_warm_mux]:-}; C[nochange_warm_ref]=${C[nochange_warm]:-}
row nochange_warm_ref "  same, rsync -e with ControlPersist" s "(reference)"
row check_warm "content check, warm" s "<= 0.15"
row check_cold "content check, cold" s "<= 0.15"
row change_time "1% changed" s "<= 0.5"
row change_wire "1% changed, on the wire" B "<= 0.5"
row change_sent "1% changed, rsync --stats sent" B ""
row img_full "image, first copy" s ""
row img_time "image 32 KiB changed" s ""
row img_wire "image, on the wire" B ""
row img_written "image, written on the child" B "<= 2 MiB"
