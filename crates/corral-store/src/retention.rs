//! Retention: how much history the store keeps, enforced in small steps.

use std::time::Duration;

use corral_model::UnixMillis;

use crate::{Result, Store};

/// How much history to keep. `None` means no limit on that axis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete events older than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many of the newest events (by id).
    pub max_events: Option<u64>,
}

/// What one retention step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionStep {
    /// Events deleted by this step.
    pub deleted: u64,
    /// True when the step hit its chunk size, so more old events are probably waiting.
    pub more: bool,
}

impl Retention {
    /// True when neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.max_age.is_none() && self.max_events.is_none()
    }
}

impl Store {
    /// Deletes at most `chunk` events that `policy` no longer keeps, oldest first, in one
    /// short transaction. Call it repeatedly (between write batches) while
    /// [`RetentionStep::more`] is true; each call holds the write lock only briefly.
    pub fn enforce_retention(
        &mut self,
        policy: &Retention,
        now: UnixMillis,
        chunk: u32,
    ) -> Result<RetentionStep> {
        let mut deleted = 0u64;
        let mut budget = u64::from(chunk);
        if let Some(age) = policy.max_age {
            let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
            let cutoff = now.0.saturating_sub(age_ms);
            let sql = "DELETE FROM events WHERE id IN \
                       (SELECT id FROM events WHERE time_ms < ?1 ORDER BY time_ms LIMIT ?2)";
            let n = self
                .conn
                .execute(sql, rusqlite::params![cutoff, budget as i64])
                .map_err(self.sql_err(sql))? as u64;
            deleted += n;
            budget -= n.min(budget);
        }
        if let Some(max) = policy.max_events.filter(|_| budget > 0) {
            // Ids grow by one per insert and retention removes the oldest, so "the newest
            // `max` ids" is both exact in practice and cheap (no count(*) over the table).
            let last = self.last_event_id()?;
            let keep_from = last.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
            let sql = "DELETE FROM events WHERE id IN \
                       (SELECT id FROM events WHERE id <= ?1 ORDER BY id LIMIT ?2)";
            let n = self
                .conn
                .execute(sql, rusqlite::params![keep_from, budget as i64])
                .map_err(self.sql_err(sql))? as u64;
            deleted += n;
            budget -= n.min(budget);
        }
        Ok(RetentionStep {
            deleted,
            more: budget == 0 && chunk > 0,
        })
    }
}
