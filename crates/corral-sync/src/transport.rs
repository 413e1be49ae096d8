//! Transports: a local directory (the receiver runs in a thread of this process) and the
//! system `ssh` running `corral sync serve --stdio --root DIR` on the far end.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::SyncError;
use crate::proto::Framed;
use crate::session::{ServeOptions, serve};

/// Where the child tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A directory on this machine.
    Local(PathBuf),
    /// `host:path` over ssh.
    Ssh {
        /// Host (may include `user@`).
        host: String,
        /// Path on the host.
        path: String,
    },
}

impl Dest {
    /// Parses `host:path` (a `:` before any `/`) or a local path.
    pub fn parse(s: &str) -> Dest {
        match s.find(':') {
            Some(i) if !s[..i].contains('/') && i > 0 => Dest::Ssh {
                host: s[..i].to_string(),
                path: if s[i + 1..].is_empty() {
                    ".".into()
                } else {
                    s[i + 1..].to_string()
                },
            },
            _ => Dest::Local(PathBuf::from(s)),
        }
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Local(p) => write!(f, "{}", p.display()),
            Dest::Ssh { host, path } => write!(f, "{host}:{path}"),
        }
    }
}

/// How long an idle ssh connection is kept for the next run unless told otherwise (OpenSSH
/// `ControlMaster`/`ControlPersist`, the way Ansible keeps its connections): a run over a kept
/// connection skips the TCP, key exchange and authentication round trips, which on loopback
/// here cost 0.46 s of a 0.72 s no-change run, and more over a WAN.
pub const DEFAULT_SSH_PERSIST: std::time::Duration = std::time::Duration::from_secs(60);

/// The ciphers offered to the ssh server, best first, when the user chose none: AES-GCM
/// before OpenSSH's default first choice chacha20-poly1305 where this CPU has AES
/// instructions (there AES-GCM costs a fraction of chacha20's CPU, which matters because a
/// full copy is CPU-bound on ssh and sshd encrypting), then the rest of OpenSSH's default list
/// so that a server without AES-GCM still connects. The server's CPU is not known here; every
/// x86-64 and arm64 server CPU of the last decade has AES instructions.
pub const PREFERRED_CIPHERS: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// Whether this CPU has AES instructions (the case where [`PREFERRED_CIPHERS`] pays).
fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// How to reach a remote receiver.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    /// The ssh program (default `ssh`).
    pub program: Option<String>,
    /// Extra arguments before the host (`-p`, `-i`, `-o ...`).
    pub args: Vec<String>,
    /// The command run remotely (default `corral`); `sync serve --stdio --root PATH` follows.
    pub remote_corral: Option<String>,
    /// The receiver's state directory on the child (`--state-dir DIR` of its
    /// `corral sync serve`; `None`: the child's default). The child's own layout: never the
    /// master's `CORRAL_STATE_DIR` (ssh passes no environment anyway). A forced command in
    /// the child's `authorized_keys` replaces the whole command line, this option included.
    pub remote_state_dir: Option<String>,
    /// Keep the connection open this long after the run, for the next run to the same host
    /// (`None` or zero: a new connection every run). Not applied when `args` set
    /// `ControlMaster` or `ControlPath` themselves, or when no private control directory
    /// (`$CORRAL_STATE_DIR/ssh`, mode 0700, ours) can be had.
    pub persist: Option<std::time::Duration>,
}

/// The private directory for ssh control sockets: `$CORRAL_STATE_DIR/ssh` (default
/// `/var/lib/corral/ssh`), created mode 0700. `None` when it cannot be created, is not ours,
/// is open to others, or its path is too long for a socket address (ssh appends a 40-character
/// `%C` hash and, while creating, a 17-character suffix; `sun_path` holds 107 bytes).
fn control_dir(state: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = state.join("ssh");
    if dir.as_os_str().len() + 1 + 40 + 17 > 107 {
        return None;
    }
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    let m = std::fs::symlink_metadata(&dir).ok()?;
    (m.is_dir() && m.uid() == rustix::process::geteuid().as_raw() && m.mode() & 0o077 == 0)
        .then_some(dir)
}

/// Whether `args` already set the ssh option `name` (`-oName=...`, `-o Name=...`, any case).
fn sets_option(args: &[String], name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    args.iter().any(|a| {
        let a = a.trim_start_matches("-o").trim_start().to_ascii_lowercase();
        a.starts_with(&name)
    })
}

/// The ssh command that runs `remote` on `host` with these options: the user's arguments,
/// connection sharing when [`SshOptions::persist`] asks for it, AES-GCM first in the cipher
/// list ([`PREFERRED_CIPHERS`]) on a CPU with AES instructions unless the arguments choose
/// ciphers (`-c`, `-oCiphers`), batch mode (never a password prompt in the middle of a run).
/// A `Ciphers` line in the user's ssh_config is overridden by the command line; choose
/// ciphers with an ssh argument instead.
pub fn ssh_command(ssh: &SshOptions, host: &str, remote: &str) -> Command {
    ssh_command_in(ssh, host, remote, &crate::scan::default_state_dir())
}

/// [`ssh_command`] with the state directory given.
fn ssh_command_in(ssh: &SshOptions, host: &str, remote: &str, state: &Path) -> Command {
    let prog = ssh.program.clone().unwrap_or_else(|| "ssh".into());
    let mut cmd = Command::new(prog);
    cmd.args(&ssh.args);
    if let Some(p) = ssh.persist.filter(|d| !d.is_zero())
        && !sets_option(&ssh.args, "ControlMaster")
        && !sets_option(&ssh.args, "ControlPath")
        && let Some(dir) = control_dir(state)
    {
        cmd.arg("-oControlMaster=auto")
            .arg(format!("-oControlPath={}/%C", dir.display()))
            .arg(format!("-oControlPersist={}s", p.as_secs().max(1)));
    }
    if cpu_has_aes() && !sets_cipher(&ssh.args) {
        cmd.arg(format!("-oCiphers={PREFERRED_CIPHERS}"));
    }
    cmd.arg("-oBatchMode=yes").arg("--").arg(host).arg(remote);
    cmd
}

/// Whether `args` choose the ciphers themselves: `-oCiphers=...`, or `-c` alone or in a
/// cluster of flags (`-c LIST`, `-cLIST`, `-4c LIST`), not a letter c inside the value of an
/// option that takes one (`-i/home/c/key`).
fn sets_cipher(args: &[String]) -> bool {
    const TAKES_VALUE: &str = "BbDEeFIiJLlmOopQRSWw";
    sets_option(args, "Ciphers")
        || args.iter().any(|a| {
            let Some(flags) = a.strip_prefix('-').filter(|f| !f.starts_with('-')) else {
                return false;
            };
            for c in flags.chars() {
                if c == 'c' {
                    return true;
                }
                if TAKES_VALUE.contains(c) {
                    return false;
                }
            }
            false
        })
}

/// The stream type of every transport.
pub type Stream = Framed<Box<dyn Read + Send>, Box<dyn Write + Send>>;

/// An open conversation with a receiver.
pub struct Connection {
    /// The framed stream.
    pub framed: Stream,
    local: Option<(UnixStream, std::thread::JoinHandle<Result<(), SyncError>>)>,
    child: Option<Child>,
}

/// `s` as one word of a POSIX shell command line: unchanged when made only of characters the
/// shell leaves alone, else single-quoted (for remote command lines run through ssh).
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Capacity of the master's buffered writer to ssh. A `Data` payload at least this large
/// bypasses the buffer and goes to the pipe straight from the reader thread's buffer (a
/// 1 MiB buffer copied every payload once more: 3.3 GB of `memmove` in a full copy of the
/// benchmark tree); smaller frames are gathered into one write.
pub const SEND_BUFFER: usize = 64 << 10;

/// What [`widen_pipe`] asks for: with Linux's default 64 KiB pipes a writer wakes its reader
/// (ssh, or the receiver behind sshd) every 64 KiB and blocks until it drains.
pub const PIPE_SIZE: usize = 1 << 20;

/// Makes the pipe `fd` (either end) hold [`PIPE_SIZE`] bytes where the kernel allows it
/// (`/proc/sys/fs/pipe-max-size`, the user's pipe page quota); anything else (a socket, a
/// terminal, a refusal) keeps what it has: only the number of wake-ups depends on it. The
/// environment variable `CORRAL_SYNC_PIPE_SIZE` (bytes; 0 leaves pipes alone) overrides the
/// size, for benchmarks.
pub fn widen_pipe(fd: impl std::os::fd::AsFd) {
    let size = std::env::var("CORRAL_SYNC_PIPE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PIPE_SIZE);
    if size == 0 {
        return;
    }
    if let Err(e) = rustix::pipe::fcntl_setpipe_size(fd, size) {
        tracing::debug!(error = %e, "pipe size left as it was");
    }
}

/// Capacity of the receiver's buffered reader of the stream. `read_to_end` asks for a
/// chunk's payload in reads of growing size; a read at least this large, with the buffer
/// drained, goes from the pipe straight into the chunk's buffer (a 1 MiB buffer served every
/// payload byte by one more copy).
pub const RECV_BUFFER: usize = 64 << 10;

/// The remote command line for a receiver rooted at `path`, keeping its state (hash cache)
/// in `state_dir` when given.
pub fn remote_command(corral: &str, path: &str, state_dir: Option<&str>) -> String {
    let mut c = format!("{corral} sync serve --stdio --root {}", sh_quote(path));
    if let Some(d) = state_dir {
        c.push_str(" --state-dir ");
        c.push_str(&sh_quote(d));
    }
    c
}

/// Opens a conversation with the receiver of `dest`.
pub fn connect(
    dest: &Dest,
    ssh: &SshOptions,
    serve_opts: ServeOptions,
) -> Result<Connection, SyncError> {
    match dest {
        Dest::Local(p) => {
            let (a, b) = UnixStream::pair().map_err(|e| SyncError::fs("socketpair", p, e))?;
            let root = p.clone();
            let b2 = b
                .try_clone()
                .map_err(|e| SyncError::fs("socketpair", p, e))?;
            let thread = std::thread::spawn(move || {
                let mut f = Framed::new(
                    BufReader::with_capacity(RECV_BUFFER, b),
                    BufWriter::with_capacity(1 << 20, b2),
                );
                serve(&root, &mut f, &serve_opts)
            });
            let a2 = a
                .try_clone()
                .map_err(|e| SyncError::fs("socketpair", p, e))?;
            let a3 = a
                .try_clone()
                .map_err(|e| SyncError::fs("socketpair", p, e))?;
            Ok(Connection {
                framed: Framed::new(
                    Box::new(BufReader::with_capacity(1 << 20, a)),
                    Box::new(BufWriter::with_capacity(SEND_BUFFER, a2)),
                ),
                local: Some((a3, thread)),
                child: None,
            })
        }
        Dest::Ssh { host, path } => {
            let prog = ssh.program.clone().unwrap_or_else(|| "ssh".into());
            let corral = ssh.remote_corral.clone().unwrap_or_else(|| "corral".into());
            let remote = remote_command(&corral, path, ssh.remote_state_dir.as_deref());
            let mut cmd = ssh_command(ssh, host, &remote);
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().map_err(|e| SyncError::Spawn {
                cmd: prog.clone(),
                source: e,
            })?;
            let (Some(out), Some(inp)) = (child.stdout.take(), child.stdin.take()) else {
                return Err(SyncError::Remote("ssh has no pipes".into()));
            };
            widen_pipe(&inp);
            widen_pipe(&out);
            Ok(Connection {
                framed: Framed::new(
                    Box::new(BufReader::with_capacity(1 << 20, out)),
                    Box::new(BufWriter::with_capacity(SEND_BUFFER, inp)),
                ),
                local: None,
                child: Some(child),
            })
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("local", &self.local.is_some())
            .field("child", &self.child)
            .finish()
    }
}

impl Connection {
    /// Closes the conversation and reaps the receiver; `r` is the master's result, which
    /// gains the receiver's own error when both failed.
    pub fn close<T>(self, r: Result<T, SyncError>) -> Result<T, SyncError> {
        let Connection {
            framed,
            local,
            child,
        } = self;
        drop(framed);
        if let Some((sock, thread)) = local {
            let _ = sock.shutdown(std::net::Shutdown::Both);
            let inner = thread.join();
            return match (r, inner) {
                (Err(e), Ok(Err(inner))) => {
                    Err(SyncError::Remote(format!("{e}; receiver: {inner}")))
                }
                (r, _) => r,
            };
        }
        if let Some(mut child) = child {
            if r.is_ok() {
                // The run succeeded, so the receiver has answered the last request (its
                // `Report` comes after its writes are durable and its cache saved; a dry run
                // writes nothing): nothing is left for ssh to tell. Its exit (the remote
                // process's teardown, the exit status relayed through the connection, ~20 ms)
                // is not waited for; a thread reaps it, or it is reparented if this process
                // ends first.
                let _ = std::thread::Builder::new()
                    .name("corral-ssh-reap".into())
                    .spawn(move || child.wait());
                return r;
            }
            let status = child.wait();
            return match (r, status) {
                (Err(e), Ok(st)) if !st.success() => {
                    Err(SyncError::Remote(format!("{e} (ssh exited with {st})")))
                }
                (r, _) => r,
            };
        }
        r
    }
}

/// Shortcut: a local path.
pub fn local(p: &Path) -> Dest {
    Dest::Local(p.to_path_buf())
}

/// Pushes `src` to `dest` in one call: connect, run [`push`](crate::session::push), close.
pub fn push_to(
    src: &Path,
    dest: &Dest,
    ssh: &SshOptions,
    serve_opts: ServeOptions,
    filter: &dyn crate::filter::PathFilter,
    opts: &crate::session::PushOptions,
    progress: &mut dyn FnMut(crate::session::Progress),
) -> Result<crate::session::PushResult, SyncError> {
    let mut conn = connect(dest, ssh, serve_opts)?;
    let r = crate::session::push(src, &mut conn.framed, filter, opts, progress);
    conn.close(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// Issue #5: the child's state directory goes on the remote command line, quoted.
    #[test]
    fn remote_command_carries_the_state_dir_when_given() {
        assert_eq!(
            remote_command("corral", "/srv/t", None),
            "corral sync serve --stdio --root /srv/t"
        );
        assert_eq!(
            remote_command("/opt/corral", "/", Some("/srv/corral state")),
            "/opt/corral sync serve --stdio --root / --state-dir '/srv/corral state'"
        );
    }

    #[test]
    fn ssh_command_shares_the_connection_only_when_asked_and_not_overridden() {
        let state = tempfile::tempdir().unwrap();
        let ssh = SshOptions {
            args: vec!["-p".into(), "2222".into()],
            persist: Some(std::time::Duration::from_secs(30)),
            ..SshOptions::default()
        };
        let dir = state.path().join("ssh");
        let with = |ssh: &SshOptions| args(&ssh_command_in(ssh, "web01", "corral x", state.path()));
        let a = with(&ssh);
        assert_eq!(&a[..2], ["-p", "2222"]);
        assert!(a.contains(&"-oControlMaster=auto".to_string()), "{a:?}");
        assert!(
            a.contains(&format!("-oControlPath={}/%C", dir.display())),
            "{a:?}"
        );
        assert!(a.contains(&"-oControlPersist=30s".to_string()), "{a:?}");
        assert_eq!(
            &a[a.len() - 4..],
            ["-oBatchMode=yes", "--", "web01", "corral x"]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "control directory must be private");

        // Off, or the user's own ControlPath/ControlMaster: nothing added.
        for ssh in [
            SshOptions {
                persist: None,
                ..ssh.clone()
            },
            SshOptions {
                persist: Some(std::time::Duration::ZERO),
                ..ssh.clone()
            },
            SshOptions {
                args: vec!["-o".into(), "ControlPath=/x/%C".into()],
                ..ssh.clone()
            },
            SshOptions {
                args: vec!["-oControlMaster=no".into()],
                ..ssh.clone()
            },
        ] {
            let a = with(&ssh);
            assert!(!a.iter().any(|x| x.contains("ControlPersist")), "{a:?}");
        }

        // A control directory open to others is not used.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let a = with(&ssh);
        assert!(!a.iter().any(|x| x.contains("ControlPersist")), "{a:?}");
    }

    /// A connection to a stand-in for ssh that lingers 3 s after its input closes (a remote
    /// process slow to exit).
    fn lingering_child() -> Connection {
        let mut child = Command::new("sh")
            .args(["-c", "cat >/dev/null; sleep 3; exit 7"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (out, inp) = (child.stdout.take().unwrap(), child.stdin.take().unwrap());
        Connection {
            framed: Framed::new(Box::new(out), Box::new(inp)),
            local: None,
            child: Some(child),
        }
    }

    #[test]
    fn a_successful_run_does_not_wait_for_ssh_to_exit_but_a_failed_one_does() {
        let t0 = std::time::Instant::now();
        let r: Result<u32, SyncError> = lingering_child().close(Ok(1));
        assert_eq!(r.unwrap(), 1);
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(2),
            "waited {:?} for ssh",
            t0.elapsed()
        );
        // A failure waits for ssh, whose exit status goes into the error.
        let t0 = std::time::Instant::now();
        let e = lingering_child()
            .close::<()>(Err(SyncError::Remote("boom".into())))
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() >= std::time::Duration::from_secs(3));
        assert!(e.contains("boom") && e.contains("7"), "{e}");
    }

    #[test]
    fn aes_gcm_is_preferred_unless_the_user_chose_ciphers() {
        let state = tempfile::tempdir().unwrap();
        let with = |a: &[&str]| {
            let ssh = SshOptions {
                args: a.iter().map(|s| s.to_string()).collect(),
                ..SshOptions::default()
            };
            args(&ssh_command_in(&ssh, "web01", "corral x", state.path()))
        };
        let ours = format!("-oCiphers={PREFERRED_CIPHERS}");
        // chacha20 stays in the list: a server without AES-GCM still connects.
        assert!(PREFERRED_CIPHERS.starts_with("aes128-gcm@openssh.com,"));
        assert!(PREFERRED_CIPHERS.contains(",chacha20-poly1305@openssh.com,"));
        for a in [&[][..], &["-p", "2222"], &["-i/home/c/key"], &["-i", "c"]] {
            let got = with(a);
            assert_eq!(got.contains(&ours), cpu_has_aes(), "{a:?}: {got:?}");
            if cpu_has_aes() {
                assert_eq!(
                    &got[got.len() - 5..got.len() - 3],
                    [&ours, "-oBatchMode=yes"]
                );
            }
        }
        for a in [
            &["-c", "chacha20-poly1305@openssh.com"][..],
            &["-caes256-ctr"],
            &["-4c", "aes256-ctr"],
            &["-oCiphers=aes256-ctr"],
            &["-o", "ciphers aes256-ctr"],
        ] {
            let got = with(a);
            assert!(!got.contains(&ours), "{a:?}: {got:?}");
        }
    }
}
