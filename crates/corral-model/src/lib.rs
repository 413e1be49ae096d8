//! Domain types shared by every corral crate.
//!
//! This crate holds the nouns that cross crate boundaries: [`MacAddr`], [`SessionId`],
//! [`LifecycleState`], and the audit [`Event`] that every engine records in the store.
//!
//! It is *not* a place for logic: no I/O, no clock, no configuration parsing. Parsing of
//! textual forms (`FromStr`) lives here because every layer needs the same spelling.

mod event;
mod lifecycle;
mod mac;
pub mod prometheus;
mod session;

pub use event::{Event, EventKind, Outcome, Source, UnixMillis};
pub use lifecycle::LifecycleState;
pub use mac::{MacAddr, MacParseError};
pub use session::SessionId;

/// `Display` and `FromStr` for a fieldless enum with `ALL` (every variant) and `as_str` (its
/// one spelling): parsing accepts exactly the spellings `as_str` gives, and the error lists them,
/// so the accepted list cannot drift from the enum.
macro_rules! named_enum {
    ($ty:ty, $what:literal) => {
        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::ParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| $crate::ParseError::Unknown {
                        what: $what,
                        value: s.to_owned(),
                        expected: Self::ALL.map(|v| v.as_str()).join(", "),
                    })
            }
        }
    };
}
pub(crate) use named_enum;

/// An error parsing one of this crate's textual forms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The string names no known variant.
    #[error("unknown {what} {value:?}; expected one of: {expected}")]
    Unknown {
        /// What was being parsed ("source", "outcome", ...).
        what: &'static str,
        /// The text that did not match.
        value: String,
        /// The accepted spellings, comma separated.
        expected: String,
    },
    /// A session id that is not 16 hex digits.
    #[error("invalid session id {0:?}: expected 16 hexadecimal digits")]
    SessionId(String),
}
