#!/usr/bin/env bash
# Boot-to-script time: a BIOS (SeaBIOS + QEMU's iPXE ROM) and a UEFI (OVMF PXE -> snponly.efi
# -> iPXE) QEMU client, served first by dnsmasq the classic way (DHCP + TFTP + an iPXE script
# over TFTP) and then by `corral serve` (full DHCP, TFTP, per-machine script over HTTP), in the
# same run, on the same namespaces. Prints both figures and the ratio.
#
#   sudo bench/netboot/run.sh              # needs root, qemu-system-x86, ovmf, ipxe, dnsmasq
#   RUNS=3 sudo bench/netboot/run.sh       # several runs each, median reported
#
# Time is measured from QEMU's start to the moment the script's marker appears on the
# client's serial console (TCG: the firmware dominates; both servers answer in microseconds).
set -euo pipefail

RUNS=${RUNS:-1}
TIMEOUT=${TIMEOUT:-180}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CORRAL=${CORRAL:-}
if [[ -z "$CORRAL" ]]; then
    (cd "$ROOT" && cargo build -q -p corral)
    CORRAL="$ROOT/target/debug/corral"
fi
[[ $(id -u) == 0 ]] || { echo "run as root (network namespaces, taps)"; exit 2; }
for t in qemu-system-x86_64 dnsmasq ip; do command -v $t >/dev/null || { echo "missing $t"; exit 2; }; done

TAG=nbb$$
HUB=$TAG-hub
SRV=$TAG-srv
WORK=$(mktemp -d /tmp/corral-bench-netboot.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$HUB" 2>/dev/null || true
    ip netns del "$SRV" 2>/dev/null || true
    [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$HUB"
ip netns add "$SRV"
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" link set br0 up
ip -n "$HUB" link add vsrv type veth peer name eth0 netns "$SRV"
ip -n "$HUB" link set vsrv master br0 up
ip -n "$SRV" link set lo up
ip -n "$SRV" addr add 10.201.0.1/24 brd + dev eth0
ip -n "$SRV" link set eth0 up

MARK=BENCH-SCRIPT-REACHED
SCRIPT="#!ipxe
echo $MARK \${net0/mac}
"

# dnsmasq the classic way: tags by architecture and user class, script over TFTP.
mkdir -p "$WORK/tftp"
cp /usr/lib/ipxe/undionly.kpxe /usr/lib/ipxe/snponly.efi "$WORK/tftp/"
printf '%s' "$SCRIPT" > "$WORK/tftp/script.ipxe"
start_dnsmasq() {
    ip netns exec "$SRV" dnsmasq --no-daemon --port=0 --conf-file=/dev/null --interface=eth0 \
        --bind-interfaces --no-ping --dhcp-range=10.201.0.100,10.201.0.150,1h \
        --dhcp-leasefile="$WORK/dnsmasq.leases" --enable-tftp --tftp-root="$WORK/tftp" \
        --dhcp-match=set:efi64,option:client-arch,7 --dhcp-match=set:efi64,option:client-arch,9 \
        --dhcp-userclass=set:ipxe,iPXE \
        --dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe \
        --dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi \
        --dhcp-boot=tag:ipxe,script.ipxe >"$WORK/dnsmasq.log" 2>&1 &
    PIDS+=($!)
    echo $!
}

# corral: full DHCP on eth0, the same script as every machine's discovery template.
mkdir -p "$WORK/site/profiles" "$WORK/site/templates" "$WORK/site/boot"
cat > "$WORK/site/site.toml" <<TOML
[server]
interfaces = ["eth0"]
advertise = "10.201.0.1"
[dhcp]
mode = "full"
[[dhcp.network]]
cidr = "10.201.0.0/24"
pool = "10.201.0.100-10.201.0.150"
lease = "1h"
[discovery]
profile = "bench"
enrol = true
TOML
printf '[boot]\nipxe_template = "templates/bench.ipxe"\n' > "$WORK/site/profiles/bench.toml"
printf '%s' "$SCRIPT" > "$WORK/site/templates/bench.ipxe"
start_corral() {
    ip netns exec "$SRV" "$CORRAL" serve --site "$WORK/site" --syslog-port 0 >"$WORK/corral.log" 2>&1 &
    PIDS+=($!)
    echo $!
}

# One client boot; prints seconds from QEMU start to the marker (or "timeout").
boot() { # fw mac tap
    local fw=$1 mac=$2 tap=$3 log="$WORK/$1-$3.serial"
    ip -n "$HUB" tuntap add dev "$tap" mode tap
    ip -n "$HUB" link set "$tap" master br0 up
    rm -f "$log"
    local args=(-accel tcg -nodefaults -vga none -display none -no-reboot -serial "file:$log"
                -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no")
    if [[ $fw == bios ]]; then
        args+=(-m 256 -device sga -boot n -device "e1000,netdev=n0,mac=$mac")
    else
        cp /usr/share/OVMF/OVMF_VARS_4M.fd "$WORK/$tap.vars"
        args+=(-m 512 -machine q35
               -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd
               -drive "if=pflash,format=raw,file=$WORK/$tap.vars"
               -device "virtio-net-pci,netdev=n0,mac=$mac,romfile=")
    fi
    local t0; t0=$(date +%s.%N)
    ip netns exec "$HUB" qemu-system-x86_64 "${args[@]}" >/dev/null 2>&1 &
    local q=$!
    local result=timeout
    while awk -v n="$(date +%s.%N)" -v t="$t0" -v m="$TIMEOUT" 'BEGIN { exit !(n - t < m) }'; do
        if grep -qa "$MARK" "$log" 2>/dev/null; then
            result=$(awk -v n="$(date +%s.%N)" -v t="$t0" 'BEGIN { printf "%.1f", n - t }')
            break
        fi
        sleep 0.1
    done
    kill "$q" 2>/dev/null || true; wait "$q" 2>/dev/null || true
    ip -n "$HUB" link del "$tap" 2>/dev/null || true
    echo "$result"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }

declare -A R
n=0
for server in dnsmasq corral; do
    if [[ $server == dnsmasq ]]; then pid=$(start_dnsmasq); else pid=$(start_corral); fi
    sleep 1
    for fw in bios uefi; do
        vals=()
        for ((r = 0; r < RUNS; r++)); do
            n=$((n + 1))
            mac=$(printf '52:54:00:be:%02x:%02x' $((n / 256)) $((n % 256)))
            v=$(boot "$fw" "$mac" "tb$n")
            echo "  $server $fw run $((r + 1)): ${v} s" >&2
            vals+=("$v")
        done
        R[$server-$fw]=$(printf '%s\n' "${vals[@]}" | median)
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
done

echo
echo "boot to iPXE script (QEMU TCG, median of $RUNS), same run:"
printf '%-6s %10s %10s %8s\n' client dnsmasq corral ratio
for fw in bios uefi; do
    d=${R[dnsmasq-$fw]} c=${R[corral-$fw]}
    ratio=$(awk -v c="$c" -v d="$d" 'BEGIN { if (d + 0 > 0 && c + 0 > 0) printf "%.2f", c / d; else print "n/a" }')
    printf '%-6s %9ss %9ss %8s\n' "$fw" "$d" "$c" "${ratio}x"
done
echo "(ratio = corral / dnsmasq; below 1.00 means corral was faster)"
