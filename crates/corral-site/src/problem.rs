//! Problems found in a site directory: what is wrong, where, and how bad.

use std::fmt;
use std::path::PathBuf;

/// How bad a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth fixing, but the site still loads (an ignored file, an address inside a pool).
    Warning,
    /// The site cannot be used until this is fixed.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// What kind of problem it is: a stable code for programs (`--json`), tests and docs.
///
/// The human text lives in [`Problem::message`]; the kind never changes wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProblemKind {
    /// The site directory itself is missing or not a directory.
    MissingSiteDir,
    /// `site.toml` is missing.
    MissingSiteToml,
    /// A file could not be read (permissions, dangling link, not UTF-8).
    Unreadable,
    /// A non-`.toml` file or a directory where a `.toml` file is expected (warning).
    IgnoredFile,
    /// TOML syntax error.
    Syntax,
    /// A key the schema does not know.
    UnknownKey,
    /// A value of the wrong TOML type (a number where a string belongs, ...).
    WrongType,
    /// A required key is absent.
    MissingKey,
    /// Not a MAC address.
    BadMac,
    /// A multicast/broadcast MAC, which cannot identify one machine.
    GroupMac,
    /// Not an IPv4 address.
    BadIp,
    /// Not an IPv4 network in CIDR form, or host bits set.
    BadCidr,
    /// Not an address range, or a range that ends before it starts.
    BadPool,
    /// A pool not inside its network's host addresses.
    PoolOutsideNetwork,
    /// A gateway not inside its network.
    GatewayOutsideNetwork,
    /// Two networks with the same name, or overlapping networks.
    DuplicateNetwork,
    /// Not a duration like `12h`, or a zero duration.
    BadDuration,
    /// A `dhcp.mode` other than off, proxy or full.
    UnknownDhcpMode,
    /// An `install.after` that is not a known action.
    UnknownAfter,
    /// Not a valid network interface name.
    BadInterface,
    /// DHCP enabled but no interface named.
    NoInterfaces,
    /// DHCP `full` but no network defined.
    NoNetworks,
    /// Not a valid hostname (or domain).
    InvalidHostname,
    /// The same MAC on two machines.
    DuplicateMac,
    /// The same fixed IP on two machines.
    DuplicateIp,
    /// The same hostname on two machines.
    DuplicateHostname,
    /// A machine address inside no configured network.
    IpOutsideNetworks,
    /// A machine address that is a network, broadcast or gateway address.
    UnusableIp,
    /// A fixed machine address inside a dynamic pool (warning).
    IpInPool,
    /// A machine names a profile that does not exist.
    MissingProfile,
    /// `[discovery]` names a profile that does not exist, or enrols without one.
    DiscoveryProfileMissing,
    /// A profile's `boot` section is incomplete.
    BadBoot,
    /// A profile's iPXE template file is missing.
    TemplateMissing,
    /// An iPXE template without the `#!ipxe` header (warning).
    TemplateNotIpxe,
    /// A configured directory (`[paths]`) does not exist (warning).
    MissingDir,
    /// A sync tree description (`trees/NAME.toml`) with a bad or missing value.
    BadTree,
}

/// One problem in a site directory, with its place.
///
/// `Display` gives the compiler-style line operators know:
/// `machines/web01.toml:3:7: error: invalid MAC address "52:54:zz": expected six hex byte pairs like 52:54:00:12:34:56`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// Stable code.
    pub kind: ProblemKind,
    /// The file, relative to the site directory (`.` for the directory itself).
    pub file: PathBuf,
    /// 1-based line, when the problem has a place inside the file.
    pub line: Option<usize>,
    /// 1-based column (in characters), when the problem has a place inside the file.
    pub column: Option<usize>,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl Problem {
    /// True for [`Severity::Error`].
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}: {}", self.severity, self.message)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`. Never panics, whatever
/// the offset: spans come from the parser but text may be anything.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut line = 1;
    let mut col = 1;
    for (i, c) in text.char_indices() {
        if i >= offset {
            break;
        }
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars() {
        let t = "ab\ncdé\nf";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 8), (3, 1));
        assert_eq!(line_col(t, 1000), (3, 2));
        // Inside a multi-byte char: still a sane answer.
        assert_eq!(line_col(t, 6), (2, 4));
    }

    #[test]
    fn display_is_compiler_style() {
        let p = Problem {
            severity: Severity::Error,
            kind: ProblemKind::BadMac,
            file: "machines/web01.toml".into(),
            line: Some(3),
            column: Some(7),
            message: "bad".into(),
        };
        assert_eq!(p.to_string(), "machines/web01.toml:3:7: error: bad");
        let p = Problem {
            line: None,
            column: None,
            ..p
        };
        assert_eq!(p.to_string(), "machines/web01.toml: error: bad");
    }
}
