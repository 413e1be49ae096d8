# Shared by bench/sync/run.sh, fullcopy.sh and fixed.sh (sourced, not run): the generated data
# and the loopback sshd with throwaway keys that rsync and corral both go through.
#
# Expects WORK, PORT, SEED, SCALE and HERE (this directory) to be set by the caller.

# ensure_data KIND DIR: gen.py's `tree` or `image` into DIR, once (DIR.complete marks it done).
ensure_data() {
    local kind=$1 dir=$2
    [ -e "$dir.complete" ] && return 0
    echo "== generating $kind (scale $SCALE, seed $SEED) in $dir" >&2
    rm -rf "$dir"
    python3 "$HERE/gen.py" "$kind" "$dir" --seed "$SEED" --scale "$SCALE"
    touch "$dir.complete"
}

# start_sshd: an sshd on 127.0.0.1:$PORT with keys in $WORK/ssh; sets SSHDIR, SSHD_PID, SSH
# (the client command line) and SERVER_BASHRC, and waits until a session works.
#
# sshd runs every command through root's login shell, and bash reads ~/.bashrc even for the
# non-interactive commands sshd runs. This machine's /root/.bashrc runs `pyenv init` (about
# 100 processes, 0.15-0.2 s per session), which no server being synced would: by default the
# bench's sshd sees Debian's stock root .bashrc (/usr/share/base-files/dot.bashrc, comments
# only) bind-mounted in a mount namespace of its own. Both tools go through this same sshd.
# SERVER_BASHRC=host keeps the host's file.
start_sshd() {
    SSHDIR="$WORK/ssh"
    mkdir -p "$SSHDIR" /run/sshd
    [ -e "$SSHDIR/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSHDIR/host_key"
    [ -e "$SSHDIR/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSHDIR/client_key"
    cp "$SSHDIR/client_key.pub" "$SSHDIR/authorized_keys"
    cat > "$SSHDIR/sshd_config" <<CFG
Port $PORT
ListenAddress 127.0.0.1
HostKey $SSHDIR/host_key
AuthorizedKeysFile $SSHDIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $SSHDIR/sshd.pid
CFG
    SERVER_BASHRC="${SERVER_BASHRC:-stock}"
    local stock=/usr/share/base-files/dot.bashrc
    if [ "$SERVER_BASHRC" = stock ] && [ -e "$stock" ] && [ -e /root/.bashrc ]; then
        unshare -m --propagation private sh -c \
            "mount --bind $stock /root/.bashrc && exec /usr/sbin/sshd -f $SSHDIR/sshd_config -D -e" \
            2>"$SSHDIR/sshd.log" &
    else
        SERVER_BASHRC=host
        /usr/sbin/sshd -f "$SSHDIR/sshd_config" -D -e 2>"$SSHDIR/sshd.log" &
    fi
    SSHD_PID=$!
    SSH="ssh -p $PORT -i $SSHDIR/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
    local _
    for _ in $(seq 50); do $SSH root@127.0.0.1 true 2>/dev/null && break; sleep 0.1; done
    $SSH root@127.0.0.1 true
}

# stop_sshd: closes corral's kept ssh connection to this sshd (ControlPersist), then the sshd.
stop_sshd() {
    if [ -n "${SSH:-}" ]; then
        $SSH -oControlPath="${CORRAL_STATE_DIR:-/var/lib/corral}/ssh/%C" -O exit root@127.0.0.1 2>/dev/null || true
    fi
    if [ -n "${SSHD_PID:-}" ]; then kill "$SSHD_PID" 2>/dev/null || true; fi
}

# corral's --ssh-arg list for this sshd.
corral_ssh_args() {
    CSSH=(--ssh-arg=-p "--ssh-arg=$PORT" --ssh-arg=-i "--ssh-arg=$SSHDIR/client_key"
          --ssh-arg=-o --ssh-arg=StrictHostKeyChecking=no --ssh-arg=-o
          --ssh-arg=UserKnownHostsFile=/dev/null --ssh-arg=-o --ssh-arg=LogLevel=ERROR)
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# Old copies are renamed into $TRASH (one directory per run, trash_init) and deleted when the
# run ends (trash_empty), never right before a copy: on an ext4 without a journal (this kind
# of machine's root) the inode allocator skips, one by one, every inode freed in the last
# 5 minutes, so a copy made right after deleting the previous one (50,000 files) pays for
# that deletion. Each copy kept aside holds the tree's bytes until then.
trash_init() { TRASH="$WORK/trash.$$"; mkdir -p "$TRASH"; }
aside() { local d; for d in "$@"; do [ -e "$d" ] && mv "$d" "$TRASH/$(basename "$d").$RANDOM"; done; return 0; }
trash_empty() { [ -n "${TRASH:-}" ] && rm -rf "$TRASH"; return 0; }
