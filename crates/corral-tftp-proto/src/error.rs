//! Error types, one enum per operation whose callers react differently.

/// Why a datagram is not a well-formed TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed part of its packet type.
    #[error("packet too short: {len} bytes, needs {need}")]
    TooShort {
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// An opcode RFC 1350 and RFC 2347 do not define.
    #[error("unknown opcode {opcode}")]
    UnknownOpcode {
        /// The opcode.
        opcode: u16,
    },
    /// A string field is not terminated by a NUL byte.
    #[error("{field} is not NUL-terminated")]
    MissingNul {
        /// Which field.
        field: &'static str,
    },
    /// A string field is not valid UTF-8 (netascii is ASCII).
    #[error("{field} is not ASCII/UTF-8")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// A mode other than netascii, octet or mail.
    #[error("unknown transfer mode {mode:?}")]
    UnknownMode {
        /// The mode (cut to 32 characters).
        mode: String,
    },
    /// More than 64 options: nobody needs that many, and each costs memory.
    #[error("too many options in one request")]
    TooManyOptions,
}

/// A known option with a value RFC 2347/2348/2349/7440 does not allow (answered with error 8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The value is not a decimal number, or is out of the option's range.
    #[error("invalid value {value:?} for option {name} (allowed: {allowed})")]
    InvalidValue {
        /// Option name, lower case.
        name: &'static str,
        /// The value sent (cut to 32 characters).
        value: String,
        /// The allowed range, for the error message.
        allowed: &'static str,
    },
}

/// Why a requested file name is refused before any file is touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Empty, or only slashes and dots.
    #[error("empty file name")]
    Empty,
    /// A `..` component: it could leave the served root.
    #[error("file name {path:?} has a `..` component")]
    ParentComponent {
        /// The name as requested.
        path: String,
    },
    /// A control character (bytes below 0x20 or 0x7f).
    #[error("file name has a control character")]
    ControlCharacter,
    /// Longer than 1024 bytes.
    #[error("file name longer than 1024 bytes")]
    TooLong,
}
