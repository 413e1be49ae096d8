use std::fmt;
use std::str::FromStr;

use crate::ParseError;

/// Identifies one boot, one transfer or one sync run across protocols and events.
///
/// 64 bits, shown as 16 lowercase hex digits: the upper 32 bits are the Unix time in seconds
/// when the session began, the lower 32 are random. One boot keeps one id from its DHCP
/// DISCOVER through TFTP and HTTP, so `corral log --session ID` shows its whole timeline.
///
/// Time first, so ids sort by start time and new ids land at the end of the store's session
/// index instead of at random pages of it (with fully random ids the audit writer spent half its
/// time on index page misses; see `crates/corral-store/examples/store_bench.rs`). Two sessions
/// begun in the same second collide with probability 2^-32 per pair.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// A fresh id for a session beginning now: the clock's seconds plus 32 bits from the
    /// operating system's random generator.
    pub fn new() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // getrandom only fails if the OS has no entropy source at all; the time part still
        // keeps ids of different seconds apart, so there is nothing better to do than go on.
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        SessionId::from_parts(secs as u32, u32::from_be_bytes(b))
    }

    /// The id made of `unix_secs` (truncated to 32 bits, wrapping in 2106) and `low`.
    pub const fn from_parts(unix_secs: u32, low: u32) -> Self {
        SessionId(((unix_secs as u64) << 32) | low as u64)
    }

    /// The Unix second (modulo 2^32) in which the session began.
    pub const fn started_secs(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl Default for SessionId {
    fn default() -> Self {
        SessionId::new()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl FromStr for SessionId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 {
            return Err(ParseError::SessionId(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(SessionId)
            .map_err(|_| ParseError::SessionId(s.to_owned()))
    }
}

impl serde::Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = SessionId(0x0123_4567_89ab_cdef);
        assert_eq!(id.to_string(), "0123456789abcdef");
        assert_eq!("0123456789abcdef".parse::<SessionId>(), Ok(id));
        assert!("0123".parse::<SessionId>().is_err());
        assert!("0123456789abcdeg".parse::<SessionId>().is_err());
        assert_ne!(SessionId::new(), SessionId::new());
    }

    #[test]
    fn new_ids_are_time_ordered() {
        let id = SessionId::from_parts(0x6500_0000, 0xdead_beef);
        assert_eq!(id.to_string(), "65000000deadbeef");
        assert_eq!(id.started_secs(), 0x6500_0000);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32;
        let a = SessionId::new();
        assert!(a.started_secs().abs_diff(now) <= 1, "{a}");
        assert!(SessionId::from_parts(now + 1, 0) > SessionId::from_parts(now, u32::MAX));
    }
}
