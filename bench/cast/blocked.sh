#!/usr/bin/env bash
# Multicast blocked: N receivers on this host whose group traffic a firewall drops (an
# iptables rule on INPUT for the group), so every block comes over TCP catch-up from the
# sender. Prints each binary's wall time (sender start to the last receiver's exit, which
# includes the receivers' 5 s of multicast silence before they turn to TCP), how many
# receivers verified and hold a byte-identical copy, and the sender's CPU seconds. There is
# no peer figure: udp-receiver has no unicast fallback.
#
#   N=8 MB=256 KIND=text bash bench/cast/blocked.sh /abs/corral-a /abs/corral-b ...
#
# KIND=text (default) is an image of /usr files (compressible: the catch-up server's zstd
# work shows), KIND=rand random bytes. Images and outputs live in /dev/shm/corral-blocked.
# Needs root (iptables); the rule is removed on exit.
set -euo pipefail
N=${N:-8}; KIND=${KIND:-text}; MB=${MB:-256}; ROUNDS=${ROUNDS:-1}
GROUP=239.9.9.9; PORT=9600
D=/dev/shm/corral-blocked; mkdir -p "$D"
[ "$#" -ge 1 ] || { echo "usage: blocked.sh CORRAL_BIN..." >&2; exit 2; }
IMG="$D/img.$KIND.$MB"
if [ ! -f "$IMG" ]; then
    if [ "$KIND" = rand ]; then
        head -c "${MB}M" /dev/urandom > "$IMG"
    else
        find /usr/share /usr/lib -type f -size +4k 2>/dev/null | sort | head -40000 \
            | xargs cat 2>/dev/null | head -c "${MB}M" > "$IMG" || true
    fi
fi
iptables -I INPUT -d "$GROUP" -j DROP
trap 'iptables -D INPUT -d "$GROUP" -j DROP; rm -f "$D"/out.* "$D"/*.part' EXIT
for round in $(seq "$ROUNDS"); do
    for bin in "$@"; do
        rm -f "$D"/out.*
        t0=$(date +%s.%N)
        /usr/bin/time -f '%U %S' -o "$D/sender.time" "$bin" -q cast send "$IMG" --interface 127.0.0.1 \
            --group "$GROUP" --port "$PORT" --min-receivers "$N" --max-wait 30s > "$D/sender.log" 2>&1 &
        sender=$!
        pids=()
        for i in $(seq "$N"); do
            "$bin" -q cast receive --interface 127.0.0.1 --group "$GROUP" --port "$PORT" \
                --sender 127.0.0.1 --output "$D/out.$i" --name "r$i" --idle-timeout 60s \
                > "$D/receiver.$i.log" 2>&1 &
            pids+=($!)
        done
        ok=0
        for p in "${pids[@]}"; do if wait "$p"; then ok=$((ok + 1)); fi; done
        t1=$(date +%s.%N)
        src=0; wait "$sender" || src=$?
        same=0
        for i in $(seq "$N"); do if cmp -s "$D/out.$i" "$IMG"; then same=$((same + 1)); fi; done
        read -r u s < "$D/sender.time"
        printf 'round %s %-20s %s %s MiB: %d/%d verified, %d identical, %6.2f s, sender exit %d, sender CPU %.2f s\n' \
            "$round" "$(basename "$bin")" "$KIND" "$MB" "$ok" "$N" "$same" "$(echo "$t1 - $t0" | bc)" "$src" "$(echo "$u + $s" | bc)"
    done
done
