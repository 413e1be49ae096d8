use std::fmt;
use std::str::FromStr;

/// An Ethernet (EUI-48) hardware address.
///
/// Displayed as lowercase, colon separated (`52:54:00:12:34:56`). Parsing accepts `:`, `-` or
/// `.`-grouped forms and bare 12 hex digits, in either case, because operators paste MACs from
/// switches, BIOS screens and spreadsheets.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {input:?}: expected six hex byte pairs like 52:54:00:12:34:56")]
pub struct MacParseError {
    /// The rejected text.
    pub input: String,
}

impl MacAddr {
    /// The broadcast address `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// The six octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for group (multicast or broadcast) addresses, which never identify one machine.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Dash-separated form used for per-MAC file names (`52-54-00-12-34-56`), as PXELINUX does.
    pub fn dashed(&self) -> String {
        let o = self.0;
        format!(
            "{:02x}-{:02x}-{:02x}-{:02x}-{:02x}-{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError {
            input: s.to_owned(),
        };
        let hex: String = s
            .chars()
            .filter(|c| !matches!(c, ':' | '-' | '.'))
            .collect();
        if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err());
        }
        // Separators, if any, must group the digits evenly (pairs, or Cisco's dotted quads).
        let seps: Vec<usize> = s
            .char_indices()
            .filter(|(_, c)| matches!(c, ':' | '-' | '.'))
            .map(|(i, _)| i)
            .collect();
        let ok_layout = seps.is_empty()
            || (seps.len() == 5 && seps.iter().enumerate().all(|(k, &i)| i == 2 + 3 * k))
            || (seps.len() == 2 && seps == [4, 9]);
        if !ok_layout {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(MacAddr(out))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_spellings() {
        let want = MacAddr([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        for s in [
            "52:54:00:ab:cd:ef",
            "52-54-00-AB-CD-EF",
            "5254.00ab.cdef",
            "525400abcdef",
        ] {
            assert_eq!(s.parse::<MacAddr>(), Ok(want), "{s}");
        }
        assert_eq!(want.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(want.dashed(), "52-54-00-ab-cd-ef");
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:00:ab:cd:eg",
            "5:254:00:ab:cd:ef",
            "52::5400:ab:cd:ef",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn multicast_bit() {
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!(
            !"52:54:00:00:00:01"
                .parse::<MacAddr>()
                .unwrap()
                .is_multicast()
        );
    }
}
