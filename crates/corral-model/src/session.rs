use std::fmt;
use std::str::FromStr;

use crate::ParseError;

/// Identifies one boot, one transfer or one sync run across protocols and events.
///
/// 64 random bits, shown as 16 lowercase hex digits. One boot keeps one id from its DHCP
/// DISCOVER through TFTP and HTTP, so `corral log --session ID` shows its whole timeline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// A fresh random id from the operating system's generator.
    pub fn random() -> Self {
        // getrandom only fails if the OS has no entropy source at all; a zero id is still a
        // valid (if unlucky) id, so there is nothing better to do than fall back to it.
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        SessionId(u64::from_be_bytes(b))
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
        assert_ne!(SessionId::random(), SessionId::random());
    }
}
