//! Syslog messages from installers: a parser for RFC 3164 (BSD) and RFC 5424 datagrams.
//!
//! Hand-written because only the header matters here (priority, host, app, message) and the
//! crates on crates.io either format rather than parse or pull in a date library for the
//! timestamps, which corral replaces with its own receive time anyway.

/// One parsed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogMessage {
    /// Facility (0..=23).
    pub facility: u8,
    /// Severity (0 emergency ..= 7 debug).
    pub severity: u8,
    /// HOSTNAME field, when present (`-` in RFC 5424 means none).
    pub hostname: Option<String>,
    /// APP-NAME (5424) or TAG (3164), when present.
    pub app: Option<String>,
    /// The message text.
    pub message: String,
    /// True for RFC 5424, false for RFC 3164 (or a bare message).
    pub rfc5424: bool,
}

/// Why a datagram is not syslog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyslogError {
    /// No `<PRI>` at the start (RFC 5424 §6.2.1, RFC 3164 §4.1.1).
    #[error("no <PRI> header")]
    NoPri,
    /// PRI above 191.
    #[error("priority {0} out of range")]
    BadPri(u32),
}

/// Longest message kept, in bytes; longer ones are cut (on a char boundary).
pub const MAX_MESSAGE: usize = 2048;

/// Parses one datagram. Never panics; invalid UTF-8 is replaced.
pub fn parse(datagram: &[u8]) -> Result<SyslogMessage, SyslogError> {
    let text = String::from_utf8_lossy(datagram);
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    let rest = text.strip_prefix('<').ok_or(SyslogError::NoPri)?;
    let close = rest
        .find('>')
        .filter(|&i| (1..=3).contains(&i))
        .ok_or(SyslogError::NoPri)?;
    let digits = &rest[..close];
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SyslogError::NoPri);
    }
    let pri: u32 = digits.parse().map_err(|_| SyslogError::NoPri)?;
    if pri > 191 {
        return Err(SyslogError::BadPri(pri));
    }
    let (facility, severity) = ((pri / 8) as u8, (pri % 8) as u8);
    let body = &rest[close + 1..];
    let mut msg = if let Some(v5424) = body.strip_prefix("1 ") {
        parse_5424(v5424)
    } else {
        parse_3164(body)
    };
    msg.facility = facility;
    msg.severity = severity;
    if msg.message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !msg.message.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.message.truncate(cut);
    }
    Ok(msg)
}

fn nil(s: &str) -> Option<String> {
    (s != "-" && !s.is_empty()).then(|| s.to_owned())
}

/// RFC 5424 §6: TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG].
fn parse_5424(s: &str) -> SyslogMessage {
    let mut it = s.splitn(6, ' ');
    let _ts = it.next();
    let hostname = it.next().and_then(nil);
    let app = it.next().and_then(nil);
    let _procid = it.next();
    let _msgid = it.next();
    let rest = it.next().unwrap_or("");
    // STRUCTURED-DATA is `-` or one or more `[...]` elements (with `\]` escapes).
    let message = if let Some(m) = rest.strip_prefix('-') {
        m
    } else if rest.starts_with('[') {
        let b = rest.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 1,
                b']' if b.get(i + 1) != Some(&b'[') => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        rest.get(i.min(rest.len())..).unwrap_or("")
    } else {
        rest
    };
    let message = message.strip_prefix(' ').unwrap_or(message);
    let message = message.strip_prefix('\u{feff}').unwrap_or(message);
    SyslogMessage {
        facility: 0,
        severity: 0,
        hostname,
        app,
        message: message.to_owned(),
        rfc5424: true,
    }
}

/// RFC 3164 §4.1.2: `Mmm dd hh:mm:ss HOSTNAME TAG[pid]: MSG`, leniently (many senders omit
/// the timestamp or hostname).
fn parse_3164(s: &str) -> SyslogMessage {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut rest = s;
    let mut hostname = None;
    let has_ts = rest.len() >= 16
        && MONTHS.iter().any(|m| rest.starts_with(m))
        && rest.as_bytes().get(3) == Some(&b' ')
        && rest.as_bytes().get(15) == Some(&b' ');
    if has_ts {
        rest = &rest[16..];
        if let Some((h, r)) = rest.split_once(' ')
            && !h.contains(':')
            && !h.contains('[')
        {
            hostname = nil(h);
            rest = r;
        }
    }
    let (app, message) = match rest.split_once(": ") {
        Some((tag, m)) if !tag.is_empty() && tag.len() <= 48 && !tag.contains(' ') => {
            let tag = tag.split('[').next().unwrap_or(tag);
            (nil(tag), m)
        }
        _ => (None, rest),
    };
    SyslogMessage {
        facility: 0,
        severity: 0,
        hostname,
        app,
        message: message.to_owned(),
        rfc5424: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc5424_section_6_5_examples() {
        let m = parse(b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8").unwrap();
        assert_eq!((m.facility, m.severity), (4, 2));
        assert_eq!(m.hostname.as_deref(), Some("mymachine.example.com"));
        assert_eq!(m.app.as_deref(), Some("su"));
        assert_eq!(m.message, "'su root' failed for lonvick on /dev/pts/8");
        let m = parse(b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"] An application event log entry...").unwrap();
        assert_eq!(m.app.as_deref(), Some("evntslog"));
        assert_eq!(m.message, "An application event log entry...");
        let m = parse(b"<165>1 2003-10-11T22:14:15.003Z host app - - [a x=\"\\]\"][b y=\"1\"]")
            .unwrap();
        assert_eq!(m.message, "");
    }

    #[test]
    fn rfc3164_section_5_4_examples() {
        let m =
            parse(b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8")
                .unwrap();
        assert_eq!((m.facility, m.severity), (4, 2));
        assert_eq!(m.hostname.as_deref(), Some("mymachine"));
        assert_eq!(m.app.as_deref(), Some("su"));
        assert_eq!(m.message, "'su root' failed for lonvick on /dev/pts/8");
        // busybox logger without hostname/timestamp
        let m = parse(b"<13>installer[42]: partitioning /dev/vda").unwrap();
        assert_eq!(m.app.as_deref(), Some("installer"));
        assert_eq!(m.message, "partitioning /dev/vda");
        assert!(parse(b"hello").is_err());
        assert_eq!(parse(b"<192>x"), Err(SyslogError::BadPri(192)));
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&b);
        }
        #[test]
        fn never_panics_on_pri_prefixed(s in "<[0-9]{1,3}>(1 )?.{0,200}") {
            if let Ok(m) = parse(s.as_bytes()) {
                prop_assert!(m.severity < 8 && m.facility < 24);
            }
        }
    }
}
