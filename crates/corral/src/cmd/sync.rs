//! `corral sync push|run|serve|rollback`: keep trees identical to a master, through tiers.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use corral_model::{Event, Outcome, Source, UnixMillis};
use corral_store::{Recorder, RecorderConfig};
use corral_sync::compression::Compress;
use corral_sync::filter::{PathFilter, RulesFilter};
use corral_sync::proto::{Framed, RunOptions};
use corral_sync::session::{Progress, PushOptions, PushResult, ServeOptions};
use corral_sync::transport::{Dest, SshOptions, push_to};
use corral_sync_filter::{FilterOption, MatchOptions, Rules};
use serde::Serialize;

use crate::cli::{Global, SiteArg};
use crate::exit::{Code, bad_input};

/// Arguments of `corral sync`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    cmd: SyncCommand,
}

/// `corral sync` subcommands.
#[derive(Debug, clap::Subcommand)]
enum SyncCommand {
    /// One-off: make DEST identical to SRC (a local directory or host:path over ssh).
    #[command(after_help = "\
Every file is replaced atomically (temporary file + rename). Filter options are rsync's and
apply in the order given. With --dry-run every change is listed, one line each, in rsync's
itemize style (>f.st...... path), or as JSON with --json.

Exit status: 0 done (or dry run), 1 a step or the transport failed, 3 bad rules or paths.

Examples:
  corral sync push /srv/tree/ web01:/srv/tree --delete --dry-run
  corral sync push ./build /var/www --exclude '*.tmp' --delete
  corral sync push /srv/os db01:/ --filter-file /etc/corral/os.rules --json")]
    Push(PushArgs),
    /// Sync the children of a tree described in the site's trees/TREE.toml.
    #[command(after_help = "\
Children are synced in parallel (--jobs). With --recursive a child that is itself a master
(recurse = true in the tree file) syncs its own children after it is updated, and its report
comes back nested under it. Prints one line per host: changed, unchanged or failed and why.

Exit status: 0 every child synced, 1 at least one failed, 3 bad tree file or rules.

Examples:
  corral sync run web --all --dry-run          preview every change on every child
  corral sync run web -s web01 -s web02        two children only
  corral sync run web --all --recursive --jobs 8 --backup-dir .corral-backup")]
    Run(RunArgs),
    /// The receiving end: speak the sync protocol on stdin/stdout beneath --root.
    #[command(after_help = "\
Started by ssh on the child. Pin the master's key to it in ~/.ssh/authorized_keys:

  command=\"corral sync serve --stdio --root /\",from=\"10.0.0.1\",restrict ssh-ed25519 AAAA... master

Every operation stays beneath --root (openat2 with RESOLVE_BENEATH); paths with .. or a
leading / are refused.

The receiver's hash cache lives in --state-dir (default $CORRAL_STATE_DIR, else
/var/lib/corral). ssh passes no environment: the master adds --state-dir when the tree file
sets `state_dir` for the child (`[[child]] state_dir = \"/srv/corral-state\"`); a forced
command replaces that line, so put --state-dir into the command= of authorized_keys instead.

Examples:
  corral sync serve --stdio --root /srv/tree
  corral sync serve --stdio --root / --state-dir /srv/corral-state")]
    Serve(ServeArgs),
    /// Put back what a run replaced or deleted (kept with --backup-dir) and remove what it
    /// created. Run it on the child.
    #[command(after_help = "\
Examples:
  corral sync rollback 20261201T170000Z --root / --backup-dir .corral-backup")]
    Rollback(RollbackArgs),
    /// Roll back in-place updates a killed run left half done. Run it on the child.
    #[command(after_help = "\
A large file that changes a little is updated in place behind an undo journal kept in
DIR/.corral-sync-journal/ (see the sync docs). If the receiver is killed mid-update the file
holds old and new bytes until the journal is replayed: every run of `corral sync serve` (and
local push) does that first; this command does it alone, e.g. at boot or before reading the
tree. Afterwards every file is as it was before the killed run (the next run makes it new).

Exit status: 0 recovered (or nothing to do), 1 a journal could not be replayed.

Examples:
  corral sync recover /
  corral sync recover /srv/tree")]
    Recover(RecoverArgs),
}

/// Arguments of `corral sync recover`.
#[derive(Debug, clap::Args)]
pub(crate) struct RecoverArgs {
    /// The child's root (the --root its `corral sync serve` runs with).
    #[arg(value_name = "DIR")]
    root: PathBuf,
}

/// Filter options shared by push.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FilterArgs {
    /// A file of rsync filter rules (`- /tmp/`, `+ *.conf`, `P /var/lib/`, `: .rsync-filter`).
    #[arg(long, value_name = "FILE")]
    filter_file: Vec<PathBuf>,
    /// Exclude paths matching PATTERN (rsync syntax; order with --include matters).
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Include paths matching PATTERN (rsync syntax).
    #[arg(long, value_name = "PATTERN")]
    include: Vec<String>,
    /// A filter rule in rsync's full syntax.
    #[arg(long, value_name = "RULE")]
    filter: Vec<String>,
    /// Delete excluded paths on the child too (otherwise they are protected).
    #[arg(long)]
    delete_excluded: bool,
}

/// Transport options.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SshArgs {
    /// The ssh program.
    #[arg(long, value_name = "PROG")]
    ssh: Option<String>,
    /// An argument for ssh before the host (repeat: --ssh-arg=-p --ssh-arg=2222).
    #[arg(long = "ssh-arg", value_name = "ARG", allow_hyphen_values = true)]
    ssh_args: Vec<String>,
    /// The corral program on the child.
    #[arg(long, value_name = "PROG")]
    remote_corral: Option<String>,
    /// The state directory of the receiver on the child (its `corral sync serve
    /// --state-dir`; default: the child's $CORRAL_STATE_DIR, else /var/lib/corral).
    #[arg(long, value_name = "DIR")]
    remote_state_dir: Option<String>,
    /// Keep the ssh connection open this long after the run, so the next run to the same
    /// host skips connecting and authenticating (OpenSSH ControlPersist, control socket in
    /// $CORRAL_STATE_DIR/ssh); 0 for a new connection every run.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    ssh_persist: std::time::Duration,
}

/// Arguments of `corral sync push`.
#[derive(Debug, clap::Args)]
pub(crate) struct PushArgs {
    /// The master's directory.
    src: PathBuf,
    /// The child: a local directory or host:path.
    dest: String,
    /// Delete on the child what SRC does not have (except protected paths).
    #[arg(long)]
    delete: bool,
    /// List the changes, change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Keep what is replaced or deleted in DIR/RUN_ID beneath the child's root.
    #[arg(long, value_name = "DIR")]
    backup_dir: Option<String>,
    /// Map owners by number, never by name.
    #[arg(long)]
    numeric_ids: bool,
    /// Do not sync each batch of written files before renaming it into place (faster; after
    /// a power loss a renamed file may be empty).
    #[arg(long)]
    no_fsync: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// File data on the wire: auto (compressed for a small plan; for a large one, measure
    /// compressed and raw throughput as it sends and keep the faster), always or never.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    compress: Compress,
    #[command(flatten)]
    filters: FilterArgs,
    #[command(flatten)]
    ssh: SshArgs,
}

/// Which tree and which of its children a command works on: shared by `corral sync run` and
/// `corral drift`.
#[derive(Debug, clap::Args)]
pub(crate) struct TreeSelect {
    /// The tree: trees/TREE.toml in the site directory.
    pub(crate) tree: String,
    #[command(flatten)]
    pub(crate) site: SiteArg,
    /// Only this child (by name or host); repeat for more.
    #[arg(short = 's', long = "host", value_name = "HOST")]
    pub(crate) hosts: Vec<String>,
    /// Every child of the tree.
    #[arg(long, conflicts_with = "hosts")]
    pub(crate) all: bool,
    /// Children worked on at once.
    #[arg(long, default_value_t = 4)]
    pub(crate) jobs: usize,
    /// Record events in this audit store (default: the site's store when the site loads).
    #[arg(long, value_name = "FILE")]
    pub(crate) db: Option<PathBuf>,
}

/// Arguments of `corral sync run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    sel: TreeSelect,
    /// Children that are masters sync their own children after they are updated.
    #[arg(long)]
    recursive: bool,
    /// List the changes per child, change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Delete on children what the master does not have (also `delete = true` in the tree).
    #[arg(long)]
    delete: bool,
    /// Keep what is replaced or deleted in DIR/RUN_ID beneath each child's root.
    #[arg(long, value_name = "DIR")]
    backup_dir: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// File data on the wire: auto, always or never (see `corral sync push --help`;
    /// default: the tree's `[ssh] compress`, else auto).
    #[arg(long, value_name = "WHEN")]
    compress: Option<Compress>,
}

/// Arguments of `corral sync serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Speak on stdin/stdout (the only mode; required for clarity in authorized_keys).
    #[arg(long, required = true)]
    stdio: bool,
    /// Everything happens beneath this directory.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Do not sync each batch of written files before renaming it into place.
    #[arg(long)]
    no_fsync: bool,
    /// Keep this receiver's state (its hash cache, in DIR/sync/) here. Default:
    /// $CORRAL_STATE_DIR, else /var/lib/corral. Set by the master from the tree file's
    /// `[[child]] state_dir` (ssh passes no environment).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Arguments of `corral sync rollback`.
#[derive(Debug, clap::Args)]
pub(crate) struct RollbackArgs {
    /// The run id (printed by the run, a directory under the backup directory).
    run: String,
    /// The child's root.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// The backup directory beneath the root that the run used.
    #[arg(long, value_name = "DIR", default_value = ".corral-backup")]
    backup_dir: String,
}

pub(crate) fn run(args: Args, global: &Global) -> anyhow::Result<Code> {
    match args.cmd {
        SyncCommand::Push(a) => push(a, global),
        SyncCommand::Run(a) => run_tree(a, global),
        SyncCommand::Serve(a) => serve(a),
        SyncCommand::Recover(a) => {
            if !a.root.is_dir() {
                return Err(bad_input(format!("{}: not a directory", a.root.display())));
            }
            let r = corral_sync::journal::recover_path(&a.root, true)?;
            for p in &r.restored {
                println!("rolled back interrupted in-place update: {p}");
            }
            println!(
                "recovered {}: {} file(s) rolled back, {} torn journal(s) dropped, {} journal(s) of vanished files dropped",
                a.root.display(),
                r.restored.len(),
                r.torn,
                r.gone.len()
            );
            Ok(Code::Success)
        }
        SyncCommand::Rollback(a) => {
            check_backup_dir(&a.backup_dir)?;
            let r = corral_sync::rollback::rollback(&a.root, &a.backup_dir, &a.run).map_err(
                |e| match e {
                    corral_sync::SyncError::NoSuchRun(..) => bad_input(e.to_string()),
                    e => e.into(),
                },
            )?;
            println!(
                "rolled back run {}: {} paths restored, {} created paths removed",
                a.run, r.restored, r.removed
            );
            Ok(Code::Success)
        }
    }
}

fn check_backup_dir(d: &str) -> anyhow::Result<()> {
    if corral_sync::manifest::check_rel_path(d) && !d.is_empty() {
        Ok(())
    } else {
        Err(bad_input(format!(
            "--backup-dir {d:?}: give a relative path beneath the child's root, e.g. .corral-backup"
        )))
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<Code> {
    // A destination that is not there yet is made, as a local push (and rsync) makes it.
    if std::fs::symlink_metadata(&a.root).is_err() {
        fs_err::create_dir_all(&a.root).context("creating the destination (--root)")?;
    }
    if !a.root.is_dir() {
        return Err(bad_input(format!(
            "--root {}: not a directory",
            a.root.display()
        )));
    }
    // Pipes from and to sshd (fewer wake-ups per MiB); a socket or a file is left alone.
    corral_sync::transport::widen_pipe(std::io::stdin());
    corral_sync::transport::widen_pipe(std::io::stdout());
    let mut f = Framed::new(
        std::io::BufReader::with_capacity(corral_sync::transport::RECV_BUFFER, std::io::stdin()),
        std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock()),
    );
    let opts = ServeOptions {
        cache: Some(match &a.state_dir {
            Some(d) => corral_sync::scan::cache_in(d, &a.root),
            None => corral_sync::scan::default_cache(&a.root),
        }),
        no_fsync: a.no_fsync,
    };
    corral_sync::session::serve(&a.root, &mut f, &opts)?;
    Ok(Code::Success)
}

/// The order of --include/--exclude/--filter as given on the command line (clap keeps one
/// list per flag; rsync's rules depend on their relative order).
fn ordered_options(f: &FilterArgs) -> Vec<FilterOption> {
    let mut out = Vec::new();
    let (mut ie, mut ii, mut ifl) = (0, 0, 0);
    let args: Vec<String> = std::env::args().collect();
    for a in &args {
        let flag = a.split('=').next().unwrap_or("");
        match flag {
            "--exclude" if ie < f.exclude.len() => {
                out.push(FilterOption::Exclude(f.exclude[ie].clone()));
                ie += 1;
            }
            "--include" if ii < f.include.len() => {
                out.push(FilterOption::Include(f.include[ii].clone()));
                ii += 1;
            }
            "--filter" if ifl < f.filter.len() => {
                out.push(FilterOption::Filter(f.filter[ifl].clone()));
                ifl += 1;
            }
            _ => {}
        }
    }
    // Anything not found by the scan (e.g. from the environment) keeps clap's order.
    out.extend(f.exclude[ie..].iter().cloned().map(FilterOption::Exclude));
    out.extend(f.include[ii..].iter().cloned().map(FilterOption::Include));
    out.extend(f.filter[ifl..].iter().cloned().map(FilterOption::Filter));
    out
}

fn read_rules_file(p: &Path) -> anyhow::Result<Rules> {
    let text = fs_err::read_to_string(p)
        .map_err(|e| bad_input(format!("filter file {}: {e}", p.display())))?;
    let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
    Rules::parse_with(&text, &p.display().to_string(), &mut |m| {
        fs_err::read_to_string(base.join(m)).ok()
    })
    .map_err(|e| bad_input(format!("{e}")))
}

/// Builds the filter: rule files in order, then command-line options.
pub(crate) fn build_filter(
    files: &[PathBuf],
    options: &[FilterOption],
    delete_excluded: bool,
    master: &Path,
) -> anyhow::Result<Box<dyn PathFilter>> {
    let mut rules = Rules::parse("", "none").map_err(|e| bad_input(e.to_string()))?;
    for f in files {
        rules.extend(read_rules_file(f)?);
    }
    if !options.is_empty() {
        rules.extend(
            Rules::from_options_with(options, &mut |m| fs_err::read_to_string(m).ok())
                .map_err(|e| bad_input(format!("filter option: {e}")))?,
        );
    }
    Ok(Box::new(RulesFilter::new(
        rules,
        MatchOptions {
            delete_excluded,
            abs_root: std::fs::canonicalize(master).ok(),
        },
        master,
    )))
}

fn run_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    now.format(&fmt).unwrap_or_else(|_| "run".into())
}

/// Draws progress: a bar on a terminal, a JSON line per second otherwise.
pub(crate) struct ProgressView {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
    label: String,
    last: std::time::Instant,
    done: u64,
    total: u64,
}

impl ProgressView {
    pub(crate) fn new(label: &str, quiet: bool) -> Self {
        let term = std::io::stderr().is_terminal();
        ProgressView {
            bar: (term && !quiet).then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {wide_msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_prefix(label.to_string());
                b
            }),
            json: !term && !quiet,
            label: label.to_string(),
            last: std::time::Instant::now(),
            done: 0,
            total: 0,
        }
    }

    pub(crate) fn on(&mut self, p: Progress) {
        match p {
            Progress::Planned { bytes, .. } => {
                self.total = bytes;
                if let Some(b) = &self.bar {
                    b.set_length(bytes);
                }
            }
            Progress::Step { path, bytes } => {
                self.done += bytes;
                if let Some(b) = &self.bar {
                    b.set_position(self.done);
                    b.set_message(path);
                } else if self.json && self.last.elapsed().as_secs() >= 1 {
                    self.last = std::time::Instant::now();
                    eprintln!(
                        "{}",
                        serde_json::json!({"progress": self.label, "bytes": self.done, "total": self.total, "path": path})
                    );
                }
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn ssh_options(a: &SshArgs) -> SshOptions {
    SshOptions {
        program: a.ssh.clone(),
        args: a.ssh_args.clone(),
        remote_corral: a.remote_corral.clone(),
        remote_state_dir: a.remote_state_dir.clone(),
        persist: Some(a.ssh_persist),
    }
}

fn push(a: PushArgs, global: &Global) -> anyhow::Result<Code> {
    if !a.src.is_dir() {
        return Err(bad_input(format!("{}: not a directory", a.src.display())));
    }
    if let Some(b) = &a.backup_dir {
        check_backup_dir(b)?;
    }
    let filter = build_filter(
        &a.filters.filter_file,
        &ordered_options(&a.filters),
        a.filters.delete_excluded,
        &a.src,
    )?;
    let dest = Dest::parse(&a.dest);
    if let Dest::Local(p) = &dest
        && !p.is_dir()
    {
        fs_err::create_dir_all(p).context("creating the destination")?;
    }
    let id = run_id();
    let opts = PushOptions {
        plan: corral_sync::planner::PlanOptions {
            delete: a.delete,
            numeric_ids: a.numeric_ids,
            ignore_owner: !rustix_is_root(),
        },
        dry_run: a.dry_run,
        run: RunOptions {
            backup: a.backup_dir.clone().map(|d| (d, id.clone())),
            ignore_owner: false,
            numeric_ids: a.numeric_ids,
        },
        cache: Some(corral_sync::scan::default_cache(&a.src)),
        compress: a.compress,
    };
    let serve_opts = match &dest {
        Dest::Local(p) => ServeOptions {
            cache: Some(corral_sync::scan::default_cache(p)),
            no_fsync: a.no_fsync,
        },
        Dest::Ssh { .. } => ServeOptions::default(),
    };
    let mut view = ProgressView::new(&a.dest, global.quiet || a.json || a.dry_run);
    let t0 = std::time::Instant::now();
    let r = push_to(
        &a.src,
        &dest,
        &ssh_options(&a.ssh),
        serve_opts,
        filter.as_ref(),
        &opts,
        &mut |p| view.on(p),
    );
    view.finish();
    let r = r?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dest": a.dest,
                "dry_run": a.dry_run,
                "run_id": a.backup_dir.as_ref().map(|_| id.clone()),
                "changes": r.plan.items,
                "report": r.report,
                "master_scan": r.master_scan,
                "bytes_sent": r.bytes_out,
                "bytes_received": r.bytes_in,
                "compression": r.compression,
                "compression_summary": r.compression.to_string(),
                "seconds": secs,
            }))?
        );
    } else {
        if a.dry_run || global.verbose > 0 {
            for i in &r.plan.items {
                println!("{}", i.line());
            }
        }
        if !global.quiet {
            summary(&a.dest, &r, secs, a.dry_run);
            if a.backup_dir.is_some() && !a.dry_run {
                eprintln!(
                    "run id {id} (undo on the child: corral sync rollback {id} --root DIR --backup-dir DIR)"
                );
            }
        }
    }
    for (p, why) in &r.report.failed {
        eprintln!("corral: failed: {p}: {why}");
    }
    Ok(if r.report.failed.is_empty() {
        Code::Success
    } else {
        Code::Runtime
    })
}

fn summary(dest: &str, r: &PushResult, secs: f64, dry: bool) {
    eprintln!(
        "{dest}: {} change(s){}, {} file(s) written, {} bytes sent, {} data bytes, {} reused, {} cloned, {} failed, {secs:.2}s{}",
        r.plan.items.len(),
        if dry { " (dry run)" } else { "" },
        r.report.files_written,
        r.bytes_out,
        r.report.literal_bytes,
        r.report.reused_bytes,
        r.report.cloned_bytes,
        r.report.failed.len(),
        if dry || r.compression.last.is_none() {
            String::new()
        } else {
            format!(", data {}", r.compression)
        },
    );
}

fn rustix_is_root() -> bool {
    corral_testkit::is_root()
}

/// One host's result in a tree run; children's results nest under recursive masters.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct HostReport {
    pub(crate) name: String,
    pub(crate) dest: String,
    /// `changed`, `unchanged` or `failed`.
    pub(crate) status: String,
    pub(crate) reason: Option<String>,
    pub(crate) changes: Vec<corral_sync::planner::Item>,
    pub(crate) report: Option<corral_sync::proto::Report>,
    pub(crate) bytes_sent: u64,
    /// How file data was encoded, and why (absent when nothing was sent, or from an older
    /// corral).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) compression: Option<String>,
    pub(crate) children: Vec<HostReport>,
}

/// What a tree-level command needs from the site.
pub(crate) struct TreeCtx {
    pub(crate) tree: corral_site::Tree,
    pub(crate) children: Vec<corral_site::TreeChild>,
    pub(crate) recorder: Option<Recorder>,
}

pub(crate) fn load_tree_ctx(sel: &TreeSelect) -> anyhow::Result<TreeCtx> {
    let TreeSelect {
        tree: name,
        site: SiteArg { site },
        hosts,
        all,
        db,
        jobs: _,
    } = sel;
    let all = *all;
    let tree = corral_site::load_tree(site, name).map_err(|problems| {
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        bad_input(format!(
            "tree {name:?} in {}: {}; fix it and check with `corral site check --site {}`",
            site.display(),
            text.join("; "),
            site.display()
        ))
    })?;
    if !all && hosts.is_empty() {
        return Err(bad_input(format!(
            "say which children: -s HOST (repeatable) or --all; tree {name} has: {}",
            tree.children
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let children: Vec<corral_site::TreeChild> = if all {
        tree.children.clone()
    } else {
        let mut v = Vec::new();
        for h in hosts {
            let c = tree
                .children
                .iter()
                .find(|c| c.name == *h || c.host.as_deref() == Some(h))
                .ok_or_else(|| bad_input(format!("tree {name} has no child {h:?}")))?;
            v.push(c.clone());
        }
        v
    };
    let db = db.clone().or_else(|| {
        corral_site::Site::load(site)
            .ok()
            .map(|s| s.store.path.clone())
    });
    let recorder = match db {
        Some(p) => match Recorder::open(&p, RecorderConfig::default()) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!(
                    "corral: warning: audit store {}: {e}; events not recorded",
                    p.display()
                );
                None
            }
        },
        None => None,
    };
    Ok(TreeCtx {
        tree,
        children,
        recorder,
    })
}

pub(crate) fn child_dest(c: &corral_site::TreeChild) -> Dest {
    match &c.host {
        Some(h) if h != "local" => Dest::Ssh {
            host: h.clone(),
            path: c.dest.clone(),
        },
        _ => Dest::Local(PathBuf::from(&c.dest)),
    }
}

/// [`tree_ssh`] for one child: its receiver keeps its state where the tree file says
/// (`[[child]] state_dir`, passed as `corral sync serve --state-dir`).
pub(crate) fn child_ssh(t: &corral_site::Tree, c: &corral_site::TreeChild) -> SshOptions {
    SshOptions {
        remote_state_dir: c.state_dir.clone(),
        ..tree_ssh(t)
    }
}

/// The hash cache of a local child's receiver (at `root`): in the child's `state_dir` when
/// the tree file gives one, else in this machine's state directory.
pub(crate) fn child_cache(c: &corral_site::TreeChild, root: &Path) -> PathBuf {
    match &c.state_dir {
        Some(d) => corral_sync::scan::cache_in(Path::new(d), root),
        None => corral_sync::scan::default_cache(root),
    }
}

pub(crate) fn tree_ssh(t: &corral_site::Tree) -> SshOptions {
    SshOptions {
        program: t.ssh_program.clone(),
        args: t.ssh_args.clone(),
        remote_corral: t.remote_corral.clone(),
        remote_state_dir: None,
        persist: Some(
            t.ssh_persist
                .unwrap_or(corral_sync::transport::DEFAULT_SSH_PERSIST),
        ),
    }
}

pub(crate) fn child_filter(
    t: &corral_site::Tree,
    c: &corral_site::TreeChild,
    delete_excluded: bool,
) -> anyhow::Result<Box<dyn PathFilter>> {
    let files: Vec<PathBuf> = t.filter.iter().chain(c.filter.iter()).cloned().collect();
    build_filter(&files, &[], delete_excluded, &t.source)
}

/// Runs `f` for each child, `jobs` at a time, and returns results in the children's order.
pub(crate) fn parallel<T: Send>(
    children: &[corral_site::TreeChild],
    jobs: usize,
    f: impl Fn(&corral_site::TreeChild) -> T + Sync,
) -> Vec<T> {
    let next = Mutex::new(0usize);
    let out: Mutex<Vec<Option<T>>> = Mutex::new((0..children.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, children.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    if i >= children.len() {
                        break;
                    }
                    let r = f(&children[i]);
                    out.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                }
            });
        }
    });
    out.into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
        .collect()
}

pub(crate) fn record(rec: &Option<Recorder>, ev: Event) {
    if let Some(r) = rec {
        r.record(ev);
    }
}

pub(crate) fn now() -> UnixMillis {
    UnixMillis::from_system_time(std::time::SystemTime::now())
}

fn run_tree(a: RunArgs, global: &Global) -> anyhow::Result<Code> {
    if let Some(b) = &a.backup_dir {
        check_backup_dir(b)?;
    }
    let ctx = load_tree_ctx(&a.sel)?;
    let tree = &ctx.tree;
    if !tree.source.is_dir() {
        return Err(bad_input(format!(
            "tree {}: source {} is not a directory",
            tree.name,
            tree.source.display()
        )));
    }
    let backup = a.backup_dir.clone().or_else(|| tree.backup_dir.clone());
    let id = run_id();
    let delete = a.delete || tree.delete;
    let quiet = global.quiet || a.json;
    let results = parallel(&ctx.children, a.sel.jobs, |c| {
        let dest = child_dest(c);
        let mut rep = HostReport {
            name: c.name.clone(),
            dest: dest.to_string(),
            status: "failed".into(),
            reason: None,
            changes: Vec::new(),
            report: None,
            bytes_sent: 0,
            compression: None,
            children: Vec::new(),
        };
        let r = (|| -> anyhow::Result<PushResult> {
            let filter = child_filter(tree, c, false)?;
            let opts = PushOptions {
                plan: corral_sync::planner::PlanOptions {
                    delete,
                    numeric_ids: false,
                    ignore_owner: !rustix_is_root(),
                },
                dry_run: a.dry_run,
                run: RunOptions {
                    backup: backup.clone().map(|d| (d, id.clone())),
                    ..RunOptions::default()
                },
                cache: Some(corral_sync::scan::default_cache(&tree.source)),
                compress: a.compress.unwrap_or(match tree.compress {
                    corral_site::TreeCompress::Auto => Compress::Auto,
                    corral_site::TreeCompress::Always => Compress::Always,
                    corral_site::TreeCompress::Never => Compress::Never,
                }),
            };
            let serve_opts = match &dest {
                Dest::Local(p) => {
                    fs_err::create_dir_all(p)?;
                    ServeOptions {
                        cache: Some(child_cache(c, p)),
                        no_fsync: false,
                    }
                }
                Dest::Ssh { .. } => ServeOptions::default(),
            };
            let mut view = ProgressView::new(&c.name, quiet || a.sel.jobs > 1 || a.dry_run);
            let r = push_to(
                &tree.source,
                &dest,
                &child_ssh(tree, c),
                serve_opts,
                filter.as_ref(),
                &opts,
                &mut |p| view.on(p),
            );
            view.finish();
            Ok(r?)
        })();
        match r {
            Ok(r) => {
                rep.bytes_sent = r.bytes_out;
                rep.compression = r.compression.last.map(|_| r.compression.to_string());
                rep.changes = r.plan.items.clone();
                if r.report.failed.is_empty() {
                    rep.status = if r.plan.items.is_empty() {
                        "unchanged"
                    } else {
                        "changed"
                    }
                    .into();
                } else {
                    rep.reason = Some(format!(
                        "{} step(s) failed, first: {}: {}",
                        r.report.failed.len(),
                        r.report.failed[0].0,
                        r.report.failed[0].1
                    ));
                }
                rep.report = Some(r.report);
                if a.recursive && c.recurse && rep.status != "failed" {
                    match recurse(c, tree, &a) {
                        Ok(kids) => rep.children = kids,
                        Err(e) => {
                            rep.status = "failed".into();
                            rep.reason = Some(format!("recursive run on {}: {e:#}", c.name));
                        }
                    }
                }
            }
            Err(e) => rep.reason = Some(format!("{e:#}")),
        }
        let outcome = if rep.status == "failed" {
            Outcome::Fail
        } else {
            Outcome::Ok
        };
        let mut ev = Event::new(
            now(),
            Source::Sync,
            if a.dry_run { "sync_preview" } else { "sync" },
            outcome,
            format!(
                "tree {} to {} ({}): {}{}",
                tree.name,
                rep.name,
                rep.dest,
                rep.status,
                rep.reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        )
        .with_hostname(rep.name.clone());
        ev.details = serde_json::json!({"tree": tree.name, "run_id": id, "changes": rep.changes.len(), "bytes_sent": rep.bytes_sent});
        record(&ctx.recorder, ev);
        rep
    });
    if let Some(r) = &ctx.recorder {
        let _ = r.flush();
    }
    let failed = count_failed(&results);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "tree": tree.name, "run_id": id, "dry_run": a.dry_run, "hosts": results
            }))?
        );
    } else {
        print_reports(&results, 0, a.dry_run);
        if backup.is_some() && !a.dry_run {
            println!("run id {id}");
        }
    }
    Ok(if failed == 0 {
        Code::Success
    } else {
        Code::Runtime
    })
}

fn count_failed(r: &[HostReport]) -> usize {
    r.iter()
        .map(|h| usize::from(h.status == "failed") + count_failed(&h.children))
        .sum()
}

fn print_reports(r: &[HostReport], depth: usize, dry: bool) {
    let pad = "  ".repeat(depth);
    for h in r {
        let what = match h.status.as_str() {
            "failed" => format!("failed: {}", h.reason.as_deref().unwrap_or("?")),
            s => format!(
                "{s} ({} change(s), {} bytes sent)",
                h.changes.len(),
                h.bytes_sent
            ),
        };
        println!("{pad}{}: {what}", h.name);
        if dry {
            for i in &h.changes {
                println!("{pad}  {}", i.line());
            }
        }
        print_reports(&h.children, depth + 1, dry);
    }
}

/// Runs the child's own tree on the child (`corral sync run TREE --all --recursive --json`),
/// through ssh for a remote child or directly for a local one, and returns its hosts. The
/// child's `state_dir` from the tree file is its `CORRAL_STATE_DIR` for that run too (its own
/// hash cache and ssh connections as a master live beside its receiver's cache).
fn recurse(
    c: &corral_site::TreeChild,
    tree: &corral_site::Tree,
    a: &RunArgs,
) -> anyhow::Result<Vec<HostReport>> {
    let mut args: Vec<String> = vec![
        "sync".into(),
        "run".into(),
        c.tree.clone(),
        "--all".into(),
        "--recursive".into(),
        "--json".into(),
        "-q".into(),
        "--jobs".into(),
        a.sel.jobs.to_string(),
    ];
    if let Some(s) = &c.site {
        args.push("--site".into());
        args.push(s.clone());
    }
    if a.dry_run {
        args.push("--dry-run".into());
    }
    if a.delete {
        args.push("--delete".into());
    }
    if let Some(b) = &a.backup_dir {
        args.push("--backup-dir".into());
        args.push(b.clone());
    }
    let out = match child_dest(c) {
        Dest::Local(_) => {
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            if let Some(d) = &c.state_dir {
                cmd.env("CORRAL_STATE_DIR", d);
            }
            cmd.args(&args).output()?
        }
        Dest::Ssh { host, .. } => {
            let corral = tree
                .remote_corral
                .clone()
                .unwrap_or_else(|| "corral".into());
            // ssh passes no environment: set it on the remote command line.
            let env = c.state_dir.iter().flat_map(|d| {
                [
                    "env".to_string(),
                    corral_sync::transport::sh_quote(&format!("CORRAL_STATE_DIR={d}")),
                ]
            });
            let line = env
                .chain(std::iter::once(corral))
                .chain(args.iter().map(|s| corral_sync::transport::sh_quote(s)))
                .collect::<Vec<_>>()
                .join(" ");
            corral_sync::transport::ssh_command(&tree_ssh(tree), &host, &line).output()?
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "no report from the child's run (exit {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    Ok(serde_json::from_value(v["hosts"].clone())?)
}
