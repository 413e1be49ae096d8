//! `corral drift TREE`: compare children with their master by content and report drift.

use corral_model::{Event, Outcome, Source};
use corral_sync::proto::RunOptions;
use corral_sync::session::{PushOptions, ServeOptions};
use corral_sync::transport::{Dest, push_to};
use serde::Serialize;

use crate::cli::Global;
use crate::cmd::sync::{
    TreeSelect, child_cache, child_dest, child_filter, child_ssh, load_tree_ctx, now, parallel,
    record,
};
use crate::exit::{Code, bad_input};

/// Arguments of `corral drift`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Each child is compared with the master by content (BLAKE3), not only size and mtime: an
edit whose mtime was put back is found (the hash caches on both ends are keyed by inode,
size, mtime and ctime, so only files whose metadata changed are read again). Setuid and
executable changes are listed first. Every child's result is an event in the audit store
(source drift).

Exit status: 0 no drift; 4 drift found (every child was compared); 1 a child could not be
compared (the report says which; this wins over 4, since an unchecked child may hide drift);
3 bad tree file.

Examples:
  corral drift web --all                 nightly check of every child
  corral drift web -s web01 --json       one child, machine-readable
  corral drift os --all || mail -s drift root < /dev/null")]
pub(crate) struct Args {
    #[command(flatten)]
    sel: TreeSelect,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DriftReport {
    name: String,
    dest: String,
    /// `clean`, `drift` or `failed`.
    status: String,
    reason: Option<String>,
    changed: Vec<corral_sync::planner::Item>,
    added: Vec<corral_sync::planner::Item>,
    removed: Vec<corral_sync::planner::Item>,
}

pub(crate) fn run(a: Args, _global: &Global) -> anyhow::Result<Code> {
    let ctx = load_tree_ctx(&a.sel)?;
    let tree = &ctx.tree;
    if !tree.source.is_dir() {
        return Err(bad_input(format!(
            "tree {}: source {} is not a directory",
            tree.name,
            tree.source.display()
        )));
    }
    let results = parallel(&ctx.children, a.sel.jobs, |c| {
        let dest = child_dest(c);
        let mut rep = DriftReport {
            name: c.name.clone(),
            dest: dest.to_string(),
            status: "failed".into(),
            reason: None,
            changed: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
        };
        let r = (|| -> anyhow::Result<_> {
            let filter = child_filter(tree, c, false)?;
            let opts = PushOptions {
                plan: corral_sync::planner::PlanOptions {
                    delete: true,
                    numeric_ids: false,
                    ignore_owner: !corral_testkit::is_root(),
                },
                dry_run: true,
                run: RunOptions::default(),
                cache: Some(corral_sync::scan::default_cache(&tree.source)),
                compress: corral_sync::compression::Compress::Auto,
            };
            let serve_opts = match &dest {
                Dest::Local(p) => ServeOptions {
                    cache: Some(child_cache(c, p)),
                    no_fsync: true,
                },
                Dest::Ssh { .. } => ServeOptions::default(),
            };
            Ok(push_to(
                &tree.source,
                &dest,
                &child_ssh(tree, c),
                serve_opts,
                filter.as_ref(),
                &opts,
                &mut |_| {},
            )?)
        })();
        match r {
            Ok(r) => {
                let mut items = r.plan.items;
                // Security-relevant changes first, then by path.
                items.sort_by_key(|i| !i.security);
                for i in items {
                    if i.new.is_none() {
                        rep.added.push(i); // on the child only
                    } else if i.old.is_none() {
                        rep.removed.push(i); // missing on the child
                    } else {
                        rep.changed.push(i);
                    }
                }
                let n = rep.changed.len() + rep.added.len() + rep.removed.len();
                rep.status = if n == 0 { "clean" } else { "drift" }.into();
            }
            Err(e) => rep.reason = Some(format!("{e:#}")),
        }
        let (outcome, reason) = match rep.status.as_str() {
            "clean" => (
                Outcome::Ok,
                format!("tree {}: {} matches the master", tree.name, rep.name),
            ),
            "drift" => (
                Outcome::Warn,
                format!(
                    "tree {}: {} drifted: {} changed, {} added, {} removed{}",
                    tree.name,
                    rep.name,
                    rep.changed.len(),
                    rep.added.len(),
                    rep.removed.len(),
                    if rep.changed.iter().any(|i| i.security) {
                        " (setuid/executable changes)"
                    } else {
                        ""
                    }
                ),
            ),
            _ => (
                Outcome::Fail,
                format!(
                    "tree {}: {} not compared: {}",
                    tree.name,
                    rep.name,
                    rep.reason.as_deref().unwrap_or("?")
                ),
            ),
        };
        let mut ev = Event::new(now(), Source::Drift, "drift", outcome, reason)
            .with_hostname(rep.name.clone());
        ev.details = serde_json::json!({
            "tree": tree.name,
            "changed": rep.changed.iter().map(|i| i.line()).collect::<Vec<_>>(),
            "added": rep.added.iter().map(|i| i.line()).collect::<Vec<_>>(),
            "removed": rep.removed.iter().map(|i| i.line()).collect::<Vec<_>>(),
        });
        record(&ctx.recorder, ev);
        rep
    });
    if let Some(r) = &ctx.recorder {
        let _ = r.flush();
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"tree": tree.name, "hosts": results})
            )?
        );
    } else {
        for h in &results {
            match h.status.as_str() {
                "clean" => println!("{}: no drift", h.name),
                "drift" => {
                    println!(
                        "{}: DRIFT: {} changed, {} added, {} removed",
                        h.name,
                        h.changed.len(),
                        h.added.len(),
                        h.removed.len()
                    );
                    for i in &h.changed {
                        let flag = if i.security { " [setuid/exec]" } else { "" };
                        println!("  changed {}{flag}", i.line());
                    }
                    for i in &h.added {
                        println!("  added   {}", i.path);
                    }
                    for i in &h.removed {
                        println!("  removed {}", i.path);
                    }
                }
                _ => println!("{}: FAILED: {}", h.name, h.reason.as_deref().unwrap_or("?")),
            }
        }
    }
    Ok(if results.iter().any(|h| h.status == "failed") {
        Code::Runtime
    } else if results.iter().any(|h| h.status == "drift") {
        Code::Differences
    } else {
        Code::Success
    })
}
