//! `corral demo`: the quick start's main job on an embedded default.
//!
//! Builds a lab of network namespaces on this machine (one sender and N receivers on a bridge,
//! one receiver losing 5% of its packets), generates a mostly empty disk image, casts it with a
//! fresh signing key using the real `corral cast` commands, checks every copy byte for byte and
//! prints the audit events the run recorded. Without root it runs the same cast over loopback
//! multicast on this host, and says so.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::Global;
use crate::exit::Code;

/// Arguments of `corral demo`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  sudo corral demo                       3 receivers, 64 MiB image, in network namespaces
  sudo corral demo --receivers 8 --size-mib 256
  corral demo --keep --workdir /tmp/d    keep the image, copies and audit store afterwards")]
pub(crate) struct DemoArgs {
    /// How many receivers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=32))]
    receivers: u16,
    /// Size of the generated disk image, in MiB (about 70% of it zeros, as on a fresh disk).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    size_mib: u64,
    /// Packet loss applied to the first receiver (0 to 0.5), repaired by parity.
    #[arg(long, default_value_t = 0.05)]
    loss: f64,
    /// Directory for the image, the copies, the keys and the audit store (default: a new
    /// temporary directory, removed afterwards unless --keep).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Keep the work directory afterwards.
    #[arg(long)]
    keep: bool,
    /// Use loopback multicast on this host even when running as root.
    #[arg(long)]
    loopback: bool,
}

/// Where the receivers run.
enum Place {
    /// Each program in its own network namespace on a bridge.
    Lab(corral_testkit::Lab),
    /// Everything on this host, multicast over loopback.
    Loopback,
}

pub(crate) fn run(args: DemoArgs, _global: &Global) -> anyhow::Result<Code> {
    if !(0.0..=0.5).contains(&args.loss) {
        return Err(crate::exit::bad_input(format!(
            "--loss {} is outside 0..=0.5",
            args.loss
        )));
    }
    let tmp;
    let work = match &args.workdir {
        Some(d) => {
            fs_err::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("corral-demo-").tempdir()?;
            if args.keep {
                tmp.keep()
            } else {
                tmp.path().to_owned()
            }
        }
    };
    let exe = std::env::current_exe().context("cannot find the corral executable")?;
    let n = usize::from(args.receivers);

    println!("corral demo: cast a disk image to {n} receivers, verified block by block");
    println!("  work directory: {}", work.display());

    // 1. The image: a small "filesystem" of random and text-like data in a mostly empty disk.
    let image = work.join("disk.img");
    let t = Instant::now();
    let digest = make_image(&image, args.size_mib << 20)?;
    println!(
        "  generated {} ({} MiB, ~70% zeros) in {:.1}s, BLAKE3 {}",
        image.display(),
        args.size_mib,
        t.elapsed().as_secs_f64(),
        &digest.to_hex()[..16]
    );

    // 2. A signing key: receivers accept only manifests signed by it.
    let key = work.join("demo.key");
    let _ = fs_err::remove_file(&key);
    let _ = fs_err::remove_file(work.join("demo.key.pub"));
    check_status(
        Command::new(&exe)
            .args(["-q", "cast", "keygen", "--out"])
            .arg(&key),
        "cast keygen",
    )?;
    let pubkey = work.join("demo.key.pub");

    // 3. Where to run.
    let place = if args.loopback || !corral_testkit::is_root() {
        if !args.loopback {
            println!(
                "  NOTE: not root, so no network namespaces: running over loopback multicast \
                 on this host instead (run with sudo for the full lab)"
            );
        }
        Place::Loopback
    } else {
        let lab = corral_testkit::Lab::new("demo", n + 1)
            .context("cannot build the network-namespace lab (is iproute2 installed?)")?;
        if args.loss > 0.0 {
            lab.set_loss(1, args.loss)?;
        }
        println!(
            "  lab: sender {} and receivers {} on a bridge; receiver 1 drops {:.0}% of packets",
            lab.host(0).ip,
            (1..=n)
                .map(|i| lab.host(i).ip.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            args.loss * 100.0
        );
        Place::Lab(lab)
    };
    let (iface, group_port) = match &place {
        Place::Lab(_) => ("eth0", 9000 + (std::process::id() % 1000) as u16),
        Place::Loopback => ("lo", 10000 + (std::process::id() % 1000) as u16),
    };
    let port = group_port.to_string();
    let db = work.join("corral.db");
    let _ = fs_err::remove_file(&db);

    // 4. Receivers first, then the sender, which starts once all of them have joined.
    let mut receivers = Vec::new();
    for i in 1..=n {
        let out = work.join(format!("receiver{i}.img"));
        let _ = fs_err::remove_file(&out);
        let log = fs_err::File::create(work.join(format!("receiver{i}.log")))?;
        let mut cmd = host_command(&place, i, &exe);
        cmd.args([
            "cast",
            "receive",
            "--json",
            "--interface",
            iface,
            "--port",
            &port,
        ])
        .arg("--name")
        .arg(format!("receiver{i}"))
        .arg("--output")
        .arg(&out)
        .arg("--trusted-key")
        .arg(&pubkey)
        .args(["--idle-timeout", "60s"])
        .arg("--db")
        .arg(&db)
        .stdout(Stdio::from(log.into_parts().0))
        .stderr(Stdio::piped());
        let child = cmd.spawn().context("cannot start a receiver")?;
        receivers.push((i, out, child));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let sender_log = fs_err::File::create(work.join("sender.log"))?;
    let mut cmd = host_command(&place, 0, &exe);
    cmd.args([
        "cast",
        "send",
        "--json",
        "--interface",
        iface,
        "--port",
        &port,
    ])
    .args(["--min-receivers", &n.to_string(), "--max-wait", "20s"])
    .arg("--key")
    .arg(&key)
    .arg("--db")
    .arg(&db)
    .arg(&image)
    .stdout(Stdio::from(sender_log.into_parts().0))
    .stderr(Stdio::piped());
    let sender = cmd.spawn().context("cannot start the sender")?;
    let sender_out = wait_bounded(sender, Duration::from_secs(300))?;
    let elapsed = t.elapsed();

    // 5. Results: the sender's verdict and every copy checked byte for byte.
    println!();
    println!(
        "  sender finished in {:.2}s with {}",
        elapsed.as_secs_f64(),
        describe(&sender_out.status)
    );
    let mut all_ok = sender_out.status.success();
    if !all_ok {
        print_tail("sender", &sender_out.stderr);
    }
    println!("  {:<10} {:<8} {:<10} copy", "receiver", "exit", "verdict");
    for (i, out, child) in receivers {
        let res = wait_bounded(child, Duration::from_secs(60))?;
        let copy = match hash_file(&out) {
            Ok(h) if h == digest => "identical to the image".to_owned(),
            Ok(_) => "DIFFERS from the image".to_owned(),
            Err(e) => format!("missing ({e})"),
        };
        let ok = res.status.success() && copy.starts_with("identical");
        all_ok &= ok;
        println!(
            "  receiver{i:<2} {:<8} {:<10} {copy}",
            describe(&res.status),
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            print_tail(&format!("receiver{i}"), &res.stderr);
        }
    }
    drop(place);

    // 6. What the audit store recorded, as `corral log` shows it.
    println!();
    println!("  audit events (corral log --db {}):", db.display());
    std::io::stdout().flush()?;
    let _ = Command::new(&exe)
        .args(["log", "--limit", "40", "--db"])
        .arg(&db)
        .status();
    println!();
    if all_ok {
        println!("demo OK: {n} receivers hold byte-identical, signature-verified copies");
    } else {
        println!("demo FAILED: see the logs in {}", work.display());
    }
    if args.workdir.is_none() && !args.keep && all_ok {
        let _ = fs_err::remove_dir_all(&work);
    }
    Ok(if all_ok { Code::Success } else { Code::Runtime })
}

fn host_command(place: &Place, i: usize, exe: &Path) -> Command {
    match place {
        Place::Lab(lab) => lab.host(i).command(exe),
        Place::Loopback => Command::new(exe),
    }
}

/// Writes the demo image and returns its BLAKE3 hash. Deterministic: the same bytes every run.
fn make_image(path: &Path, size: u64) -> anyhow::Result<blake3::Hash> {
    const MIB: u64 = 1 << 20;
    let mut f = std::io::BufWriter::new(fs_err::File::create(path)?);
    let mut hasher = blake3::Hasher::new();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut chunk = vec![0u8; MIB as usize];
    for mib in 0..size.div_ceil(MIB) {
        let len = MIB.min(size - mib * MIB) as usize;
        let buf = &mut chunk[..len];
        match mib % 10 {
            // 20% incompressible (binaries, compressed archives).
            0 | 5 => buf.iter_mut().for_each(|b| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *b = rng as u8;
            }),
            // 10% text-like: compresses well.
            3 => {
                let line = format!("corral demo block {mib}: the quick brown fox jumps over it\n");
                for (b, c) in buf.iter_mut().zip(line.bytes().cycle()) {
                    *b = c;
                }
            }
            // 70% never written: zeros.
            _ => buf.fill(0),
        }
        hasher.update(buf);
        f.write_all(buf)?;
    }
    f.into_inner()?.sync_all()?;
    Ok(hasher.finalize())
}

fn hash_file(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize())
}

fn check_status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run corral {what}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "corral {what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Waits for `child`, killing it after `limit`; collects stderr.
fn wait_bounded(
    mut child: std::process::Child,
    limit: Duration,
) -> anyhow::Result<std::process::Output> {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Ok(child.wait_with_output()?);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn describe(status: &std::process::ExitStatus) -> String {
    match status.code() {
        Some(c) => format!("exit {c}"),
        None => "killed".to_owned(),
    }
}

fn print_tail(who: &str, stderr: &[u8]) {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    for l in &lines[lines.len().saturating_sub(8)..] {
        println!("    {who}: {l}");
    }
}
