//! The TFTP wire format ([RFC 1350 §5](https://www.rfc-editor.org/rfc/rfc1350#section-5),
//! OACK from [RFC 2347](https://www.rfc-editor.org/rfc/rfc2347)).
//!
//! Hand-written: the format is six opcodes of NUL-terminated strings and two-byte integers, and
//! the TFTP crates on crates.io either bundle a server with its own I/O (`async-tftp`,
//! `tftp_server`) or decode into owned buffers without typed errors; the codec here borrows
//! DATA payloads and encodes straight into the driver's send buffer.

use crate::error::DecodeError;

/// Largest DATA payload RFC 2348 allows (an IPv4 datagram of 65535 bytes minus headers).
pub const MAX_BLKSIZE: u16 = 65464;
/// Smallest block size RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
/// Block size of plain RFC 1350 transfers.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Bytes in front of every DATA payload (opcode + block number).
pub const DATA_HEADER: usize = 4;

/// Opcodes, [RFC 1350 §5](https://www.rfc-editor.org/rfc/rfc1350#section-5) and RFC 2347.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Opcode {
    /// Read request.
    Rrq = 0x01,
    /// Write request.
    Wrq = 0x02,
    /// Data block.
    Data = 0x03,
    /// Acknowledgement.
    Ack = 0x04,
    /// Error.
    Error = 0x05,
    /// Option acknowledgement (RFC 2347).
    Oack = 0x06,
}

impl Opcode {
    /// The opcode for a wire value, if known.
    pub fn from_u16(v: u16) -> Option<Opcode> {
        Some(match v {
            0x01 => Opcode::Rrq,
            0x02 => Opcode::Wrq,
            0x03 => Opcode::Data,
            0x04 => Opcode::Ack,
            0x05 => Opcode::Error,
            0x06 => Opcode::Oack,
            _ => return None,
        })
    }
}

/// Transfer modes ([RFC 1350 §1](https://www.rfc-editor.org/rfc/rfc1350#section-1)),
/// compared case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `netascii`. Served as octet: corral serves boot files, which are binary, and converting
    /// line ends would make `tsize` and block offsets lie.
    Netascii,
    /// `octet`: raw bytes (what every PXE client asks for).
    Octet,
    /// `mail`: obsolete, refused.
    Mail,
}

/// TFTP error codes ([RFC 1350 appendix](https://www.rfc-editor.org/rfc/rfc1350#page-10),
/// 8 from RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 0: not defined, see message.
    Undefined,
    /// 1: file not found.
    FileNotFound,
    /// 2: access violation.
    AccessViolation,
    /// 3: disk full or allocation exceeded.
    DiskFull,
    /// 4: illegal TFTP operation.
    IllegalOperation,
    /// 5: unknown transfer ID.
    UnknownTransferId,
    /// 6: file already exists.
    FileExists,
    /// 7: no such user.
    NoSuchUser,
    /// 8: option negotiation refused (RFC 2347).
    OptionNegotiation,
    /// Any other value.
    Other(u16),
}

impl ErrorCode {
    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Undefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionNegotiation => 8,
            ErrorCode::Other(v) => v,
        }
    }

    /// The code for a wire value.
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            0 => ErrorCode::Undefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionNegotiation,
            v => ErrorCode::Other(v),
        }
    }
}

/// A read or write request: file name, mode and the RFC 2347 options in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The file name exactly as sent (not yet checked; see [`crate::path::sanitize`]).
    pub filename: String,
    /// Transfer mode.
    pub mode: Mode,
    /// Option name/value pairs as sent (names keep their case).
    pub options: Vec<(String, String)>,
}

/// One decoded TFTP packet. DATA borrows its payload from the datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// RRQ.
    Rrq(Request),
    /// WRQ.
    Wrq(Request),
    /// DATA with its 16-bit block number.
    Data {
        /// Block number on the wire (wraps past 65535).
        block: u16,
        /// Payload.
        data: &'a [u8],
    },
    /// ACK of a block number.
    Ack {
        /// Block number on the wire.
        block: u16,
    },
    /// ERROR.
    Error {
        /// Error code.
        code: ErrorCode,
        /// Message (lossily decoded).
        message: String,
    },
    /// OACK with the accepted options.
    Oack {
        /// Option name/value pairs.
        options: Vec<(String, String)>,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Splits `rest` at its first NUL; returns the string before it and what follows.
fn cstr<'a>(rest: &'a [u8], field: &'static str) -> Result<(&'a str, &'a [u8]), DecodeError> {
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(DecodeError::MissingNul { field })?;
    let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::NotUtf8 { field })?;
    Ok((s, &rest[nul + 1..]))
}

/// Decodes the option list after a request's mode or in an OACK.
///
/// A trailing name with no value, or trailing bytes without a NUL, are ignored: some PXE ROMs
/// pad requests, and RFC 2347 servers ignore what they do not understand.
fn options(mut rest: &[u8]) -> Result<Vec<(String, String)>, DecodeError> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let Ok((name, after)) = cstr(rest, "option name") else {
            break;
        };
        let Ok((value, after)) = cstr(after, "option value") else {
            break;
        };
        if name.is_empty() {
            // Padding NULs.
            rest = after;
            continue;
        }
        if out.len() >= 64 {
            return Err(DecodeError::TooManyOptions);
        }
        out.push((name.to_owned(), value.to_owned()));
        rest = after;
    }
    Ok(out)
}

fn request(body: &[u8]) -> Result<Request, DecodeError> {
    let (filename, rest) = cstr(body, "filename")?;
    let (mode, rest) = cstr(rest, "mode")?;
    let mode = if mode.eq_ignore_ascii_case("octet") {
        Mode::Octet
    } else if mode.eq_ignore_ascii_case("netascii") {
        Mode::Netascii
    } else if mode.eq_ignore_ascii_case("mail") {
        Mode::Mail
    } else {
        return Err(DecodeError::UnknownMode {
            mode: mode.chars().take(32).collect(),
        });
    };
    Ok(Request {
        filename: filename.to_owned(),
        mode,
        options: options(rest)?,
    })
}

impl<'a> Packet<'a> {
    /// Decodes one datagram. Never panics; every malformed input is a [`DecodeError`].
    pub fn decode(buf: &'a [u8]) -> Result<Packet<'a>, DecodeError> {
        if buf.len() < 2 {
            return Err(DecodeError::TooShort {
                len: buf.len(),
                need: 2,
            });
        }
        let op = u16_at(buf, 0);
        let op = Opcode::from_u16(op).ok_or(DecodeError::UnknownOpcode { opcode: op })?;
        let body = &buf[2..];
        let need_block = |len: usize| {
            if len < 4 {
                Err(DecodeError::TooShort { len, need: 4 })
            } else {
                Ok(())
            }
        };
        Ok(match op {
            Opcode::Rrq => Packet::Rrq(request(body)?),
            Opcode::Wrq => Packet::Wrq(request(body)?),
            Opcode::Data => {
                need_block(buf.len())?;
                Packet::Data {
                    block: u16_at(buf, 2),
                    data: &buf[4..],
                }
            }
            Opcode::Ack => {
                need_block(buf.len())?;
                Packet::Ack {
                    block: u16_at(buf, 2),
                }
            }
            Opcode::Error => {
                need_block(buf.len())?;
                let code = ErrorCode::from_u16(u16_at(buf, 2));
                // Clients are sloppy about the final NUL; take what is there.
                let msg = &buf[4..];
                let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
                Packet::Error {
                    code,
                    message: String::from_utf8_lossy(&msg[..end.min(512)]).into_owned(),
                }
            }
            Opcode::Oack => Packet::Oack {
                options: options(body)?,
            },
        })
    }

    /// Encodes into a new vector (tests, clients, small packets; the server's DATA path uses
    /// [`encode_data_header`]).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let push_req = |v: &mut Vec<u8>, op: Opcode, r: &Request| {
            v.extend_from_slice(&(op as u16).to_be_bytes());
            v.extend_from_slice(r.filename.as_bytes());
            v.push(0);
            v.extend_from_slice(match r.mode {
                Mode::Octet => b"octet",
                Mode::Netascii => b"netascii",
                Mode::Mail => b"mail",
            });
            v.push(0);
            push_options(v, &r.options);
        };
        match self {
            Packet::Rrq(r) => push_req(&mut v, Opcode::Rrq, r),
            Packet::Wrq(r) => push_req(&mut v, Opcode::Wrq, r),
            Packet::Data { block, data } => {
                v.extend_from_slice(&(Opcode::Data as u16).to_be_bytes());
                v.extend_from_slice(&block.to_be_bytes());
                v.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                v.extend_from_slice(&(Opcode::Ack as u16).to_be_bytes());
                v.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                v.resize(512, 0);
                let n = encode_error(*code, message, &mut v);
                v.truncate(n);
            }
            Packet::Oack { options } => {
                v.extend_from_slice(&(Opcode::Oack as u16).to_be_bytes());
                push_options(&mut v, options);
            }
        }
        v
    }
}

fn push_options(v: &mut Vec<u8>, options: &[(String, String)]) {
    for (n, val) in options {
        v.extend_from_slice(n.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
}

/// Writes a DATA header for `block` into `buf[..4]`.
///
/// # Panics
/// If `buf` is shorter than [`DATA_HEADER`] (a caller bug, not network input).
pub fn encode_data_header(block: u16, buf: &mut [u8]) {
    buf[..2].copy_from_slice(&(Opcode::Data as u16).to_be_bytes());
    buf[2..4].copy_from_slice(&block.to_be_bytes());
}

/// Writes an ERROR packet into `buf` and returns its length. The message is cut to fit (and to
/// 255 bytes) and has NUL and non-ASCII bytes replaced, so the packet is always well formed.
///
/// # Panics
/// If `buf` is shorter than 5 bytes.
pub fn encode_error(code: ErrorCode, message: &str, buf: &mut [u8]) -> usize {
    buf[..2].copy_from_slice(&(Opcode::Error as u16).to_be_bytes());
    buf[2..4].copy_from_slice(&code.to_u16().to_be_bytes());
    let room = (buf.len() - 5).min(255);
    let mut n = 4;
    for b in message.bytes().take(room) {
        buf[n] = if b == 0 || !b.is_ascii() { b'?' } else { b };
        n += 1;
    }
    buf[n] = 0;
    n + 1
}

/// Writes an OACK with `options` into `buf`; returns its length, or `None` if it does not fit.
pub fn encode_oack(options: &[(String, String)], buf: &mut [u8]) -> Option<usize> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&(Opcode::Oack as u16).to_be_bytes());
    push_options(&mut v, options);
    let dst = buf.get_mut(..v.len())?;
    dst.copy_from_slice(&v);
    Some(v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1350 §5: "2 bytes opcode, string filename, 1 byte 0, string mode, 1 byte 0".
    #[test]
    fn rfc1350_s5_rrq_layout() {
        let p = Packet::decode(b"\x00\x01pxelinux.0\x00octet\x00").unwrap();
        assert_eq!(
            p,
            Packet::Rrq(Request {
                filename: "pxelinux.0".into(),
                mode: Mode::Octet,
                options: vec![]
            })
        );
    }

    // RFC 1350 §5: mode is case-insensitive ("NETASCII", "OcTeT").
    #[test]
    fn rfc1350_s5_mode_case_insensitive() {
        let Packet::Rrq(r) = Packet::decode(b"\x00\x01f\x00OcTeT\x00").unwrap() else {
            panic!()
        };
        assert_eq!(r.mode, Mode::Octet);
        let Packet::Rrq(r) = Packet::decode(b"\x00\x01f\x00NETASCII\x00").unwrap() else {
            panic!()
        };
        assert_eq!(r.mode, Mode::Netascii);
        assert!(matches!(
            Packet::decode(b"\x00\x01f\x00binary\x00"),
            Err(DecodeError::UnknownMode { .. })
        ));
    }

    // RFC 1350 §5: DATA is opcode 3, block #, n bytes; ACK is opcode 4, block #.
    #[test]
    fn rfc1350_s5_data_ack_roundtrip() {
        let d = Packet::Data {
            block: 0xfffe,
            data: b"abc",
        };
        assert_eq!(d.to_vec(), b"\x00\x03\xff\xfeabc");
        assert_eq!(Packet::decode(&d.to_vec()).unwrap(), d);
        assert_eq!(
            Packet::decode(b"\x00\x04\x00\x07").unwrap(),
            Packet::Ack { block: 7 }
        );
        assert!(matches!(
            Packet::decode(b"\x00\x04\x00"),
            Err(DecodeError::TooShort { .. })
        ));
    }

    // RFC 1350 §5: ERROR is opcode 5, error code, message, 0.
    #[test]
    fn rfc1350_s5_error_packet() {
        let mut buf = [0u8; 64];
        let n = encode_error(ErrorCode::FileNotFound, "file not found", &mut buf);
        assert_eq!(&buf[..n], b"\x00\x05\x00\x01file not found\x00");
        assert_eq!(
            Packet::decode(&buf[..n]).unwrap(),
            Packet::Error {
                code: ErrorCode::FileNotFound,
                message: "file not found".into()
            }
        );
        // A message with a NUL inside stays one well-formed string.
        let n = encode_error(ErrorCode::Undefined, "a\0b", &mut buf);
        assert_eq!(&buf[..n], b"\x00\x05\x00\x00a?b\x00");
        // A tiny buffer cuts the message, never overflows.
        let mut small = [0u8; 8];
        let n = encode_error(ErrorCode::Undefined, "long message", &mut small);
        assert_eq!(n, 8);
        assert_eq!(small[7], 0);
    }

    #[test]
    fn rfc1350_unknown_opcode_is_typed_error() {
        assert_eq!(
            Packet::decode(b"\x00\x09xx"),
            Err(DecodeError::UnknownOpcode { opcode: 9 })
        );
        assert!(matches!(
            Packet::decode(b"\x00"),
            Err(DecodeError::TooShort { .. })
        ));
    }

    // RFC 2347 §2: options follow the mode as name/value NUL-terminated pairs.
    #[test]
    fn rfc2347_s2_request_options() {
        let p = Packet::decode(b"\x00\x01f\x00octet\x00blksize\x001432\x00tsize\x000\x00").unwrap();
        let Packet::Rrq(r) = p else { panic!() };
        assert_eq!(
            r.options,
            vec![
                ("blksize".to_string(), "1432".to_string()),
                ("tsize".to_string(), "0".to_string())
            ]
        );
        // A dangling name or unterminated tail is ignored, not an error.
        let Packet::Rrq(r) = Packet::decode(b"\x00\x01f\x00octet\x00blksize\x00512").unwrap()
        else {
            panic!()
        };
        assert!(r.options.is_empty());
    }

    // RFC 2347 §2: OACK is opcode 6 followed by the acknowledged pairs.
    #[test]
    fn rfc2347_s2_oack_roundtrip() {
        let opts = vec![("blksize".to_string(), "1432".to_string())];
        let mut buf = [0u8; 64];
        let n = encode_oack(&opts, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"\x00\x06blksize\x001432\x00");
        assert_eq!(
            Packet::decode(&buf[..n]).unwrap(),
            Packet::Oack { options: opts }
        );
        assert_eq!(
            encode_oack(&[("x".into(), "y".into())], &mut [0u8; 3]),
            None
        );
    }

    #[test]
    fn missing_nul_and_bad_utf8_are_typed() {
        assert_eq!(
            Packet::decode(b"\x00\x01file"),
            Err(DecodeError::MissingNul { field: "filename" })
        );
        assert_eq!(
            Packet::decode(b"\x00\x01f\x00octet"),
            Err(DecodeError::MissingNul { field: "mode" })
        );
        assert_eq!(
            Packet::decode(b"\x00\x01\xff\x00octet\x00"),
            Err(DecodeError::NotUtf8 { field: "filename" })
        );
    }
}
