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
        expected: &'static str,
    },
    /// A session id that is not 16 hex digits.
    #[error("invalid session id {0:?}: expected 16 hexadecimal digits")]
    SessionId(String),
}
