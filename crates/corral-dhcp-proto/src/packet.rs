//! Decoding a request: the fixed header through `dhcproto`, the options by our own scanner.
//!
//! Why the options are scanned here rather than taken from `dhcproto`'s typed map:
//! - option overload ([RFC 2131 §4.1], option 52, [RFC 2132 §9.3]) puts options in the `file`
//!   and `sname` fields, which `dhcproto` reads as NUL-terminated strings;
//! - long options are split into several instances that must be concatenated in order
//!   ([RFC 3396]); `dhcproto` keeps only the last instance;
//! - `dhcproto` stops reading options at the first one whose typed value does not parse, so
//!   one odd option (a non-UTF-8 host name) would hide the message type behind it.
//!
//! The scanner is strict where the RFCs are: a truncated option is an error, and an overload
//! inside `file`/`sname` is ignored (only the options field may carry option 52).
//!
//! [RFC 2131 §4.1]: https://www.rfc-editor.org/rfc/rfc2131#section-4.1
//! [RFC 2132 §9.3]: https://www.rfc-editor.org/rfc/rfc2132#section-9.3
//! [RFC 3396]: https://www.rfc-editor.org/rfc/rfc3396

use std::net::Ipv4Addr;

use corral_model::MacAddr;
use dhcproto::v4::{Message, MessageType, Opcode};
use dhcproto::{Decodable, Decoder};

use crate::error::DecodeError;

/// The BOOTP fixed header length (RFC 2131 §2, up to and excluding the magic cookie).
pub const HEADER_LEN: usize = 236;
/// The DHCP magic cookie (RFC 2131 §3).
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;

/// A decoded request: header fields and the merged option map.
#[derive(Debug, Clone)]
pub struct Packet {
    /// The header as `dhcproto` decoded it (its options are not used).
    pub header: Message,
    /// Options in first-seen order, instances of one code concatenated (RFC 3396).
    options: Vec<(u8, Vec<u8>)>,
}

impl Packet {
    /// Decodes a datagram. Never panics; every malformation is a [`DecodeError`].
    pub fn decode(data: &[u8]) -> Result<Packet, DecodeError> {
        if data.len() < HEADER_LEN + MAGIC.len() {
            return Err(DecodeError::TooShort { len: data.len() });
        }
        if data[HEADER_LEN..HEADER_LEN + 4] != MAGIC {
            return Err(DecodeError::NoMagic);
        }
        let header = Message::decode(&mut Decoder::new(&data[..HEADER_LEN + 4]))
            .map_err(|e| DecodeError::Header(e.to_string()))?;
        let mut options: Vec<(u8, Vec<u8>)> = Vec::new();
        scan(&data[HEADER_LEN + 4..], Area::Options, &mut options)?;
        let overload = options
            .iter()
            .find(|(c, _)| *c == 52)
            .map(|(_, v)| v.clone());
        if let Some(v) = overload {
            let which = match v.as_slice() {
                [1] => (true, false),
                [2] => (false, true),
                [3] => (true, true),
                _ => return Err(DecodeError::BadOverload),
            };
            // RFC 2131 §4.1: the options field first, then `file`, then `sname`.
            if which.0 {
                scan(&data[FILE], Area::File, &mut options)?;
            }
            if which.1 {
                scan(&data[SNAME], Area::Sname, &mut options)?;
            }
            options.retain(|(c, _)| *c != 52);
        }
        Ok(Packet { header, options })
    }

    /// The value of option `code` (all instances concatenated).
    pub fn opt(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// Every option, in first-seen order.
    pub fn options(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.options.iter().map(|(c, v)| (*c, v.as_slice()))
    }

    /// True for BOOTREQUEST (op 1).
    pub fn is_request(&self) -> bool {
        self.header.opcode() == Opcode::BootRequest
    }

    /// Option 53.
    pub fn msg_type(&self) -> Option<MessageType> {
        match self.opt(53) {
            Some([t]) => Some(MessageType::from(*t)),
            _ => None,
        }
    }

    /// An address option of exactly four bytes.
    pub fn ip_opt(&self, code: u8) -> Option<Ipv4Addr> {
        match self.opt(code) {
            Some(&[a, b, c, d]) => Some(Ipv4Addr::new(a, b, c, d)),
            _ => None,
        }
    }

    /// Option 50 (requested IP address).
    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        self.ip_opt(50).filter(|ip| !ip.is_unspecified())
    }

    /// Option 54 (server identifier).
    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.ip_opt(54)
    }

    /// Option 55 (parameter request list).
    pub fn parameter_request_list(&self) -> Option<&[u8]> {
        self.opt(55)
    }

    /// The client's MAC address, when the hardware type is Ethernet with a 6-byte address.
    pub fn mac(&self) -> Option<MacAddr> {
        let h = &self.header;
        if u8::from(h.htype()) != 1 || h.hlen() != 6 {
            return None;
        }
        let c = h.chaddr();
        let mut m = [0u8; 6];
        m.copy_from_slice(c.get(..6)?);
        Some(MacAddr(m))
    }

    /// ciaddr, or `None` when 0.0.0.0.
    pub fn ciaddr(&self) -> Option<Ipv4Addr> {
        Some(self.header.ciaddr()).filter(|a| !a.is_unspecified())
    }

    /// giaddr, or `None` when 0.0.0.0.
    pub fn giaddr(&self) -> Option<Ipv4Addr> {
        Some(self.header.giaddr()).filter(|a| !a.is_unspecified())
    }

    /// The broadcast bit of `flags` (RFC 2131 §2, figure 2).
    pub fn broadcast(&self) -> bool {
        self.header.flags().broadcast()
    }
}

#[derive(Debug, Clone, Copy)]
enum Area {
    Options,
    File,
    Sname,
}

fn scan(mut b: &[u8], area: Area, out: &mut Vec<(u8, Vec<u8>)>) -> Result<(), DecodeError> {
    while let Some((&code, rest)) = b.split_first() {
        match code {
            0 => b = rest,
            255 => return Ok(()),
            _ => {
                let Some((&len, rest)) = rest.split_first() else {
                    return Err(DecodeError::Truncated { code });
                };
                let len = usize::from(len);
                if rest.len() < len {
                    return Err(DecodeError::Truncated { code });
                }
                let value = &rest[..len];
                b = &rest[len..];
                if code == 52 && !matches!(area, Area::Options) {
                    // RFC 2131 §4.1: overload is only meaningful in the options field.
                    continue;
                }
                match out.iter_mut().find(|(c, _)| *c == code) {
                    Some((_, v)) => {
                        // RFC 3396: concatenate split instances, but keep a hostile sender from
                        // building unbounded values (a datagram is < 64 KiB anyway).
                        if v.len() + value.len() > 16 * 1024 {
                            return Err(DecodeError::TooLong { code });
                        }
                        v.extend_from_slice(value);
                    }
                    None => out.push((code, value.to_vec())),
                }
            }
        }
    }
    // RFC 2131 says the options end with 255; some clients omit it. Accept the end of data.
    Ok(())
}
