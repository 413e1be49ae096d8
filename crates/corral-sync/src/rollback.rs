//! `corral sync rollback RUN`: puts back what a run replaced or deleted (kept under its backup
//! directory) and removes what it created.

use std::path::Path;

use crate::apply::JOURNAL;
use crate::error::SyncError;

/// What a rollback did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RollbackReport {
    /// Paths put back.
    pub restored: u64,
    /// Paths the run had created, removed.
    pub removed: u64,
}

fn io<'a>(op: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> SyncError + 'a {
    move |e| SyncError::fs(op, p, e)
}

/// Restores run `run` of the tree at `root` whose backups are in `root/backup_dir/run`.
pub fn rollback(root: &Path, backup_dir: &str, run: &str) -> Result<RollbackReport, SyncError> {
    let base = root.join(backup_dir).join(run);
    let journal = base.join(JOURNAL);
    if !journal.exists() {
        return Err(SyncError::NoSuchRun(run.to_string(), root.join(backup_dir)));
    }
    let text = fs_err::read_to_string(&journal).map_err(io("read", &journal))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| SyncError::fs("parse", &journal, std::io::Error::other(e)))?;
    let mut rep = RollbackReport::default();
    let created: Vec<String> = v["created"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    // Deepest first so directories are empty when their turn comes.
    let mut created = created;
    created.sort_by(|a, b| crate::manifest::path_order(b, a));
    for c in created {
        if !crate::manifest::check_rel_path(&c) || c.is_empty() {
            continue;
        }
        let p = root.join(&c);
        if let Ok(md) = std::fs::symlink_metadata(&p) {
            if md.is_dir() {
                if base.join(&c).exists() {
                    continue; // replaced a directory that the backup restores below
                }
                let _ = std::fs::remove_dir_all(&p);
            } else {
                std::fs::remove_file(&p).map_err(io("remove", &p))?;
            }
            rep.removed += 1;
        }
    }
    restore(&base, root, "", &mut rep)?;
    Ok(rep)
}

fn restore(base: &Path, root: &Path, rel: &str, rep: &mut RollbackReport) -> Result<(), SyncError> {
    let dir = base.join(rel);
    for de in fs_err::read_dir(&dir).map_err(io("read dir", &dir))? {
        let de = de.map_err(io("read dir", &dir))?;
        let name = de.file_name();
        let Some(name) = name.to_str() else { continue };
        if rel.is_empty() && name == JOURNAL {
            continue;
        }
        let r = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let from = base.join(&r);
        let to = root.join(&r);
        let from_dir = std::fs::symlink_metadata(&from)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        match std::fs::symlink_metadata(&to) {
            Ok(m) if m.is_dir() && from_dir => restore(base, root, &r, rep)?,
            Ok(m) => {
                if m.is_dir() {
                    fs_err::remove_dir_all(&to).map_err(io("remove", &to))?;
                }
                fs_err::rename(&from, &to).map_err(io("restore", &to))?;
                rep.restored += 1;
            }
            Err(_) => {
                if let Some(p) = to.parent() {
                    fs_err::create_dir_all(p).map_err(io("create", p))?;
                }
                fs_err::rename(&from, &to).map_err(io("restore", &to))?;
                rep.restored += 1;
            }
        }
    }
    Ok(())
}
