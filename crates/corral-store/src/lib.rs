//! The audit store: every event and machine state in an embedded SQLite database.
//!
//! corral records what every engine did or decided — a DHCP offer and the rule that matched, a
//! TFTP read refused, a cast receiver that failed verification — as typed rows
//! ([`corral_model::Event`]) in one SQLite file, so that an operator can ask ad hoc questions
//! later ("when did I last see web01?", "what happened in session 0123…?") with
//! `corral log` or plain SQL.
//!
//! # Entry types
//! - [`Store`]: one connection to the database file. [`Store::open`] creates and migrates it;
//!   [`Store::open_read_only`] and [`Store::query_sql`] only read.
//! - [`Recorder`]: the cheap, cloneable, never-blocking handle that network code uses to record
//!   events. A dedicated writer thread inserts them in batches and enforces [`Retention`].
//! - [`EventFilter`] / [`StoredEvent`]: queries over the `events` table.
//! - [`Machine`]: the `machines` table (last seen, last IP, lifecycle state).
//! - [`StoredLease`] / [`LeaseWrite`]: the `dhcp_leases` table (schema 2), written in durable
//!   batches by the DHCP server ([`Store::write_leases`], [`Store::set_durable`]).
//! - [`StoreError`]: every failure, with the path and SQL it concerns.
//!
//! # What it is not
//! - Not a log sink: human log lines go through `tracing`; the store holds typed audit rows.
//! - Not a guaranteed-delivery queue: when the writer falls behind, [`Recorder::record`] drops
//!   the event rather than stall a network path, *counts* it ([`Recorder::dropped`]), warns,
//!   and records a `store`/`dropped` event saying how many were lost.
//! - Not a network service: other processes read the same file (SQLite WAL allows one writer
//!   and many concurrent readers).
//! - Not a tolerant opener: a foreign, corrupt or newer-version file is refused and never
//!   modified ([`StoreError::Foreign`], [`StoreError::Corrupt`], [`StoreError::TooNew`]).
//!
//! # Adding a table
//! Schema changes are versioned migrations in `schema.rs` (see [`schema::MIGRATIONS`]): append
//! a [`schema::Migration`] with the next version number and its SQL, then add a module with
//! the typed methods on [`Store`] (as `machine.rs` does for `machines`). Never edit a migration
//! that has shipped.

mod error;
mod event;
mod lease;
mod machine;
mod recorder;
mod retention;
pub mod schema;
mod sql;
mod store;

pub use error::StoreError;
pub use event::{EventFilter, StoredEvent};
pub use lease::{LeaseStatus, LeaseWrite, StoredLease};
pub use machine::{Machine, MachineUpdate};
pub use recorder::{Recorder, RecorderConfig};
pub use retention::{Retention, RetentionStep};
pub use sql::SqlRows;
pub use store::Store;

/// Results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
