//! The `dhcp_leases` table (schema version 2): the DHCP server's bindings, kept across
//! restarts.
//!
//! One row per address. The DHCP driver writes batches of changes in one transaction
//! ([`Store::write_leases`]). A client told "ACK" must find its lease again after a power
//! loss: the driver makes each change durable in its own lease journal before the ACK and
//! brings this table up to date behind it (fsyncing the WAL itself, or with
//! `synchronous = FULL`, [`Store::set_durable`]), replaying the journal here on start.

use std::net::Ipv4Addr;

use corral_model::{MacAddr, UnixMillis};
use rusqlite::{Row, params};

use crate::{Result, Store, StoreError};

/// The state of a stored lease (the DHCP layer's states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseStatus {
    /// Offered, not yet acknowledged (normally not stored).
    Offered,
    /// Acknowledged; the client holds the address until `expires`.
    Bound,
    /// Ran out; remembered so the client gets the same address back.
    Expired,
    /// Given back by the client.
    Released,
    /// Declined by the client (in use by someone else): quarantined until `expires`.
    Declined,
}

impl LeaseStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseStatus::Offered => "offered",
            LeaseStatus::Bound => "bound",
            LeaseStatus::Expired => "expired",
            LeaseStatus::Released => "released",
            LeaseStatus::Declined => "declined",
        }
    }

    /// Parses [`LeaseStatus::as_str`].
    pub fn parse(s: &str) -> Option<LeaseStatus> {
        Some(match s {
            "offered" => LeaseStatus::Offered,
            "bound" => LeaseStatus::Bound,
            "expired" => LeaseStatus::Expired,
            "released" => LeaseStatus::Released,
            "declined" => LeaseStatus::Declined,
            _ => return None,
        })
    }
}

/// One row of `dhcp_leases`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredLease {
    /// The address (the key).
    pub ip: Ipv4Addr,
    /// Who holds or last held it.
    pub mac: MacAddr,
    /// Its state.
    pub state: LeaseStatus,
    /// When the state ends.
    pub expires: UnixMillis,
    /// The client's host name, when known.
    pub hostname: Option<String>,
    /// When the row was last written.
    pub updated: UnixMillis,
}

/// One change to `dhcp_leases`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseWrite {
    /// Insert or replace the row of `lease.ip`.
    Upsert(StoredLease),
    /// Delete the row of this address.
    Remove(Ipv4Addr),
}

const COLUMNS: &str = "ip, mac, state, expires_ms, hostname, updated_ms";

impl Store {
    /// Makes every commit on this connection durable (`PRAGMA synchronous = FULL`: the WAL is
    /// fsynced at each commit), or back to the default `NORMAL` (durable across process
    /// crashes only).
    pub fn set_durable(&self, durable: bool) -> Result<()> {
        self.exec(if durable {
            "PRAGMA synchronous = FULL"
        } else {
            "PRAGMA synchronous = NORMAL"
        })
    }

    /// Stops this connection from checkpointing the WAL inside its own commits
    /// (`wal_autocheckpoint = 0`); the DHCP lease writer does this so that no ACK waits for a
    /// checkpoint, and runs [`Store::checkpoint_passive`] from another connection instead.
    pub fn disable_auto_checkpoint(&self) -> Result<()> {
        self.exec("PRAGMA wal_autocheckpoint = 0")
    }

    /// Copies committed WAL frames into the database without blocking writers
    /// (`wal_checkpoint(PASSIVE)`), so that the next commit can restart the WAL from its
    /// beginning (overwriting, not appending, which makes each commit's fsync cheaper).
    /// Returns the frames in the WAL and the frames checkpointed.
    pub fn checkpoint_passive(&self) -> Result<(i64, i64)> {
        let sql = "PRAGMA wal_checkpoint(PASSIVE)";
        self.conn
            .query_row(sql, [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
            .map_err(self.sql_err(sql))
    }

    /// Applies `writes` in one transaction (all or nothing).
    pub fn write_leases(&self, writes: &[LeaseWrite]) -> Result<()> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.sql_err("BEGIN"))?;
        let upsert = "INSERT INTO dhcp_leases (ip, mac, state, expires_ms, hostname, updated_ms) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                      ON CONFLICT(ip) DO UPDATE SET mac = excluded.mac, state = excluded.state, \
                        expires_ms = excluded.expires_ms, hostname = excluded.hostname, \
                        updated_ms = excluded.updated_ms";
        let delete = "DELETE FROM dhcp_leases WHERE ip = ?1";
        {
            let mut up = tx.prepare_cached(upsert).map_err(self.sql_err(upsert))?;
            let mut del = tx.prepare_cached(delete).map_err(self.sql_err(delete))?;
            for w in writes {
                match w {
                    LeaseWrite::Upsert(l) => up
                        .execute(params![
                            l.ip.to_string(),
                            l.mac.to_string(),
                            l.state.as_str(),
                            l.expires.0,
                            l.hostname,
                            l.updated.0
                        ])
                        .map_err(self.sql_err(upsert))?,
                    LeaseWrite::Remove(ip) => del
                        .execute(params![ip.to_string()])
                        .map_err(self.sql_err(delete))?,
                };
            }
        }
        tx.commit().map_err(self.sql_err("COMMIT"))?;
        Ok(())
    }

    /// Every stored lease, by address.
    pub fn leases(&self) -> Result<Vec<StoredLease>> {
        let sql = format!("SELECT {COLUMNS} FROM dhcp_leases ORDER BY ip");
        self.query_leases(&sql, [])
    }

    /// The leases of one MAC (normally one; more after a move between networks).
    pub fn leases_of(&self, mac: MacAddr) -> Result<Vec<StoredLease>> {
        let sql =
            format!("SELECT {COLUMNS} FROM dhcp_leases WHERE mac = ?1 ORDER BY updated_ms DESC");
        self.query_leases(&sql, [mac.to_string()])
    }

    fn query_leases(&self, sql: &str, p: impl rusqlite::Params) -> Result<Vec<StoredLease>> {
        let mut st = self.conn.prepare(sql).map_err(self.sql_err(sql))?;
        let rows = st.query_map(p, raw).map_err(self.sql_err(sql))?;
        let mut out = Vec::new();
        for r in rows {
            let r = r.map_err(self.sql_err(sql))?;
            out.push(r.into_lease().map_err(|what| StoreError::Invalid {
                path: self.path.clone(),
                table: "dhcp_leases",
                what,
            })?);
        }
        Ok(out)
    }
}

struct RawLease {
    ip: String,
    mac: String,
    state: String,
    expires: i64,
    hostname: Option<String>,
    updated: i64,
}

fn raw(r: &Row<'_>) -> rusqlite::Result<RawLease> {
    Ok(RawLease {
        ip: r.get(0)?,
        mac: r.get(1)?,
        state: r.get(2)?,
        expires: r.get(3)?,
        hostname: r.get(4)?,
        updated: r.get(5)?,
    })
}

impl RawLease {
    fn into_lease(self) -> std::result::Result<StoredLease, String> {
        Ok(StoredLease {
            ip: self
                .ip
                .parse()
                .map_err(|_| format!("bad ip {:?}", self.ip))?,
            mac: self
                .mac
                .parse()
                .map_err(|_| format!("bad mac {:?}", self.mac))?,
            state: LeaseStatus::parse(&self.state)
                .ok_or_else(|| format!("bad state {:?}", self.state))?,
            expires: UnixMillis(self.expires),
            hostname: self.hostname,
            updated: UnixMillis(self.updated),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(ip: u8, state: LeaseStatus) -> StoredLease {
        StoredLease {
            ip: Ipv4Addr::new(10, 0, 0, ip),
            mac: MacAddr([2, 0, 0, 0, 0, ip]),
            state,
            expires: UnixMillis(5000),
            hostname: Some(format!("h{ip}")),
            updated: UnixMillis(1000),
        }
    }

    #[test]
    fn write_read_replace_remove() {
        let s = Store::open_in_memory().unwrap();
        s.write_leases(&[
            LeaseWrite::Upsert(lease(1, LeaseStatus::Bound)),
            LeaseWrite::Upsert(lease(2, LeaseStatus::Declined)),
        ])
        .unwrap();
        assert_eq!(
            s.leases().unwrap(),
            vec![
                lease(1, LeaseStatus::Bound),
                lease(2, LeaseStatus::Declined)
            ]
        );
        s.write_leases(&[
            LeaseWrite::Upsert(lease(1, LeaseStatus::Released)),
            LeaseWrite::Remove(Ipv4Addr::new(10, 0, 0, 2)),
        ])
        .unwrap();
        assert_eq!(s.leases().unwrap(), vec![lease(1, LeaseStatus::Released)]);
        assert_eq!(s.leases_of(MacAddr([2, 0, 0, 0, 0, 1])).unwrap().len(), 1);
    }

    #[test]
    fn durable_file_keeps_leases_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.db");
        {
            let s = Store::open(&p).unwrap();
            s.set_durable(true).unwrap();
            s.write_leases(&[LeaseWrite::Upsert(lease(9, LeaseStatus::Bound))])
                .unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), crate::schema::latest_version());
        assert_eq!(s.leases().unwrap(), vec![lease(9, LeaseStatus::Bound)]);
    }
}
