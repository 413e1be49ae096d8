use std::fmt;
use std::net::IpAddr;

use crate::{MacAddr, SessionId};

/// Milliseconds since the Unix epoch, UTC. The store's time axis.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    /// Converts a `SystemTime`; times before 1970 clamp to 0. Callers pass the time in, so
    /// sans-IO code never reads the clock itself.
    pub fn from_system_time(t: std::time::SystemTime) -> Self {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
    }
}

/// Which part of corral recorded an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The DHCP / ProxyDHCP server.
    Dhcp,
    /// The TFTP server.
    Tftp,
    /// The HTTP boot server and callbacks.
    Http,
    /// Multicast imaging.
    Cast,
    /// Tree synchronisation.
    Sync,
    /// Drift checks.
    Drift,
    /// The JSON API.
    Api,
    /// A command-line action by an operator.
    Cli,
    /// Messages received by the syslog listener.
    Syslog,
    /// Site directory loading and reloading.
    Site,
    /// The store itself (retention, dropped events).
    Store,
}

impl Source {
    /// Every source.
    pub const ALL: [Source; 11] = [
        Source::Dhcp,
        Source::Tftp,
        Source::Http,
        Source::Cast,
        Source::Sync,
        Source::Drift,
        Source::Api,
        Source::Cli,
        Source::Syslog,
        Source::Site,
        Source::Store,
    ];

    /// The lowercase name stored in the database and accepted by `corral log --source`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Dhcp => "dhcp",
            Source::Tftp => "tftp",
            Source::Http => "http",
            Source::Cast => "cast",
            Source::Sync => "sync",
            Source::Drift => "drift",
            Source::Api => "api",
            Source::Cli => "cli",
            Source::Syslog => "syslog",
            Source::Site => "site",
            Source::Store => "store",
        }
    }
}

crate::named_enum!(Source, "source");

/// How the action an event describes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It worked (an offer sent, a file served, a receiver verified).
    Ok,
    /// Informational: a decision or observation, neither success nor failure.
    Info,
    /// Something went wrong but the service carries on (a retry, a slow receiver).
    Warn,
    /// It failed (a transfer aborted, a receiver failed verification).
    Fail,
    /// The request was refused on purpose (path outside the root, bad signature).
    Denied,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Info,
        Outcome::Warn,
        Outcome::Fail,
        Outcome::Denied,
    ];

    /// The lowercase name stored in the database.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Info => "info",
            Outcome::Warn => "warn",
            Outcome::Fail => "fail",
            Outcome::Denied => "denied",
        }
    }
}

crate::named_enum!(Outcome, "outcome");

/// What happened, within a source: `offer`, `ack`, `read`, `receiver-joined`, `verified`...
///
/// A short lowercase word or dotted phrase chosen by the engine that records it. Engines define
/// their kinds as constants so that the spelling is in one place.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct EventKind(pub String);

impl EventKind {
    /// A kind from a static name.
    pub fn new(name: impl Into<String>) -> Self {
        EventKind(name.into())
    }

    /// The kind's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One audit record: something a corral engine did or decided, and why.
///
/// Built with [`Event::new`] and the `with_*` helpers:
///
/// ```
/// use corral_model::{Event, Outcome, Source, UnixMillis};
/// let ev = Event::new(UnixMillis(0), Source::Dhcp, "offer", Outcome::Ok,
///                     "matched machine web01, profile debian12, state install")
///     .with_mac("52:54:00:12:34:56".parse().unwrap())
///     .with_hostname("web01");
/// assert_eq!(ev.hostname.as_deref(), Some("web01"));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// When it happened.
    pub time: UnixMillis,
    /// Which engine recorded it.
    pub source: Source,
    /// What happened.
    pub kind: EventKind,
    /// The machine's hardware address, when known.
    pub mac: Option<MacAddr>,
    /// The machine's hostname, when known.
    pub hostname: Option<String>,
    /// The peer's IP address, when known.
    pub ip: Option<IpAddr>,
    /// The boot, transfer or run this event belongs to.
    pub session: Option<SessionId>,
    /// How it ended.
    pub outcome: Outcome,
    /// A sentence a person can read: the rule that matched, the file served, the error.
    pub reason: String,
    /// Structured details for tools (`serde_json::Value::Null` when none).
    pub details: serde_json::Value,
}

impl Event {
    /// A new event with no machine, IP, session or details.
    pub fn new(
        time: UnixMillis,
        source: Source,
        kind: impl Into<String>,
        outcome: Outcome,
        reason: impl Into<String>,
    ) -> Self {
        Event {
            time,
            source,
            kind: EventKind(kind.into()),
            mac: None,
            hostname: None,
            ip: None,
            session: None,
            outcome,
            reason: reason.into(),
            details: serde_json::Value::Null,
        }
    }

    /// Sets the machine's MAC address.
    pub fn with_mac(mut self, mac: MacAddr) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Sets the machine's hostname.
    pub fn with_hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = Some(name.into());
        self
    }

    /// Sets the peer's IP address.
    pub fn with_ip(mut self, ip: IpAddr) -> Self {
        self.ip = Some(ip);
        self
    }

    /// Sets the session.
    pub fn with_session(mut self, session: SessionId) -> Self {
        self.session = Some(session);
        self
    }

    /// Sets the structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_text() {
        for s in Source::ALL {
            assert_eq!(s.as_str().parse::<Source>(), Ok(s));
        }
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>(), Ok(o));
        }
        let err = "dhpc".parse::<Source>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown source \"dhpc\"; expected one of: dhcp, tftp, http, cast, sync, drift, \
             api, cli, syslog, site, store"
        );
        let err = "OK".parse::<Outcome>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown outcome \"OK\"; expected one of: ok, info, warn, fail, denied"
        );
        let err = "installing".parse::<crate::LifecycleState>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown lifecycle state \"installing\"; expected one of: new, discovered, \
             install, installed, local"
        );
    }

    #[test]
    fn event_serialises_to_json() {
        let ev = Event::new(
            UnixMillis(5),
            Source::Cast,
            "verified",
            Outcome::Ok,
            "all blocks ok",
        )
        .with_session(SessionId(1));
        let j = serde_json::to_value(&ev).unwrap();
        assert_eq!(j["source"], "cast");
        assert_eq!(j["session"], "0000000000000001");
        let back: Event = serde_json::from_value(j).unwrap();
        assert_eq!(back, ev);
    }
}
