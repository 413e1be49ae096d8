//! Validated names: hostnames, interface names, profile and machine names.

use std::fmt;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A profile's name: the stem of its file in `profiles/` (`debian` for `profiles/debian.toml`).
    ProfileName
);
name_type!(
    /// A machine's name: the stem of its file in `machines/` (`web01` for `machines/web01.toml`).
    MachineName
);
name_type!(
    /// A DNS hostname (RFC 1123): dot-separated labels of letters, digits and hyphens, 1-63
    /// characters each, not starting or ending with a hyphen; 253 characters at most.
    /// Stored in lowercase, because DNS names compare case-insensitively.
    Hostname
);
name_type!(
    /// A Linux network interface name (`eth0`, `enp3s0`, `br-lab`): 1-15 bytes, no spaces,
    /// `/` or `:`.
    InterfaceName
);

impl ProfileName {
    /// Profile names come from file names, which the directory listing already made unique.
    pub(crate) fn new(s: &str) -> Self {
        ProfileName(s.to_owned())
    }
}

impl MachineName {
    /// Machine names come from file names, which the directory listing already made unique.
    pub(crate) fn new(s: &str) -> Self {
        MachineName(s.to_owned())
    }
}

impl Hostname {
    /// Validates `s` as a hostname.
    pub fn parse(s: &str) -> Option<Self> {
        let ok_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        (!s.is_empty() && s.len() <= 253 && s.split('.').all(ok_label))
            .then(|| Hostname(s.to_ascii_lowercase()))
    }
}

impl InterfaceName {
    /// Validates `s` as an interface name (the kernel's `dev_valid_name` rules).
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() < 16
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
        ok.then(|| InterfaceName(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in ["web01", "a", "Web-01.lab.example", "x1-2"] {
            assert!(Hostname::parse(ok).is_some(), "{ok}");
        }
        assert_eq!(Hostname::parse("WEB01").unwrap().as_str(), "web01");
        for bad in [
            "",
            "-web",
            "web-",
            "web_01",
            "a..b",
            "web 01",
            &"a".repeat(64),
        ] {
            assert!(Hostname::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn interfaces() {
        for ok in ["eth0", "enp3s0", "br-lab", "veth.1"] {
            assert!(InterfaceName::parse(ok).is_some(), "{ok}");
        }
        for bad in ["", "eth 0", "a/b", "eth0:1", "abcdefghijklmnop", ".."] {
            assert!(InterfaceName::parse(bad).is_none(), "{bad}");
        }
    }
}
