//! Versioned schema migrations.
//!
//! The database carries two numbers in its header: `PRAGMA application_id` =
//! [`APPLICATION_ID`] marks the file as a corral store (so a foreign SQLite file is recognised
//! and left alone), and `PRAGMA user_version` is the schema version: the number of the last
//! migration applied.
//!
//! # Adding a table (or a column, or an index)
//! 1. Append a [`Migration`] to [`MIGRATIONS`] with `version` = last version + 1, a short
//!    `name`, and its SQL (several statements separated by `;` are fine). Migrations run in one
//!    transaction each, in order, when [`crate::Store::open`] finds an older file.
//! 2. Put the typed methods in a new module of this crate (as `machine.rs` does for
//!    `machines`), and test them against [`crate::Store::open_in_memory`].
//! 3. Never edit or reorder a migration that has been committed: files in the field already
//!    carry its version. A corral that finds a version higher than it knows refuses the file
//!    ([`crate::StoreError::TooNew`]) rather than guess.

/// The `PRAGMA application_id` of a corral store: ASCII "CORR".
pub const APPLICATION_ID: i32 = 0x434f_5252;

/// One schema step.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The schema version this migration produces (1, 2, 3... without gaps).
    pub version: i64,
    /// A short description, shown in errors.
    pub name: &'static str,
    /// The statements to run.
    pub sql: &'static str,
}

/// Every migration, oldest first. Append only.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events and machines",
        sql: "
        CREATE TABLE events (
            id       INTEGER PRIMARY KEY,
            time_ms  INTEGER NOT NULL,
            source   TEXT NOT NULL,
            kind     TEXT NOT NULL,
            mac      TEXT,
            hostname TEXT,
            ip       TEXT,
            session  TEXT,
            outcome  TEXT NOT NULL,
            reason   TEXT NOT NULL,
            details  TEXT
        );
        CREATE INDEX events_time     ON events(time_ms);
        CREATE INDEX events_mac      ON events(mac) WHERE mac IS NOT NULL;
        CREATE INDEX events_hostname ON events(hostname) WHERE hostname IS NOT NULL;
        CREATE INDEX events_session  ON events(session) WHERE session IS NOT NULL;
        CREATE INDEX events_source   ON events(source, time_ms);

        CREATE TABLE machines (
            mac          TEXT PRIMARY KEY,
            hostname     TEXT,
            last_seen_ms INTEGER,
            last_ip      TEXT,
            state        TEXT,
            next_action  TEXT,
            updated_ms   INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX machines_hostname ON machines(hostname);
    ",
    },
    Migration {
        version: 2,
        name: "dhcp leases",
        sql: "
        CREATE TABLE dhcp_leases (
            ip         TEXT PRIMARY KEY,
            mac        TEXT NOT NULL,
            state      TEXT NOT NULL,
            expires_ms INTEGER NOT NULL,
            hostname   TEXT,
            updated_ms INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX dhcp_leases_mac ON dhcp_leases(mac);
    ",
    },
    Migration {
        version: 3,
        name: "machines by last IP",
        sql: "
        CREATE INDEX machines_last_ip ON machines(last_ip, last_seen_ms) WHERE last_ip IS NOT NULL;
    ",
    },
];

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_contiguous_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "migration {} out of order", m.name);
        }
    }
}
