//! The audit store: every event and machine state in an embedded SQLite database.
