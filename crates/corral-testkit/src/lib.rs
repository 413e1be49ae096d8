//! Multi-host test kit: network namespaces joined by a bridge, with loss and rate limits.
//!
//! A [`Lab`] is a hub namespace holding a bridge, and N host namespaces, each with one veth
//! (`eth0`) plugged into the bridge, its own IPv4 address (added with `brd +`, without which
//! udpcast's rendezvous hangs) and a multicast route. Tests run real programs inside a host with
//! [`Host::command`], inject loss ([`Lab::set_loss`], iptables `statistic`; this kernel has no
//! `sch_netem`) and rate limits ([`Lab::set_rate`], `tc tbf`), and everything is removed when the
//! `Lab` is dropped, also on panic. Namespace names carry the process id and a counter, so tests
//! can run in parallel; a lab also sweeps namespaces left behind by killed test processes.
//!
//! This crate is *not* a general network emulator and is not published: it is the shared
//! harness of corral's end-to-end tests and of `corral demo`. It needs root; [`require_root`]
//! prints a loud skip message for tests run without it.
//!
//! ```no_run
//! let lab = corral_testkit::Lab::new("doc", 2).unwrap();
//! let out = lab.host(1).command("ping").args(["-c1", &lab.host(0).ip.to_string()]).output().unwrap();
//! assert!(out.status.success());
//! ```

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace this kit creates; used to find leftovers of killed runs.
const NS_PREFIX: &str = "crl";

/// What can go wrong building or changing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A setup command could not be started (is iproute2/iptables installed?).
    #[error("cannot run `{command}`: {source} (install iproute2 and iptables)")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A setup command failed.
    #[error("`{command}` failed with {status}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A lab needs at least one host and at most 200.
    #[error("a lab has 1 to 200 hosts, not {0}")]
    HostCount(usize),
}

/// True when running as root (network namespaces need it).
pub fn is_root() -> bool {
    // The effective uid is the third field of /proc's `Uid:` line; reading it there keeps this
    // crate free of `unsafe` (libc's geteuid is an extern fn).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Returns true when the test may go on; otherwise prints a loud skip line and returns false.
///
/// ```
/// if !corral_testkit::require_root("my_netns_test") { return; }
/// ```
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!("SKIPPED (needs root): {test} — network namespaces need root; CI runs as root");
    false
}

/// One host of a lab: a network namespace with `eth0` on the lab's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Index in the lab (0-based).
    pub index: usize,
    /// Network namespace name.
    pub ns: String,
    /// The host's address on the lab network.
    pub ip: Ipv4Addr,
    /// The host's interface name inside its namespace (always `eth0`).
    pub iface: String,
    /// The bridge-side veth name, inside the hub namespace.
    hub_port: String,
}

impl Host {
    /// A command that runs `program` inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Runs `ip -n NS ARGS...` in this host's namespace, e.g. `host.ip(&["addr", "add",
    /// "10.250.0.1/32", "dev", "eth0"])`; an error carries the command and its output.
    pub fn ip(&self, args: &[&str]) -> Result<(), LabError> {
        let mut v = vec!["-n", self.ns.as_str()];
        v.extend_from_slice(args);
        run("ip", &v)
    }
}

/// A hub bridge and N hosts, each in its own network namespace. Removed on drop.
#[derive(Debug)]
pub struct Lab {
    hub: String,
    hosts: Vec<Host>,
    prefix_len: u8,
    children: Mutex<Vec<Child>>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Builds a lab of `hosts` hosts named after `tag` (a short word for humans reading
    /// `ip netns list`). Host `i` gets address `10.A.B.(i+2)/24`, where `A.B` differ per lab.
    pub fn new(tag: &str, hosts: usize) -> Result<Lab, LabError> {
        if hosts == 0 || hosts > 200 {
            return Err(LabError::HostCount(hosts));
        }
        sweep_leftovers();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(8)
            .collect();
        let base = format!("{NS_PREFIX}{pid}x{n}{tag}");
        // Subnets only need to be distinct for humans reading captures: each lab is isolated.
        let a = 100 + (n % 100) as u8;
        let b = (pid % 250) as u8;
        let hub = format!("{base}-hub");
        let mut lab = Lab {
            hub: hub.clone(),
            hosts: Vec::new(),
            prefix_len: 24,
            children: Mutex::new(Vec::new()),
        };
        // From here on, Drop cleans up whatever was created, even on error.
        run("ip", &["netns", "add", &hub])?;
        lab.ip_hub(&["link", "set", "lo", "up"])?;
        lab.ip_hub(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        lab.ip_hub(&["link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ns = format!("{base}-h{i}");
            let ip = Ipv4Addr::new(10, a, b, (i + 2) as u8);
            let hub_port = format!("vh{i}");
            run("ip", &["netns", "add", &ns])?;
            let host = Host {
                index: i,
                ns: ns.clone(),
                ip,
                iface: "eth0".into(),
                hub_port,
            };
            lab.hosts.push(host.clone());
            lab.ip_hub(&[
                "link",
                "add",
                &host.hub_port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns,
            ])?;
            lab.ip_hub(&["link", "set", &host.hub_port, "master", "br0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            let cidr = format!("{ip}/{}", lab.prefix_len);
            run(
                "ip",
                &["-n", &ns, "addr", "add", &cidr, "brd", "+", "dev", "eth0"],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"],
            )?;
        }
        Ok(lab)
    }

    /// Host `i`. Panics if `i` is out of range (a test bug).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// All hosts.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The hub namespace's name.
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// Sets the MTU of every link in the lab (bridge, both veth ends).
    pub fn set_mtu(&self, mtu: u32) -> Result<(), LabError> {
        let m = mtu.to_string();
        for h in &self.hosts {
            self.ip_hub(&["link", "set", &h.hub_port, "mtu", &m])?;
            run("ip", &["-n", &h.ns, "link", "set", "eth0", "mtu", &m])?;
        }
        self.ip_hub(&["link", "set", "br0", "mtu", &m])
    }

    /// Drops a random fraction `probability` (0..1) of the UDP packets host `i` receives.
    pub fn set_loss(&self, i: usize, probability: f64) -> Result<(), LabError> {
        let p = format!("{probability:.4}");
        self.iptables(
            i,
            &[
                "-A",
                "INPUT",
                "-p",
                "udp",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ],
        )
    }

    /// Limits the rate at which host `i` receives (tc tbf on its bridge port), e.g. `"100mbit"`.
    pub fn set_rate(&self, i: usize, rate: &str) -> Result<(), LabError> {
        let port = self.hosts[i].hub_port.clone();
        run(
            "ip",
            &[
                "netns", "exec", &self.hub, "tc", "qdisc", "replace", "dev", &port, "root", "tbf",
                "rate", rate, "burst", "64kb", "latency", "20ms",
            ],
        )
    }

    /// Host `i` neither receives nor sends multicast (a switch without IGMP querier, a firewall).
    pub fn block_multicast(&self, i: usize) -> Result<(), LabError> {
        self.iptables(i, &["-A", "INPUT", "-d", "224.0.0.0/4", "-j", "DROP"])?;
        self.iptables(i, &["-A", "OUTPUT", "-d", "224.0.0.0/4", "-j", "DROP"])
    }

    /// Cuts host `i` off the network entirely (its port goes down), as if it died or was unplugged.
    pub fn unplug(&self, i: usize) -> Result<(), LabError> {
        self.ip_hub(&["link", "set", &self.hosts[i].hub_port, "down"])
    }

    /// Starts `cmd` (usually from [`Host::command`]) and keeps the child so that it is killed when
    /// the lab is dropped. Returns its pid.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<u32> {
        let child = cmd.spawn()?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
        Ok(pid)
    }

    /// Waits for the tracked child `pid` (from [`Lab::spawn`]) to exit, with stdout/stderr if
    /// they were piped. Returns `None` if it is still running after `timeout`, or unknown.
    pub fn wait(&self, pid: u32, timeout: std::time::Duration) -> Option<std::process::Output> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let mut kids = self.children.lock().unwrap_or_else(|e| e.into_inner());
                let pos = kids.iter().position(|c| c.id() == pid)?;
                if let Ok(Some(_)) = kids[pos].try_wait() {
                    let child = kids.swap_remove(pos);
                    return child.wait_with_output().ok();
                }
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends SIGKILL to the tracked child `pid`.
    pub fn kill(&self, pid: u32) {
        let mut kids = self.children.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = kids.iter_mut().find(|c| c.id() == pid) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ip_hub(&self, args: &[&str]) -> Result<(), LabError> {
        let mut v = vec!["-n", self.hub.as_str()];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    fn iptables(&self, i: usize, args: &[&str]) -> Result<(), LabError> {
        let mut v = vec![
            "netns",
            "exec",
            self.hosts[i].ns.as_str(),
            "iptables-legacy",
            "-w",
        ];
        v.extend_from_slice(args);
        run("ip", &v)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut kids = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for c in kids.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kids.clear();
        let mut all: Vec<String> = self.hosts.iter().map(|h| h.ns.clone()).collect();
        all.push(self.hub.clone());
        for ns in all {
            remove_namespace(&ns);
        }
    }
}

/// Kills whatever still runs in `ns` and deletes it. Errors are ignored: this is cleanup.
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill")
                .args(["-9", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Deletes namespaces of ours whose creating process no longer exists (it was SIGKILLed).
fn sweep_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(name);
        }
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), LabError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
