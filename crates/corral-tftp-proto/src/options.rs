//! Option negotiation: [RFC 2347](https://www.rfc-editor.org/rfc/rfc2347) (OACK),
//! [RFC 2348](https://www.rfc-editor.org/rfc/rfc2348) (`blksize`),
//! [RFC 2349](https://www.rfc-editor.org/rfc/rfc2349) (`timeout`, `tsize`) and
//! [RFC 7440](https://www.rfc-editor.org/rfc/rfc7440) (`windowsize`).
//!
//! Option names are case-insensitive; unknown options are ignored (RFC 2347 §2: "the server
//! ... may simply ignore" options it does not support), and a repeated option keeps its first
//! value. A *known* option with a value outside its RFC range is refused with error 8, which
//! RFC 2347 reserves for refused negotiation: answering with a silently different transfer
//! would be worse.

use std::time::Duration;

use crate::error::OptionError;
use crate::packet::{DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE};

/// The options a client asked for, parsed and range-checked, before the server's limits apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// `blksize` (RFC 2348), 8..=65464 (larger values are clamped to 65464).
    pub blksize: Option<u16>,
    /// `tsize` (RFC 2349): in a read request the client sends 0 and wants the size back.
    pub tsize: Option<u64>,
    /// `timeout` in seconds (RFC 2349), 1..=255.
    pub timeout: Option<u8>,
    /// `windowsize` (RFC 7440), 1..=65535.
    pub windowsize: Option<u16>,
    /// Options this server does not know, in wire order (ignored, kept for the logs).
    pub unknown: Vec<(String, String)>,
}

fn number(name: &'static str, value: &str, allowed: &'static str) -> Result<u64, OptionError> {
    let bad = || OptionError::InvalidValue {
        name,
        value: value.chars().take(32).collect(),
        allowed,
    };
    // Plain decimal digits only: no sign, no spaces, no hex (RFC 2347 values are ASCII digits).
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse::<u64>().map_err(|_| bad())
}

impl RequestOptions {
    /// Parses the option pairs of a request.
    pub fn parse(pairs: &[(String, String)]) -> Result<RequestOptions, OptionError> {
        let mut o = RequestOptions::default();
        for (name, value) in pairs {
            let lname = name.to_ascii_lowercase();
            match lname.as_str() {
                "blksize" if o.blksize.is_none() => {
                    let n = number("blksize", value, "8..=65464")?;
                    if n < u64::from(MIN_BLKSIZE) {
                        return Err(OptionError::InvalidValue {
                            name: "blksize",
                            value: value.clone(),
                            allowed: "8..=65464",
                        });
                    }
                    // RFC 2348 bounds it at 65464; a larger request is answered with the
                    // largest size allowed rather than refused.
                    o.blksize = Some(n.min(u64::from(MAX_BLKSIZE)) as u16);
                }
                "tsize" if o.tsize.is_none() => {
                    o.tsize = Some(number("tsize", value, "a decimal byte count")?);
                }
                "timeout" if o.timeout.is_none() => {
                    let n = number("timeout", value, "1..=255")?;
                    if !(1..=255).contains(&n) {
                        return Err(OptionError::InvalidValue {
                            name: "timeout",
                            value: value.clone(),
                            allowed: "1..=255",
                        });
                    }
                    o.timeout = Some(n as u8);
                }
                "windowsize" if o.windowsize.is_none() => {
                    let n = number("windowsize", value, "1..=65535")?;
                    if !(1..=65535).contains(&n) {
                        return Err(OptionError::InvalidValue {
                            name: "windowsize",
                            value: value.clone(),
                            allowed: "1..=65535",
                        });
                    }
                    o.windowsize = Some(n as u16);
                }
                "blksize" | "tsize" | "timeout" | "windowsize" => {} // repeated: first wins
                _ => o.unknown.push((name.clone(), value.clone())),
            }
        }
        Ok(o)
    }

    /// True when the client asked for at least one option this server understands, so the
    /// answer starts with an OACK.
    pub fn any_known(&self) -> bool {
        self.blksize.is_some()
            || self.tsize.is_some()
            || self.timeout.is_some()
            || self.windowsize.is_some()
    }
}

/// What the server allows; the negotiation clamps the client's wishes to these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest block size granted (RFC 2348 allows up to 65464).
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440).
    pub max_windowsize: u16,
    /// Retransmit timeout when the client does not ask for one.
    pub timeout: Duration,
    /// Retransmissions of one packet or window before giving up.
    pub retries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_blksize: 1468,
            max_windowsize: 64,
            timeout: Duration::from_secs(1),
            retries: 5,
        }
    }
}

/// The parameters a transfer runs with, and the OACK that announces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Block size in bytes.
    pub blksize: u16,
    /// Blocks sent before waiting for an ACK.
    pub windowsize: u16,
    /// Retransmit timeout.
    pub timeout: Duration,
    /// Retransmissions before giving up.
    pub retries: u32,
    /// The OACK options, in the order of the request; empty means "no OACK, send DATA 1".
    pub oack: Vec<(String, String)>,
}

impl Negotiated {
    /// Applies `limits` to the client's options; `size` is the file size if known (for tsize).
    pub fn new(opts: &RequestOptions, limits: &Limits, size: Option<u64>) -> Negotiated {
        let max_blksize = limits.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
        let max_window = limits.max_windowsize.max(1);
        let mut n = Negotiated {
            blksize: DEFAULT_BLKSIZE,
            windowsize: 1,
            timeout: limits.timeout,
            retries: limits.retries,
            oack: Vec::new(),
        };
        // RFC 2347 does not fix an order; answer in a stable one.
        if let Some(b) = opts.blksize {
            n.blksize = b.min(max_blksize);
            n.oack.push(("blksize".into(), n.blksize.to_string()));
        }
        if let (Some(_), Some(size)) = (opts.tsize, size) {
            n.oack.push(("tsize".into(), size.to_string()));
        }
        if let Some(t) = opts.timeout {
            n.timeout = Duration::from_secs(u64::from(t));
            n.oack.push(("timeout".into(), t.to_string()));
        }
        if let Some(w) = opts.windowsize {
            n.windowsize = w.min(max_window);
            n.oack.push(("windowsize".into(), n.windowsize.to_string()));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    // RFC 2347 §2: option names are case-insensitive; unknown options are ignored.
    #[test]
    fn rfc2347_s2_names_case_insensitive_unknown_ignored() {
        let o = RequestOptions::parse(&pairs(&[
            ("BLKSIZE", "1024"),
            ("multicast", ""),
            ("x", "1"),
        ]))
        .unwrap();
        assert_eq!(o.blksize, Some(1024));
        assert_eq!(o.unknown.len(), 2);
        let n = Negotiated::new(&o, &Limits::default(), Some(10));
        assert_eq!(n.oack, pairs(&[("blksize", "1024")]));
    }

    // RFC 2347 §2: with no known option the server answers plainly (no OACK).
    #[test]
    fn rfc2347_s2_no_known_option_no_oack() {
        let o = RequestOptions::parse(&pairs(&[("foo", "bar")])).unwrap();
        assert!(!o.any_known());
        assert!(
            Negotiated::new(&o, &Limits::default(), Some(1))
                .oack
                .is_empty()
        );
    }

    // RFC 2348: valid blksize 8..=65464; the server may answer with a smaller one.
    #[test]
    fn rfc2348_blksize_range_and_clamp() {
        assert!(RequestOptions::parse(&pairs(&[("blksize", "7")])).is_err());
        assert!(RequestOptions::parse(&pairs(&[("blksize", "abc")])).is_err());
        assert!(RequestOptions::parse(&pairs(&[("blksize", "-1")])).is_err());
        assert!(RequestOptions::parse(&pairs(&[("blksize", "")])).is_err());
        let o = RequestOptions::parse(&pairs(&[("blksize", "99999999")])).unwrap();
        assert_eq!(o.blksize, Some(65464));
        let n = Negotiated::new(&o, &Limits::default(), None);
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.oack, pairs(&[("blksize", "1468")]));
        let o = RequestOptions::parse(&pairs(&[("blksize", "8")])).unwrap();
        assert_eq!(Negotiated::new(&o, &Limits::default(), None).blksize, 8);
    }

    // RFC 2349 §"Transfer Size": in a RRQ tsize is 0 and the OACK carries the size.
    #[test]
    fn rfc2349_tsize_answered_with_size() {
        let o = RequestOptions::parse(&pairs(&[("tsize", "0")])).unwrap();
        let n = Negotiated::new(&o, &Limits::default(), Some(123456));
        assert_eq!(n.oack, pairs(&[("tsize", "123456")]));
        // Unknown size: the option is left out of the OACK.
        assert!(
            Negotiated::new(&o, &Limits::default(), None)
                .oack
                .is_empty()
        );
        assert!(RequestOptions::parse(&pairs(&[("tsize", "0x10")])).is_err());
    }

    // RFC 2349 §"Timeout Interval": 1..=255 seconds, echoed.
    #[test]
    fn rfc2349_timeout_range() {
        assert!(RequestOptions::parse(&pairs(&[("timeout", "0")])).is_err());
        assert!(RequestOptions::parse(&pairs(&[("timeout", "256")])).is_err());
        let o = RequestOptions::parse(&pairs(&[("timeout", "3")])).unwrap();
        let n = Negotiated::new(&o, &Limits::default(), None);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(n.oack, pairs(&[("timeout", "3")]));
    }

    // RFC 7440 §3: windowsize 1..=65535; the server may answer with a smaller one.
    #[test]
    fn rfc7440_s3_windowsize_range_and_clamp() {
        assert!(RequestOptions::parse(&pairs(&[("windowsize", "0")])).is_err());
        assert!(RequestOptions::parse(&pairs(&[("windowsize", "65536")])).is_err());
        let o = RequestOptions::parse(&pairs(&[("windowsize", "1000")])).unwrap();
        let n = Negotiated::new(&o, &Limits::default(), None);
        assert_eq!(n.windowsize, 64);
        assert_eq!(n.oack, pairs(&[("windowsize", "64")]));
    }

    #[test]
    fn repeated_option_keeps_first() {
        let o = RequestOptions::parse(&pairs(&[("blksize", "1024"), ("blksize", "x")])).unwrap();
        assert_eq!(o.blksize, Some(1024));
    }
}
