//! What the server does with a datagram that arrives on its listening port (port 69).
//!
//! Every request that is not a valid read request gets an ERROR packet
//! ([RFC 1350 §7](https://www.rfc-editor.org/rfc/rfc1350#section-7)), except ERROR packets
//! themselves, which are never answered (answering errors with errors loops).

use crate::error::{OptionError, PathError};
use crate::options::RequestOptions;
use crate::packet::{ErrorCode, Mode, Packet, encode_error};
use crate::path::sanitize;

/// A valid read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// The file name as sent.
    pub filename: String,
    /// The root-relative path it names (see [`crate::path::sanitize`]).
    pub path: String,
    /// Transfer mode (netascii is served as octet).
    pub mode: Mode,
    /// The client's options.
    pub options: RequestOptions,
}

/// An error to send back, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// TFTP error code.
    pub code: ErrorCode,
    /// Message for the ERROR packet and the logs.
    pub message: String,
    /// The requested file name, when the request got that far.
    pub filename: Option<String>,
}

impl Rejection {
    /// A rejection with `code` and `message` for `filename`.
    pub fn new(code: ErrorCode, message: impl Into<String>, filename: Option<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            filename,
        }
    }

    /// Writes the ERROR packet into `buf` (at least 5 bytes) and returns its length.
    pub fn encode(&self, buf: &mut [u8]) -> usize {
        encode_error(self.code, &self.message, buf)
    }

    fn from_path(e: PathError, filename: &str) -> Self {
        Rejection::new(
            ErrorCode::AccessViolation,
            format!("access violation: {e}"),
            Some(filename.to_owned()),
        )
    }

    fn from_option(e: OptionError, filename: &str) -> Self {
        Rejection::new(
            ErrorCode::OptionNegotiation,
            e.to_string(),
            Some(filename.to_owned()),
        )
    }
}

/// What to do with a datagram received on the listening port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Start a read transfer.
    Read(ReadRequest),
    /// Answer with this error.
    Reject(Rejection),
    /// Do nothing (an ERROR packet).
    Ignore,
}

/// Classifies one datagram from the listening port.
pub fn classify(datagram: &[u8]) -> Incoming {
    match Packet::decode(datagram) {
        Err(e) => Incoming::Reject(Rejection::new(
            ErrorCode::IllegalOperation,
            format!("malformed request: {e}"),
            None,
        )),
        Ok(Packet::Wrq(r)) => Incoming::Reject(Rejection::new(
            ErrorCode::AccessViolation,
            "read-only server: write requests are refused",
            Some(r.filename),
        )),
        Ok(Packet::Error { .. }) => Incoming::Ignore,
        Ok(Packet::Data { .. } | Packet::Ack { .. } | Packet::Oack { .. }) => {
            Incoming::Reject(Rejection::new(
                ErrorCode::IllegalOperation,
                "expected a read request on the server port",
                None,
            ))
        }
        Ok(Packet::Rrq(r)) => {
            if r.mode == Mode::Mail {
                return Incoming::Reject(Rejection::new(
                    ErrorCode::IllegalOperation,
                    "mail mode is not supported",
                    Some(r.filename),
                ));
            }
            let path = match sanitize(&r.filename) {
                Ok(p) => p,
                Err(e) => return Incoming::Reject(Rejection::from_path(e, &r.filename)),
            };
            let options = match RequestOptions::parse(&r.options) {
                Ok(o) => o,
                Err(e) => return Incoming::Reject(Rejection::from_option(e, &r.filename)),
            };
            Incoming::Read(ReadRequest {
                filename: r.filename,
                path,
                mode: r.mode,
                options,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject_code(d: &[u8]) -> ErrorCode {
        match classify(d) {
            Incoming::Reject(r) => r.code,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    // RFC 1350 §7 / issue: WRQ to a read-only server is an access violation.
    #[test]
    fn rfc1350_wrq_refused_read_only() {
        assert_eq!(
            reject_code(b"\x00\x02up.bin\x00octet\x00"),
            ErrorCode::AccessViolation
        );
    }

    #[test]
    fn rfc1350_unknown_opcode_illegal_operation() {
        assert_eq!(reject_code(b"\x00\x07abc"), ErrorCode::IllegalOperation);
        assert_eq!(reject_code(b"\x00"), ErrorCode::IllegalOperation);
        assert_eq!(
            reject_code(b"\x00\x04\x00\x01"),
            ErrorCode::IllegalOperation
        );
        assert_eq!(
            reject_code(b"\x00\x01f\x00mail\x00"),
            ErrorCode::IllegalOperation
        );
    }

    #[test]
    fn rfc1350_s7_error_packets_are_not_answered() {
        assert_eq!(classify(b"\x00\x05\x00\x00oops\x00"), Incoming::Ignore);
    }

    #[test]
    fn traversal_is_access_violation() {
        assert_eq!(
            reject_code(b"\x00\x01../../etc/passwd\x00octet\x00"),
            ErrorCode::AccessViolation
        );
    }

    // RFC 2347 §"Negotiation": error 8 for refused option values.
    #[test]
    fn rfc2347_bad_option_value_is_error_8() {
        assert_eq!(
            reject_code(b"\x00\x01f\x00octet\x00blksize\x001\x00"),
            ErrorCode::OptionNegotiation
        );
    }

    #[test]
    fn absolute_path_read_request() {
        let Incoming::Read(r) = classify(b"\x00\x01/pxelinux.0\x00octet\x00tsize\x000\x00") else {
            panic!()
        };
        assert_eq!(r.path, "pxelinux.0");
        assert_eq!(r.filename, "/pxelinux.0");
        assert_eq!(r.options.tsize, Some(0));
    }
}
