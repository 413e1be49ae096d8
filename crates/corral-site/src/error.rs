//! The crate's error type.

use std::path::PathBuf;

use crate::problem::Problem;

/// Why a site could not be loaded, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The directory has errors; `problems` lists every one (and the warnings).
    #[error("site directory {} is invalid: {} error(s), {} warning(s)", dir.display(), count(problems, true), count(problems, false))]
    Invalid {
        /// The site directory.
        dir: PathBuf,
        /// Every problem found, errors and warnings, in file order.
        problems: Vec<Problem>,
    },
    /// `init` was pointed at a directory that already has files.
    #[error("{} is not empty; use --force to write the example anyway (existing example files are overwritten)", dir.display())]
    NotEmpty {
        /// The directory.
        dir: PathBuf,
    },
    /// Writing a file (by `init`) failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn count(problems: &[Problem], errors: bool) -> usize {
    problems.iter().filter(|p| p.is_error() == errors).count()
}

impl SiteError {
    /// The problems, for [`SiteError::Invalid`]; empty otherwise.
    pub fn problems(&self) -> &[Problem] {
        match self {
            SiteError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}
