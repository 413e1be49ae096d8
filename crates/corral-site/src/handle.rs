//! Hot reload: a cheap-to-clone handle holding the current site, swapped atomically.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::Overrides;
use crate::error::SiteError;
use crate::problem::Problem;
use crate::site::Site;

/// The state of a site directory's files: path, modification time and size of `site.toml`,
/// every entry of `profiles/` and `machines/`, and the iPXE templates the site uses.
///
/// Comparing two fingerprints is how a driver polls for edits without parsing anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint {
    entries: Vec<(PathBuf, Option<SystemTime>, u64)>,
}

impl Fingerprint {
    /// Scans `dir` (not the templates: see [`Fingerprint::with_files`]). Never fails: an
    /// unreadable entry is recorded as such, which is itself a state that can change.
    pub fn scan(dir: &Path) -> Fingerprint {
        let mut entries = Vec::new();
        let mut add = |p: PathBuf| {
            let m = p.metadata().ok();
            let mtime = m.as_ref().and_then(|m| m.modified().ok());
            entries.push((p, mtime, m.map_or(u64::MAX, |m| m.len())));
        };
        add(dir.join("site.toml"));
        for sub in ["profiles", "machines"] {
            let d = dir.join(sub);
            add(d.clone());
            if let Ok(rd) = fs_err::read_dir(&d) {
                let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
                names.sort();
                names.into_iter().for_each(&mut add);
            }
        }
        Fingerprint { entries }
    }

    /// This fingerprint plus the state of `files`.
    pub fn with_files(mut self, files: &[PathBuf]) -> Fingerprint {
        for p in files {
            let m = p.metadata().ok();
            let mtime = m.as_ref().and_then(|m| m.modified().ok());
            self.entries
                .push((p.clone(), mtime, m.map_or(u64::MAX, |m| m.len())));
        }
        self
    }

    /// The files this fingerprint covers.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.entries.iter().map(|e| e.0.as_path())
    }
}

/// What [`SiteHandle::reload`] did.
#[derive(Debug, Clone)]
pub enum ReloadOutcome {
    /// Nothing changed on disk since the last attempt ([`SiteHandle::reload_if_changed`] only).
    Unchanged,
    /// The new site is now current.
    Swapped {
        /// The site that was current before.
        previous: Arc<Site>,
        /// The site now current.
        current: Arc<Site>,
        /// Its warnings.
        warnings: Vec<Problem>,
    },
}

/// A shared, cheaply cloned handle to the current site.
///
/// Readers call [`SiteHandle::current`] and keep the `Arc<Site>` for as long as one decision
/// takes, so a reload never changes the site under a running request. A reload swaps only a
/// *valid* new site in; an invalid edit leaves the last good site in force.
#[derive(Debug, Clone)]
pub struct SiteHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    overrides: Overrides,
    current: ArcSwap<Site>,
    /// The directory state of the last load attempt, good or bad, so that a broken edit is
    /// not re-parsed on every poll.
    attempted: Mutex<Fingerprint>,
}

impl SiteHandle {
    /// Loads `dir`, applies `overrides` (flags beat the file), and holds the result.
    pub fn open(dir: impl AsRef<Path>, overrides: Overrides) -> Result<SiteHandle, SiteError> {
        let dir = dir.as_ref().to_owned();
        let site = Site::load(&dir)?.with_overrides(&overrides)?;
        let fp = site.fingerprint().clone();
        Ok(SiteHandle {
            inner: Arc::new(Inner {
                dir,
                overrides,
                current: ArcSwap::from_pointee(site),
                attempted: Mutex::new(fp),
            }),
        })
    }

    /// The site directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The site in force now.
    pub fn current(&self) -> Arc<Site> {
        self.inner.current.load_full()
    }

    /// True when the directory differs from the last load attempt (cheap: metadata only).
    pub fn changed(&self) -> bool {
        let templates: Vec<PathBuf> = self.templates();
        let now = Fingerprint::scan(&self.inner.dir).with_files(&templates);
        *self.attempted() != now
    }

    fn templates(&self) -> Vec<PathBuf> {
        let site = self.current();
        site.profiles()
            .filter_map(|p| p.boot.as_ref()?.ipxe_template.as_ref())
            .map(|t| site.dir().join(&t.path))
            .collect()
    }

    fn attempted(&self) -> std::sync::MutexGuard<'_, Fingerprint> {
        // A poisoned lock only means another thread panicked mid-update of a plain value.
        self.inner
            .attempted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the directory again. If it is valid, swaps it in atomically; if not, keeps the
    /// current site and returns [`SiteError::Invalid`] with every problem.
    pub fn reload(&self) -> Result<ReloadOutcome, SiteError> {
        let templates = self.templates();
        *self.attempted() = Fingerprint::scan(&self.inner.dir).with_files(&templates);
        let loaded =
            Site::load(&self.inner.dir).and_then(|s| s.with_overrides(&self.inner.overrides));
        let site = match loaded {
            Ok(site) => site,
            Err(e) => {
                tracing::warn!(
                    dir = %self.inner.dir.display(),
                    errors = e.problems().iter().filter(|p| p.is_error()).count(),
                    "site reload rejected; the last good site stays in force"
                );
                return Err(e);
            }
        };
        let warnings = site.warnings().to_vec();
        let current = Arc::new(site);
        let previous = self.inner.current.swap(current.clone());
        tracing::info!(
            dir = %self.inner.dir.display(),
            machines = current.machines().count(),
            profiles = current.profiles().count(),
            warnings = warnings.len(),
            "site reloaded"
        );
        Ok(ReloadOutcome::Swapped {
            previous,
            current,
            warnings,
        })
    }

    /// [`SiteHandle::reload`] if [`SiteHandle::changed`], else [`ReloadOutcome::Unchanged`].
    /// A driver calls this on a timer.
    pub fn reload_if_changed(&self) -> Result<ReloadOutcome, SiteError> {
        if self.changed() {
            self.reload()
        } else {
            Ok(ReloadOutcome::Unchanged)
        }
    }
}
