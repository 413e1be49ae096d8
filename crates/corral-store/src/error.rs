//! The store's error type.

use std::path::PathBuf;

/// Everything that can go wrong opening, writing or reading the store.
///
/// Every variant names the file it concerns; SQL failures also carry the statement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file-system operation on the store's file or directory failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("creating directory", "reading header of", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A read-only open of a store that does not exist.
    #[error("no audit store at {path}")]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// The file exists but is not an SQLite database at all. It was left untouched.
    #[error("{path} is not an SQLite database (wrong file header); refusing to use or modify it")]
    NotSqlite {
        /// The file.
        path: PathBuf,
    },
    /// The file is an SQLite database that belongs to another application. It was left
    /// untouched.
    #[error(
        "{path} is an SQLite database of another application (application_id {application_id:#010x}, \
         {tables} table(s)), not a corral store; refusing to use or modify it"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The `PRAGMA application_id` found (0 when unset).
        application_id: i32,
        /// How many tables it holds.
        tables: i64,
    },
    /// The file claims to be SQLite but cannot be read. It was left untouched.
    #[error("{path} is corrupt or unreadable as SQLite; refusing to use or modify it: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The store was written by a newer corral with a schema this one does not know.
    #[error(
        "{path} has store schema version {found}, but this corral only knows up to version \
         {supported}; upgrade corral (the file was left untouched)"
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// The schema version in the file.
        found: i64,
        /// The newest schema version this build knows.
        supported: i64,
    },
    /// Applying a schema migration failed; the transaction was rolled back.
    #[error("migrating {path} to schema version {version} ({name}) failed: {source}")]
    Migration {
        /// The file.
        path: PathBuf,
        /// The version being applied.
        version: i64,
        /// The migration's name.
        name: &'static str,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// An SQL statement failed.
    #[error("{path}: SQL failed: {source}\n  statement: {sql}")]
    Sql {
        /// The file (`:memory:` for in-memory stores).
        path: PathBuf,
        /// The statement, or a short description of it.
        sql: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// An ad-hoc statement would write; only reading statements run on a read-only store.
    #[error(
        "the store is opened read-only: {keyword} statements are refused; use SELECT (or WITH, \
         EXPLAIN, VALUES, or a PRAGMA that only reads)\n  statement: {sql}"
    )]
    ReadOnly {
        /// The statement's first keyword, upper-cased.
        keyword: String,
        /// The refused statement.
        sql: String,
    },
    /// A stored row does not parse back into an event (edited by hand, or a bug).
    #[error("{path}: event {id} is invalid in column {column}: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The row id.
        id: i64,
        /// The offending column.
        column: &'static str,
        /// Why it did not parse.
        reason: String,
    },
    /// A stored DHCP lease does not parse back (edited by hand, or a bug).
    #[error("{path}: a row of {table} is invalid: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// What is wrong with it.
        what: String,
    },
    /// The recorder's writer thread has stopped (after [`crate::Recorder::shutdown`] or a
    /// panic).
    #[error("the store's writer thread for {path} has stopped")]
    WriterStopped {
        /// The file.
        path: PathBuf,
    },
}

impl StoreError {
    /// True when the user's input is wrong — the file is missing, foreign, corrupt or too new,
    /// or an ad-hoc statement would write — as opposed to a runtime failure.
    pub fn is_bad_file(&self) -> bool {
        matches!(
            self,
            StoreError::NotFound { .. }
                | StoreError::NotSqlite { .. }
                | StoreError::Foreign { .. }
                | StoreError::Corrupt { .. }
                | StoreError::TooNew { .. }
                | StoreError::ReadOnly { .. }
        )
    }
}
