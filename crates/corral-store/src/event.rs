//! The `events` table: inserting events and querying them back.

use std::net::IpAddr;

use corral_model::{Event, EventKind, MacAddr, Outcome, SessionId, Source, UnixMillis};
use rusqlite::types::Value;
use rusqlite::{Row, Transaction, params};

use crate::{Result, Store, StoreError};

const INSERT_SQL: &str = "INSERT INTO events \
    (time_ms, source, kind, mac, hostname, ip, session, outcome, reason, details) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

const SELECT_COLUMNS: &str =
    "id, time_ms, source, kind, mac, hostname, ip, session, outcome, reason, details";

/// An event as stored, with its row id.
///
/// Ids grow in insertion order; they are the cursor for `corral log --follow`
/// ([`EventFilter::after_id`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StoredEvent {
    /// The row id (1, 2, 3... in insertion order).
    pub id: i64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// Which events to return. Every field narrows the result; the default returns everything.
///
/// Results are ordered oldest first (by id, i.e. insertion order); [`EventFilter::limit`]
/// keeps the *last* (newest) N, like `tail -n`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    /// A machine, by MAC address (any spelling `MacAddr` parses) or exact hostname.
    pub machine: Option<String>,
    /// Only events from this source.
    pub source: Option<Source>,
    /// Only events of this kind.
    pub kind: Option<String>,
    /// Only events of this session.
    pub session: Option<SessionId>,
    /// Only events at or after this time.
    pub since: Option<UnixMillis>,
    /// Only events before this time.
    pub until: Option<UnixMillis>,
    /// Only events with an id greater than this.
    pub after_id: Option<i64>,
    /// Keep only the newest N matching events.
    pub limit: Option<usize>,
    /// Only events with this outcome.
    pub outcome: Option<Outcome>,
}

impl EventFilter {
    /// Builds the WHERE clause and its parameters.
    fn where_clause(&self) -> (String, Vec<Value>) {
        let mut terms: Vec<String> = Vec::new();
        let mut params: Vec<Value> = Vec::new();
        let mut push = |term: &str, vals: Vec<Value>| {
            // Number each `?` so that parameters bind by position.
            let mut vals = vals.into_iter();
            let mut t = String::with_capacity(term.len() + 4);
            for c in term.chars() {
                t.push(c);
                if c != '?' {
                    continue;
                }
                let Some(v) = vals.next() else { continue };
                params.push(v);
                t.push_str(&params.len().to_string());
            }
            terms.push(t);
        };
        if let Some(m) = &self.machine {
            match m.parse::<MacAddr>() {
                Ok(mac) => push(
                    "(mac = ? OR hostname = ?)",
                    vec![Value::Text(mac.to_string()), Value::Text(m.clone())],
                ),
                Err(_) => push("hostname = ?", vec![Value::Text(m.clone())]),
            }
        }
        if let Some(s) = self.source {
            push("source = ?", vec![Value::Text(s.as_str().into())]);
        }
        if let Some(k) = &self.kind {
            push("kind = ?", vec![Value::Text(k.clone())]);
        }
        if let Some(s) = self.session {
            push("session = ?", vec![Value::Text(s.to_string())]);
        }
        if let Some(t) = self.since {
            push("time_ms >= ?", vec![Value::Integer(t.0)]);
        }
        if let Some(t) = self.until {
            push("time_ms < ?", vec![Value::Integer(t.0)]);
        }
        if let Some(id) = self.after_id {
            push("id > ?", vec![Value::Integer(id)]);
        }
        if let Some(o) = self.outcome {
            push("outcome = ?", vec![Value::Text(o.as_str().into())]);
        }
        let clause = if terms.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", terms.join(" AND "))
        };
        (clause, params)
    }
}

impl Store {
    /// Inserts one event in its own transaction and returns its id.
    ///
    /// Slow under load (one commit per event); the [`crate::Recorder`] batches instead.
    pub fn insert_event(&mut self, event: &Event) -> Result<i64> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| StoreError::Sql {
            path: path.clone(),
            sql: "BEGIN".into(),
            source: e,
        })?;
        insert_in(&tx, &path, event)?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(|e| StoreError::Sql {
            path,
            sql: "COMMIT".into(),
            source: e,
        })?;
        Ok(id)
    }

    /// Inserts many events in one transaction: all or none.
    pub fn insert_events<'a>(&mut self, events: impl IntoIterator<Item = &'a Event>) -> Result<()> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| StoreError::Sql {
            path: path.clone(),
            sql: "BEGIN".into(),
            source: e,
        })?;
        {
            // One prepared statement for the whole batch.
            let mut stmt = tx.prepare_cached(INSERT_SQL).map_err(|e| StoreError::Sql {
                path: path.clone(),
                sql: INSERT_SQL.into(),
                source: e,
            })?;
            for ev in events {
                execute_insert(&mut stmt, &path, ev)?;
            }
        }
        tx.commit().map_err(|e| StoreError::Sql {
            path,
            sql: "COMMIT".into(),
            source: e,
        })
    }

    /// The events matching `filter`, oldest first.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<StoredEvent>> {
        let (clause, params) = filter.where_clause();
        let sql = match filter.limit {
            // Newest N, then flipped back to oldest-first below.
            Some(n) => format!(
                "SELECT {SELECT_COLUMNS} FROM events{clause} ORDER BY id DESC LIMIT {}",
                i64::try_from(n).unwrap_or(i64::MAX)
            ),
            None => format!("SELECT {SELECT_COLUMNS} FROM events{clause} ORDER BY id"),
        };
        let mut stmt = self.conn.prepare_cached(&sql).map_err(self.sql_err(&sql))?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(self.sql_err(&sql))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql_err(&sql))? {
            out.push(self.decode(row, &sql)?);
        }
        if filter.limit.is_some() {
            out.reverse();
        }
        Ok(out)
    }

    /// The number of events stored.
    pub fn event_count(&self) -> Result<i64> {
        let sql = "SELECT count(*) FROM events";
        self.conn
            .query_row(sql, [], |r| r.get(0))
            .map_err(self.sql_err(sql))
    }

    /// The highest event id, or 0 when there are none.
    pub fn last_event_id(&self) -> Result<i64> {
        let sql = "SELECT coalesce(max(id), 0) FROM events";
        self.conn
            .query_row(sql, [], |r| r.get(0))
            .map_err(self.sql_err(sql))
    }

    fn decode(&self, row: &Row<'_>, sql: &str) -> Result<StoredEvent> {
        let id: i64 = row.get(0).map_err(self.sql_err(sql))?;
        let bad = |column: &'static str, reason: String| StoreError::Decode {
            path: self.path.clone(),
            id,
            column,
            reason,
        };
        let text = |i: usize, column: &'static str| -> Result<Option<String>> {
            row.get::<_, Option<String>>(i)
                .map_err(|e| bad(column, e.to_string()))
        };
        let required = |i: usize, column: &'static str| -> Result<String> {
            text(i, column)?.ok_or_else(|| bad(column, "is NULL".into()))
        };
        let time: i64 = row.get(1).map_err(|e| bad("time_ms", e.to_string()))?;
        let source: Source = required(2, "source")?
            .parse()
            .map_err(|e: corral_model::ParseError| bad("source", e.to_string()))?;
        let kind = EventKind(required(3, "kind")?);
        let mac = text(4, "mac")?
            .map(|s| s.parse::<MacAddr>())
            .transpose()
            .map_err(|e| bad("mac", e.to_string()))?;
        let hostname = text(5, "hostname")?;
        let ip = text(6, "ip")?
            .map(|s| s.parse::<IpAddr>())
            .transpose()
            .map_err(|e| bad("ip", e.to_string()))?;
        let session = text(7, "session")?
            .map(|s| s.parse::<SessionId>())
            .transpose()
            .map_err(|e| bad("session", e.to_string()))?;
        let outcome: Outcome = required(8, "outcome")?
            .parse()
            .map_err(|e: corral_model::ParseError| bad("outcome", e.to_string()))?;
        let reason = required(9, "reason")?;
        let details = match text(10, "details")? {
            None => serde_json::Value::Null,
            Some(s) => serde_json::from_str(&s).map_err(|e| bad("details", e.to_string()))?,
        };
        Ok(StoredEvent {
            id,
            event: Event {
                time: UnixMillis(time),
                source,
                kind,
                mac,
                hostname,
                ip,
                session,
                outcome,
                reason,
                details,
            },
        })
    }
}

/// Inserts one event inside an open transaction.
pub(crate) fn insert_in(tx: &Transaction<'_>, path: &std::path::Path, ev: &Event) -> Result<()> {
    let mut stmt = tx.prepare_cached(INSERT_SQL).map_err(|e| StoreError::Sql {
        path: path.to_path_buf(),
        sql: INSERT_SQL.into(),
        source: e,
    })?;
    execute_insert(&mut stmt, path, ev)
}

fn execute_insert(
    stmt: &mut rusqlite::CachedStatement<'_>,
    path: &std::path::Path,
    ev: &Event,
) -> Result<()> {
    let details = if ev.details.is_null() {
        None
    } else {
        Some(ev.details.to_string())
    };
    stmt.execute(params![
        ev.time.0,
        ev.source.as_str(),
        ev.kind.as_str(),
        ev.mac.map(|m| m.to_string()),
        ev.hostname.as_deref(),
        ev.ip.map(|ip| ip.to_string()),
        ev.session.map(|s| s.to_string()),
        ev.outcome.as_str(),
        ev.reason.as_str(),
        details,
    ])
    .map_err(|e| StoreError::Sql {
        path: path.to_path_buf(),
        sql: INSERT_SQL.into(),
        source: e,
    })?;
    Ok(())
}
