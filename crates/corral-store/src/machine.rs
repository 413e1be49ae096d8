//! The `machines` table: what the store knows about each machine right now.

use std::net::IpAddr;

use corral_model::{LifecycleState, MacAddr, UnixMillis};
use rusqlite::{OptionalExtension, Row, params};

use crate::{Result, Store, StoreError};

/// One row of the `machines` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Machine {
    /// The machine's hardware address (the key).
    pub mac: MacAddr,
    /// Its hostname, when known.
    pub hostname: Option<String>,
    /// When it was last seen on the network.
    pub last_seen: Option<UnixMillis>,
    /// The IP address it last used.
    pub last_ip: Option<IpAddr>,
    /// Its lifecycle state, when one was set.
    pub state: Option<LifecycleState>,
    /// What its next boot will do, in words, when decided.
    pub next_action: Option<String>,
    /// When this row last changed.
    pub updated: UnixMillis,
}

const COLUMNS: &str = "mac, hostname, last_seen_ms, last_ip, state, next_action, updated_ms";

/// A change to one machine's row, for [`Store::update_machines`]. `None` fields leave the
/// stored value alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineUpdate {
    /// The machine.
    pub mac: MacAddr,
    /// When it was seen (sets `last_seen`).
    pub seen: Option<UnixMillis>,
    /// Its hostname.
    pub hostname: Option<String>,
    /// The IP address it used.
    pub ip: Option<IpAddr>,
    /// Its new lifecycle state.
    pub state: Option<LifecycleState>,
    /// What its next boot will do, in words.
    pub next_action: Option<String>,
    /// When the change was made (sets `updated`).
    pub now: UnixMillis,
}

impl MachineUpdate {
    /// An update of `mac` made at `now` that changes nothing else yet.
    pub fn new(mac: MacAddr, now: UnixMillis) -> Self {
        MachineUpdate {
            mac,
            seen: None,
            hostname: None,
            ip: None,
            state: None,
            next_action: None,
            now,
        }
    }

    /// Folds a later update of the same machine into this one: the later update's fields win
    /// where it has them.
    pub fn merge(&mut self, later: MachineUpdate) {
        debug_assert_eq!(self.mac, later.mac);
        let MachineUpdate {
            mac: _,
            seen,
            hostname,
            ip,
            state,
            next_action,
            now,
        } = later;
        self.seen = seen.or(self.seen);
        self.hostname = hostname.or(self.hostname.take());
        self.ip = ip.or(self.ip);
        self.state = state.or(self.state);
        self.next_action = next_action.or(self.next_action.take());
        self.now = self.now.max(now);
    }
}

impl Store {
    /// Records that `mac` was seen at `now`, creating its row if needed. A `None` hostname or
    /// IP keeps the previous value.
    pub fn touch_machine(
        &self,
        mac: MacAddr,
        hostname: Option<&str>,
        ip: Option<IpAddr>,
        now: UnixMillis,
    ) -> Result<()> {
        let sql = "INSERT INTO machines (mac, hostname, last_seen_ms, last_ip, updated_ms) \
                   VALUES (?1, ?2, ?3, ?4, ?3) \
                   ON CONFLICT(mac) DO UPDATE SET \
                     hostname = coalesce(excluded.hostname, hostname), \
                     last_seen_ms = excluded.last_seen_ms, \
                     last_ip = coalesce(excluded.last_ip, last_ip), \
                     updated_ms = excluded.updated_ms";
        self.conn
            .execute(
                sql,
                params![mac.to_string(), hostname, now.0, ip.map(|i| i.to_string())],
            )
            .map_err(self.sql_err(sql))?;
        Ok(())
    }

    /// Sets the lifecycle state of `mac`, creating its row if needed.
    pub fn set_machine_state(
        &self,
        mac: MacAddr,
        state: LifecycleState,
        now: UnixMillis,
    ) -> Result<()> {
        let sql = "INSERT INTO machines (mac, state, updated_ms) VALUES (?1, ?2, ?3) \
                   ON CONFLICT(mac) DO UPDATE SET state = excluded.state, \
                     updated_ms = excluded.updated_ms";
        self.conn
            .execute(sql, params![mac.to_string(), state.as_str(), now.0])
            .map_err(self.sql_err(sql))?;
        Ok(())
    }

    /// Sets the description of what the next boot of `mac` will do (`None` clears it).
    pub fn set_machine_next_action(
        &self,
        mac: MacAddr,
        next_action: Option<&str>,
        now: UnixMillis,
    ) -> Result<()> {
        let sql = "INSERT INTO machines (mac, next_action, updated_ms) VALUES (?1, ?2, ?3) \
                   ON CONFLICT(mac) DO UPDATE SET next_action = excluded.next_action, \
                     updated_ms = excluded.updated_ms";
        self.conn
            .execute(sql, params![mac.to_string(), next_action, now.0])
            .map_err(self.sql_err(sql))?;
        Ok(())
    }

    /// Applies `updates` in one transaction, in order (all or nothing).
    pub fn update_machines(&mut self, updates: &[MachineUpdate]) -> Result<()> {
        let sql = "INSERT INTO machines \
                     (mac, hostname, last_seen_ms, last_ip, state, next_action, updated_ms) \
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                   ON CONFLICT(mac) DO UPDATE SET \
                     hostname = coalesce(excluded.hostname, hostname), \
                     last_seen_ms = coalesce(excluded.last_seen_ms, last_seen_ms), \
                     last_ip = coalesce(excluded.last_ip, last_ip), \
                     state = coalesce(excluded.state, state), \
                     next_action = coalesce(excluded.next_action, next_action), \
                     updated_ms = excluded.updated_ms";
        let path = self.path.clone();
        let err = |e| StoreError::Sql {
            path: path.clone(),
            sql: sql.into(),
            source: e,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx.prepare_cached(sql).map_err(err)?;
            for u in updates {
                stmt.execute(params![
                    u.mac.to_string(),
                    u.hostname.as_deref(),
                    u.seen.map(|t| t.0),
                    u.ip.map(|i| i.to_string()),
                    u.state.map(|s| s.as_str()),
                    u.next_action.as_deref(),
                    u.now.0,
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// The row of `mac`, if the store knows it.
    pub fn machine(&self, mac: MacAddr) -> Result<Option<Machine>> {
        let sql = format!("SELECT {COLUMNS} FROM machines WHERE mac = ?1");
        self.conn
            .query_row(&sql, [mac.to_string()], |r| Ok(self.decode_machine(r)))
            .optional()
            .map_err(self.sql_err(&sql))?
            .transpose()
    }

    /// The machine last seen at `ip` (the most recently seen one if several were), through the
    /// `machines_last_ip` index: a lookup for an unknown address costs one index probe, not a
    /// scan of the fleet.
    pub fn machine_by_ip(&self, ip: IpAddr) -> Result<Option<Machine>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM machines WHERE last_ip = ?1 \
             ORDER BY last_seen_ms DESC LIMIT 1"
        );
        self.conn
            .query_row(&sql, [ip.to_string()], |r| Ok(self.decode_machine(r)))
            .optional()
            .map_err(self.sql_err(&sql))?
            .transpose()
    }

    /// Every known machine, ordered by MAC address.
    pub fn machines(&self) -> Result<Vec<Machine>> {
        let sql = format!("SELECT {COLUMNS} FROM machines ORDER BY mac");
        let mut stmt = self.conn.prepare(&sql).map_err(self.sql_err(&sql))?;
        let rows = stmt
            .query_map([], |r| Ok(self.decode_machine(r)))
            .map_err(self.sql_err(&sql))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(self.sql_err(&sql))??);
        }
        Ok(out)
    }

    fn decode_machine(&self, r: &Row<'_>) -> Result<Machine> {
        let bad = |column: &'static str, reason: String| StoreError::Decode {
            path: self.path.clone(),
            id: 0,
            column,
            reason,
        };
        let text = |i: usize, column: &'static str| {
            r.get::<_, Option<String>>(i)
                .map_err(|e| bad(column, e.to_string()))
        };
        let mac_text = text(0, "machines.mac")?.unwrap_or_default();
        Ok(Machine {
            mac: mac_text
                .parse()
                .map_err(|e: corral_model::MacParseError| bad("machines.mac", e.to_string()))?,
            hostname: text(1, "machines.hostname")?,
            last_seen: r
                .get::<_, Option<i64>>(2)
                .map_err(|e| bad("machines.last_seen_ms", e.to_string()))?
                .map(UnixMillis),
            last_ip: text(3, "machines.last_ip")?
                .map(|s| s.parse::<IpAddr>())
                .transpose()
                .map_err(|e| bad("machines.last_ip", e.to_string()))?,
            state: text(4, "machines.state")?
                .map(|s| s.parse::<LifecycleState>())
                .transpose()
                .map_err(|e| bad("machines.state", e.to_string()))?,
            next_action: text(5, "machines.next_action")?,
            updated: UnixMillis(
                r.get(6)
                    .map_err(|e| bad("machines.updated_ms", e.to_string()))?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Store;

    #[test]
    fn machine_by_ip_is_an_index_probe_not_a_scan() {
        let s = Store::open_in_memory().unwrap();
        let plan: String = s
            .conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT mac FROM machines WHERE last_ip = '10.0.0.7' \
                 ORDER BY last_seen_ms DESC LIMIT 1",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("machines_last_ip"), "query plan: {plan}");
    }
}
