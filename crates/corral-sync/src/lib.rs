//! Tree synchronisation for corral: keeps children identical to a master, through tiers.
//!
//! What it is: a manifest of a tree ([`scan`]: parallel walk with rayon, BLAKE3 hashes,
//! FastCDC chunks for files over 1 MiB, a hash cache keyed by inode, size, mtime and ctime),
//! a pure [`planner`] (master manifest + child manifest + filter → steps and an rsync-style
//! change list), a receiver that applies steps confined beneath its root ([`apply`]: `openat2`
//! with `RESOLVE_BENEATH`, temp file + rename for every file, copy-on-write clone of a large
//! file's unchanged chunks, in-place updates of large files behind an undo [`journal`],
//! backup and rollback), and the wire protocol ([`proto`]) between the
//! master and `corral sync serve --stdio` (the child lists only the [`ranges`] of its manifest
//! that differ from the master's; small changed files travel as [`delta`]s against
//! the child's old copy), over a local socket pair or the system `ssh`
//! ([`transport`]). Whether file data is compressed is decided per run by measuring both
//! ways ([`compression`]).
//!
//! What it is not: an rsync protocol implementation (it does not talk to rsync), and not the
//! filter-rule engine (rsync-compatible rules live in `corral-sync-filter` and plug in through
//! [`filter::PathFilter`]).
//!
//! Entry points: [`scan::scan`], [`planner::plan`], [`session::push`], [`session::serve`],
//! [`transport::connect`], [`rollback::rollback`], [`journal::recover`].

pub mod apply;
pub mod compression;
pub mod delta;
mod direct;
pub mod error;
pub mod filter;
pub mod journal;
pub mod manifest;
mod owner;
pub mod planner;
pub mod proto;
pub mod ranges;
pub mod rollback;
pub mod scan;
pub mod session;
pub mod transport;

pub use error::{ProtoError, SyncError};
