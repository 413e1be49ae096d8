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

/// How to reach a remote receiver.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    /// The ssh program (default `ssh`).
    pub program: Option<String>,
    /// Extra arguments before the host (`-p`, `-i`, `-o ...`).
    pub args: Vec<String>,
    /// The command run remotely (default `corral`); `sync serve --stdio --root PATH` follows.
    pub remote_corral: Option<String>,
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

fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The remote command line for a receiver rooted at `path`.
pub fn remote_command(corral: &str, path: &str) -> String {
    format!("{corral} sync serve --stdio --root {}", sh_quote(path))
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
                    BufReader::with_capacity(1 << 20, b),
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
                    Box::new(BufWriter::with_capacity(1 << 20, a2)),
                ),
                local: Some((a3, thread)),
                child: None,
            })
        }
        Dest::Ssh { host, path } => {
            let prog = ssh.program.clone().unwrap_or_else(|| "ssh".into());
            let corral = ssh.remote_corral.clone().unwrap_or_else(|| "corral".into());
            let mut cmd = Command::new(&prog);
            cmd.args(&ssh.args)
                .arg("-oBatchMode=yes")
                .arg("--")
                .arg(host)
                .arg(remote_command(&corral, path))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().map_err(|e| SyncError::Spawn {
                cmd: prog.clone(),
                source: e,
            })?;
            let (Some(out), Some(inp)) = (child.stdout.take(), child.stdin.take()) else {
                return Err(SyncError::Remote("ssh has no pipes".into()));
            };
            Ok(Connection {
                framed: Framed::new(
                    Box::new(BufReader::with_capacity(1 << 20, out)),
                    Box::new(BufWriter::with_capacity(1 << 20, inp)),
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
