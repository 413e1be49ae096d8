//! The crate's errors.

/// Why a datagram could not be decoded as a DHCP request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the BOOTP header plus magic cookie (240 bytes).
    #[error("datagram of {len} bytes is shorter than a DHCP header (240)")]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// No DHCP magic cookie: a BOOTP request or not DHCP at all.
    #[error("no DHCP magic cookie (BOOTP or not DHCP)")]
    NoMagic,
    /// The fixed header did not decode.
    #[error("bad DHCP header: {0}")]
    Header(String),
    /// An option's length runs past the end of its area.
    #[error("option {code} is truncated")]
    Truncated {
        /// The option code.
        code: u8,
    },
    /// Option 52 with a value other than 1, 2 or 3.
    #[error("option overload (52) has an invalid value")]
    BadOverload,
    /// Concatenated instances of an option exceed 16 KiB.
    #[error("option {code} is too long")]
    TooLong {
        /// The option code.
        code: u8,
    },
}
