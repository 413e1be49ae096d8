//! Wire format. Every datagram is one packet: a 14-byte header then a typed body. All integers
//! are big-endian.
//!
//! ```text
//! header: magic "CRCT" | version u8 = 1 | type u8 | session u64
//! 0x01 Announce      flags u8 | manifest_len u32 | manifest_hash [32] | tcp_port u16
//!                    | symbol_size u16 | block_size u32 | block_count u32 | image_size u64
//!                    | pass_pos u32 | rate_bps u64
//! 0x02 ManifestChunk offset u32 | total_len u32 | bytes...
//! 0x03 Data          block u32 | esi u16 | k u16 | payload_len u32 | flags u8 | symbol...
//! 0x04 Preparing     image_size u64 (0: not known yet) | bytes_done u64
//! 0x10 Join          receiver u64 | flags u8 | name_len u8 | name (UTF-8)
//! 0x11 JoinAck       receiver u64
//! 0x12 Nak           receiver u64 | count u16 | count × (block u32 | needed u32 | seen u32)
//! 0x13 Status        receiver u64 | blocks_done u32 | bytes_done u64 | received u64
//!                    | lost u64 | rejected u32
//! 0x14 Done          receiver u64 | ok u8 | reason_len u16 | reason (UTF-8)
//! 0x15 DoneAck       receiver u64
//! 0x16 CatchUp       receiver u64
//! 0x20 End           flags u8
//! ```
//!
//! Decoding is zero-copy for symbol bytes, checks every length and never allocates more than
//! the datagram's own size.

use corral_model::SessionId;

use crate::error::PacketError;

/// Magic bytes at the start of every packet.
pub const MAGIC: [u8; 4] = *b"CRCT";
/// Protocol version.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 14;
/// Data packet overhead (header + data fields) before the symbol bytes.
pub const DATA_OVERHEAD: usize = HEADER_LEN + 13;
/// Largest receiver name in a Join.
pub const MAX_NAME_LEN: usize = 64;
/// Largest reason text in a Done.
pub const MAX_REASON_LEN: usize = 512;
/// Most NAK entries in one packet (keeps a NAK within 1400 bytes).
pub const MAX_NAK_ENTRIES: usize = 100;

/// Announce flag: the data pass has started.
pub const ANNOUNCE_STARTED: u8 = 0x01;
/// Announce flag: the data pass is complete (only repair follows).
pub const ANNOUNCE_PASS_DONE: u8 = 0x02;
/// Data flag: the payload is zstd-compressed.
pub const DATA_COMPRESSED: u8 = 0x01;
/// Data flag: a repair symbol (sent in answer to NAKs), not part of the in-order pass.
pub const DATA_REPAIR: u8 = 0x02;
/// Join flag: the receiver already holds the verified manifest.
pub const JOIN_HAS_MANIFEST: u8 = 0x01;
/// End flag: the sender aborted.
pub const END_ABORTED: u8 = 0x01;

/// A decoded packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The session it belongs to.
    pub session: SessionId,
    /// The typed body.
    pub body: Body<'a>,
}

/// Packet bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// Sender → group: a session exists, here is how to get its manifest.
    Announce(Announce),
    /// Sender → group or one receiver: a slice of the signed manifest.
    ManifestChunk(ManifestChunk<'a>),
    /// Sender → group: one symbol of one block.
    Data(Data<'a>),
    /// Sender → group, before it announces: it is still reading and hashing the image for
    /// the session's manifest (a large disk takes minutes). Keeps waiting receivers from
    /// giving up and tells them how far it is. Carries no authority: nothing is joined,
    /// trusted or written because of it.
    Preparing(Preparing),
    /// Receiver → sender: I am here.
    Join(Join<'a>),
    /// Sender → receiver: I saw your Join.
    JoinAck {
        /// The receiver's id.
        receiver: u64,
    },
    /// Receiver → sender: symbols I still need.
    Nak(Nak),
    /// Receiver → sender: progress.
    Status(Status),
    /// Receiver → sender: finished (verified or failed).
    Done(Done<'a>),
    /// Sender → receiver: I recorded your Done.
    DoneAck {
        /// The receiver's id.
        receiver: u64,
    },
    /// Sender → receiver: you are too far behind the stream to be repaired by multicast; fetch
    /// what you lack over TCP catch-up (your NAKs are no longer answered by multicast).
    CatchUp {
        /// The receiver's id.
        receiver: u64,
    },
    /// Sender → group: the session is over.
    End {
        /// `END_*` flags.
        flags: u8,
    },
}

/// Announce body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// `ANNOUNCE_*` flags.
    pub flags: u8,
    /// Signed manifest length in bytes.
    pub manifest_len: u32,
    /// BLAKE3 of the signed manifest bytes.
    pub manifest_hash: [u8; 32],
    /// Sender's TCP catch-up port (0: none).
    pub tcp_port: u16,
    /// Symbol size.
    pub symbol_size: u16,
    /// Block size.
    pub block_size: u32,
    /// Number of blocks.
    pub block_count: u32,
    /// Image size.
    pub image_size: u64,
    /// Blocks whose in-order pass is complete (receivers may NAK any block below this).
    pub pass_pos: u32,
    /// Current send rate in bits per second.
    pub rate_bps: u64,
}

/// Preparing body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preparing {
    /// The image's size (0: not known yet, e.g. while standard input is being spooled).
    pub image_size: u64,
    /// Bytes of the image read and hashed so far (never more than `image_size` when that
    /// is known).
    pub bytes_done: u64,
}

/// ManifestChunk body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestChunk<'a> {
    /// Offset of `bytes` in the signed manifest.
    pub offset: u32,
    /// Total signed manifest length.
    pub total_len: u32,
    /// The slice.
    pub bytes: &'a [u8],
}

/// Data body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    /// Block index.
    pub block: u32,
    /// Symbol index: `0..k` source, `k..` parity.
    pub esi: u16,
    /// Source symbols in this block.
    pub k: u16,
    /// Payload length (compressed or raw) before padding.
    pub payload_len: u32,
    /// `DATA_*` flags.
    pub flags: u8,
    /// The symbol bytes.
    pub symbol: &'a [u8],
}

/// Join body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Join<'a> {
    /// Receiver id (random per run).
    pub receiver: u64,
    /// `JOIN_*` flags.
    pub flags: u8,
    /// Receiver's name (hostname), at most 64 bytes.
    pub name: &'a str,
}

/// One NAK line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NakEntry {
    /// Block index.
    pub block: u32,
    /// Symbols still needed to rebuild it ([`NakEntry::ALL`]: everything, block never seen).
    pub needed: u32,
    /// One past the highest symbol index received for the block (0: none), so the sender can
    /// tell which of its repair symbols may still be in flight.
    pub seen: u32,
}

impl NakEntry {
    /// `needed` value meaning "I have nothing of this block".
    pub const ALL: u32 = u32::MAX;
}

/// Nak body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nak {
    /// Receiver id.
    pub receiver: u64,
    /// Up to [`MAX_NAK_ENTRIES`] lines.
    pub entries: Vec<NakEntry>,
}

/// Status body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Receiver id.
    pub receiver: u64,
    /// Blocks verified (including zero and resumed blocks).
    pub blocks_done: u32,
    /// Bytes verified.
    pub bytes_done: u64,
    /// Data packets received.
    pub received: u64,
    /// Data packets of the in-order pass detected as lost.
    pub lost: u64,
    /// Blocks or packets rejected (bad hash, forged, malformed).
    pub rejected: u32,
}

/// Done body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done<'a> {
    /// Receiver id.
    pub receiver: u64,
    /// Image verified on disk.
    pub ok: bool,
    /// Why not, or a note.
    pub reason: &'a str,
}

const T_ANNOUNCE: u8 = 0x01;
const T_MANIFEST_CHUNK: u8 = 0x02;
const T_DATA: u8 = 0x03;
const T_PREPARING: u8 = 0x04;
const T_JOIN: u8 = 0x10;
const T_JOIN_ACK: u8 = 0x11;
const T_NAK: u8 = 0x12;
const T_STATUS: u8 = 0x13;
const T_DONE: u8 = 0x14;
const T_DONE_ACK: u8 = 0x15;
const T_CATCH_UP: u8 = 0x16;
const T_END: u8 = 0x20;

impl Body<'_> {
    /// The packet type's name (for logs and errors).
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Announce(_) => "announce",
            Body::ManifestChunk(_) => "manifest-chunk",
            Body::Data(_) => "data",
            Body::Preparing(_) => "preparing",
            Body::Join(_) => "join",
            Body::JoinAck { .. } => "join-ack",
            Body::Nak(_) => "nak",
            Body::Status(_) => "status",
            Body::Done(_) => "done",
            Body::DoneAck { .. } => "done-ack",
            Body::CatchUp { .. } => "catch-up",
            Body::End { .. } => "end",
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Body::Announce(_) => T_ANNOUNCE,
            Body::ManifestChunk(_) => T_MANIFEST_CHUNK,
            Body::Data(_) => T_DATA,
            Body::Preparing(_) => T_PREPARING,
            Body::Join(_) => T_JOIN,
            Body::JoinAck { .. } => T_JOIN_ACK,
            Body::Nak(_) => T_NAK,
            Body::Status(_) => T_STATUS,
            Body::Done(_) => T_DONE,
            Body::DoneAck { .. } => T_DONE_ACK,
            Body::CatchUp { .. } => T_CATCH_UP,
            Body::End { .. } => T_END,
        }
    }
}

fn kind_name(t: u8) -> &'static str {
    match t {
        T_ANNOUNCE => "announce",
        T_MANIFEST_CHUNK => "manifest-chunk",
        T_DATA => "data",
        T_PREPARING => "preparing",
        T_JOIN => "join",
        T_JOIN_ACK => "join-ack",
        T_NAK => "nak",
        T_STATUS => "status",
        T_DONE => "done",
        T_DONE_ACK => "done-ack",
        T_CATCH_UP => "catch-up",
        T_END => "end",
        _ => "unknown",
    }
}

impl<'a> Packet<'a> {
    /// A packet.
    pub fn new(session: SessionId, body: Body<'a>) -> Self {
        Packet { session, body }
    }

    /// Decodes one datagram.
    pub fn decode(buf: &'a [u8]) -> Result<Packet<'a>, PacketError> {
        if buf.len() < HEADER_LEN {
            return Err(PacketError::TooShort {
                len: buf.len(),
                need: HEADER_LEN,
            });
        }
        let magic = [buf[0], buf[1], buf[2], buf[3]];
        if magic != MAGIC {
            return Err(PacketError::BadMagic { found: magic });
        }
        if buf[4] != VERSION {
            return Err(PacketError::UnsupportedVersion {
                version: buf[4],
                supported: VERSION,
            });
        }
        let t = buf[5];
        let kind = kind_name(t);
        if kind == "unknown" {
            return Err(PacketError::UnknownType { kind: t });
        }
        let mut sid = [0u8; 8];
        sid.copy_from_slice(&buf[6..14]);
        let session = SessionId(u64::from_be_bytes(sid));
        let mut r = Reader {
            buf,
            pos: HEADER_LEN,
            kind,
        };
        let body = match t {
            T_ANNOUNCE => {
                let flags = r.u8("flags")?;
                let manifest_len = r.u32("manifest_len")?;
                let mut manifest_hash = [0u8; 32];
                manifest_hash.copy_from_slice(r.take(32, "manifest_hash")?);
                Body::Announce(Announce {
                    flags,
                    manifest_len,
                    manifest_hash,
                    tcp_port: r.u16("tcp_port")?,
                    symbol_size: r.u16("symbol_size")?,
                    block_size: r.u32("block_size")?,
                    block_count: r.u32("block_count")?,
                    image_size: r.u64("image_size")?,
                    pass_pos: r.u32("pass_pos")?,
                    rate_bps: r.u64("rate_bps")?,
                })
            }
            T_MANIFEST_CHUNK => {
                let offset = r.u32("offset")?;
                let total_len = r.u32("total_len")?;
                let bytes = r.rest();
                if u64::from(offset) + bytes.len() as u64 > u64::from(total_len) {
                    return Err(PacketError::InvalidField {
                        kind,
                        field: "offset",
                        value: u64::from(offset),
                    });
                }
                Body::ManifestChunk(ManifestChunk {
                    offset,
                    total_len,
                    bytes,
                })
            }
            T_DATA => {
                let block = r.u32("block")?;
                let esi = r.u16("esi")?;
                let k = r.u16("k")?;
                let payload_len = r.u32("payload_len")?;
                let flags = r.u8("flags")?;
                let symbol = r.rest();
                if k == 0 || usize::from(k) > crate::block::MAX_SOURCE_SYMBOLS {
                    return Err(PacketError::InvalidField {
                        kind,
                        field: "k",
                        value: u64::from(k),
                    });
                }
                if symbol.is_empty() {
                    return Err(PacketError::Truncated {
                        kind,
                        field: "symbol",
                        need: 1,
                        left: 0,
                    });
                }
                if flags & !(DATA_COMPRESSED | DATA_REPAIR) != 0 {
                    return Err(PacketError::InvalidField {
                        kind,
                        field: "flags",
                        value: u64::from(flags),
                    });
                }
                Body::Data(Data {
                    block,
                    esi,
                    k,
                    payload_len,
                    flags,
                    symbol,
                })
            }
            T_PREPARING => {
                let image_size = r.u64("image_size")?;
                let bytes_done = r.u64("bytes_done")?;
                if image_size != 0 && bytes_done > image_size {
                    return Err(PacketError::InvalidField {
                        kind,
                        field: "bytes_done",
                        value: bytes_done,
                    });
                }
                Body::Preparing(Preparing {
                    image_size,
                    bytes_done,
                })
            }
            T_JOIN => {
                let receiver = r.u64("receiver")?;
                let flags = r.u8("flags")?;
                let len = usize::from(r.u8("name_len")?);
                if len > MAX_NAME_LEN {
                    return Err(PacketError::InvalidField {
                        kind,
                        field: "name_len",
                        value: len as u64,
                    });
                }
                let name = r.str(len, "name")?;
                Body::Join(Join {
                    receiver,
                    flags,
                    name,
                })
            }
            T_JOIN_ACK => Body::JoinAck {
                receiver: r.u64("receiver")?,
            },
            T_NAK => {
                let receiver = r.u64("receiver")?;
                let count = usize::from(r.u16("count")?);
                if count > MAX_NAK_ENTRIES {
                    return Err(PacketError::InvalidField {
                        kind,
                        field: "count",
                        value: count as u64,
                    });
                }
                let left = r.left();
                if left < count * 12 {
                    return Err(PacketError::Truncated {
                        kind,
                        field: "entries",
                        need: count * 12,
                        left,
                    });
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(NakEntry {
                        block: r.u32("block")?,
                        needed: r.u32("needed")?,
                        seen: r.u32("seen")?,
                    });
                }
                Body::Nak(Nak { receiver, entries })
            }
            T_STATUS => Body::Status(Status {
                receiver: r.u64("receiver")?,
                blocks_done: r.u32("blocks_done")?,
                bytes_done: r.u64("bytes_done")?,
                received: r.u64("received")?,
                lost: r.u64("lost")?,
                rejected: r.u32("rejected")?,
            }),
            T_DONE => {
                let receiver = r.u64("receiver")?;
                let ok = match r.u8("ok")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(PacketError::InvalidField {
                            kind,
                            field: "ok",
                            value: u64::from(v),
                        });
                    }
                };
                let len = usize::from(r.u16("reason_len")?);
                if len > MAX_REASON_LEN {
                    return Err(PacketError::InvalidField {
                        kind,
                        field: "reason_len",
                        value: len as u64,
                    });
                }
                let reason = r.str(len, "reason")?;
                Body::Done(Done {
                    receiver,
                    ok,
                    reason,
                })
            }
            T_DONE_ACK => Body::DoneAck {
                receiver: r.u64("receiver")?,
            },
            T_CATCH_UP => Body::CatchUp {
                receiver: r.u64("receiver")?,
            },
            T_END => Body::End {
                flags: r.u8("flags")?,
            },
            _ => return Err(PacketError::UnknownType { kind: t }),
        };
        if r.left() != 0 {
            return Err(PacketError::TrailingBytes {
                kind,
                extra: r.left(),
            });
        }
        Ok(Packet { session, body })
    }

    /// Exact encoded length.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match &self.body {
                Body::Announce(_) => 1 + 4 + 32 + 2 + 2 + 4 + 4 + 8 + 4 + 8,
                Body::ManifestChunk(c) => 8 + c.bytes.len(),
                Body::Data(d) => 13 + d.symbol.len(),
                Body::Preparing(_) => 16,
                Body::Join(j) => 10 + j.name.len().min(MAX_NAME_LEN),
                Body::JoinAck { .. } | Body::DoneAck { .. } | Body::CatchUp { .. } => 8,
                Body::Nak(n) => 10 + 12 * n.entries.len().min(MAX_NAK_ENTRIES),
                Body::Status(_) => 8 + 4 + 8 + 8 + 8 + 4,
                Body::Done(d) => 11 + truncate_str(d.reason, MAX_REASON_LEN).len(),
                Body::End { .. } => 1,
            }
    }

    /// Appends the encoding to `out`. Over-long names, reasons and NAK lists are truncated to
    /// their limits so the result always decodes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.body.type_byte());
        out.extend_from_slice(&self.session.0.to_be_bytes());
        match &self.body {
            Body::Announce(a) => {
                out.push(a.flags);
                out.extend_from_slice(&a.manifest_len.to_be_bytes());
                out.extend_from_slice(&a.manifest_hash);
                out.extend_from_slice(&a.tcp_port.to_be_bytes());
                out.extend_from_slice(&a.symbol_size.to_be_bytes());
                out.extend_from_slice(&a.block_size.to_be_bytes());
                out.extend_from_slice(&a.block_count.to_be_bytes());
                out.extend_from_slice(&a.image_size.to_be_bytes());
                out.extend_from_slice(&a.pass_pos.to_be_bytes());
                out.extend_from_slice(&a.rate_bps.to_be_bytes());
            }
            Body::ManifestChunk(c) => {
                out.extend_from_slice(&c.offset.to_be_bytes());
                out.extend_from_slice(&c.total_len.to_be_bytes());
                out.extend_from_slice(c.bytes);
            }
            Body::Data(d) => {
                out.extend_from_slice(&d.block.to_be_bytes());
                out.extend_from_slice(&d.esi.to_be_bytes());
                out.extend_from_slice(&d.k.to_be_bytes());
                out.extend_from_slice(&d.payload_len.to_be_bytes());
                out.push(d.flags);
                out.extend_from_slice(d.symbol);
            }
            Body::Preparing(p) => {
                out.extend_from_slice(&p.image_size.to_be_bytes());
                out.extend_from_slice(&p.bytes_done.to_be_bytes());
            }
            Body::Join(j) => {
                let name = truncate_str(j.name, MAX_NAME_LEN);
                out.extend_from_slice(&j.receiver.to_be_bytes());
                out.push(j.flags);
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Body::JoinAck { receiver }
            | Body::DoneAck { receiver }
            | Body::CatchUp { receiver } => {
                out.extend_from_slice(&receiver.to_be_bytes());
            }
            Body::Nak(n) => {
                let entries = &n.entries[..n.entries.len().min(MAX_NAK_ENTRIES)];
                out.extend_from_slice(&n.receiver.to_be_bytes());
                out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
                for e in entries {
                    out.extend_from_slice(&e.block.to_be_bytes());
                    out.extend_from_slice(&e.needed.to_be_bytes());
                    out.extend_from_slice(&e.seen.to_be_bytes());
                }
            }
            Body::Status(s) => {
                out.extend_from_slice(&s.receiver.to_be_bytes());
                out.extend_from_slice(&s.blocks_done.to_be_bytes());
                out.extend_from_slice(&s.bytes_done.to_be_bytes());
                out.extend_from_slice(&s.received.to_be_bytes());
                out.extend_from_slice(&s.lost.to_be_bytes());
                out.extend_from_slice(&s.rejected.to_be_bytes());
            }
            Body::Done(d) => {
                let reason = truncate_str(d.reason, MAX_REASON_LEN);
                out.extend_from_slice(&d.receiver.to_be_bytes());
                out.push(u8::from(d.ok));
                out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
            Body::End { flags } => out.push(*flags),
        }
    }

    /// Encodes into `buf`, returning the length written.
    pub fn encode_to_slice(&self, buf: &mut [u8]) -> Result<usize, PacketError> {
        let need = self.encoded_len();
        if buf.len() < need {
            return Err(PacketError::BufferTooSmall {
                need,
                have: buf.len(),
            });
        }
        let mut v = Vec::with_capacity(need);
        self.encode(&mut v);
        buf[..v.len()].copy_from_slice(&v);
        Ok(v.len())
    }
}

/// Writes a Data packet straight into `out` without building a [`Packet`] (the sender's hot
/// path).
pub(crate) fn encode_data(out: &mut Vec<u8>, session: SessionId, d: &Data<'_>) {
    Packet::new(session, Body::Data(*d)).encode(out);
}

fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    kind: &'static str,
}

// The field readers run several times per datagram (tens of thousands per second per
// receiver): forced inline (a plain `#[inline]` left `u16`/`u32` as calls in `decode`,
// 1.5 % of a receiver's samples in a profile), with the error built out of line.
impl<'a> Reader<'a> {
    #[inline(always)]
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    #[cold]
    #[inline(never)]
    fn truncated(&self, n: usize, field: &'static str) -> PacketError {
        PacketError::Truncated {
            kind: self.kind,
            field,
            need: n,
            left: self.left(),
        }
    }
    #[inline(always)]
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], PacketError> {
        if self.left() < n {
            return Err(self.truncated(n, field));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    #[inline(always)]
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn str(&mut self, n: usize, field: &'static str) -> Result<&'a str, PacketError> {
        let b = self.take(n, field)?;
        std::str::from_utf8(b).map_err(|_| PacketError::InvalidUtf8 {
            kind: self.kind,
            field,
        })
    }
    #[inline(always)]
    fn u8(&mut self, f: &'static str) -> Result<u8, PacketError> {
        Ok(self.take(1, f)?[0])
    }
    #[inline(always)]
    fn u16(&mut self, f: &'static str) -> Result<u16, PacketError> {
        let b = self.take(2, f)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn u32(&mut self, f: &'static str) -> Result<u32, PacketError> {
        let b = self.take(4, f)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    #[inline(always)]
    fn u64(&mut self, f: &'static str) -> Result<u64, PacketError> {
        let b = self.take(8, f)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: SessionId = SessionId(0x0123_4567_89ab_cdef);

    fn round_trip(body: Body<'_>) {
        let p = Packet::new(S, body);
        let mut v = Vec::new();
        p.encode(&mut v);
        assert_eq!(v.len(), p.encoded_len(), "{p:?}");
        assert_eq!(Packet::decode(&v).unwrap(), p);
        let mut arr = [0u8; 2048];
        let n = p.encode_to_slice(&mut arr).unwrap();
        assert_eq!(&arr[..n], &v[..]);
        // Every strict prefix fails cleanly (no panic). Bodies ending in a variable-length
        // tail may decode from a shorter prefix, so only check that nothing panics.
        for cut in 0..v.len() {
            let _ = Packet::decode(&v[..cut]);
        }
    }

    fn announce() -> Announce {
        Announce {
            flags: ANNOUNCE_STARTED,
            manifest_len: 1234,
            manifest_hash: [9; 32],
            tcp_port: 4711,
            symbol_size: 1440,
            block_size: 1 << 20,
            block_count: 77,
            image_size: 77 << 20,
            pass_pos: 12,
            rate_bps: 800_000_000,
        }
    }

    #[test]
    fn announce_round_trip() {
        round_trip(Body::Announce(announce()));
    }

    #[test]
    fn preparing_round_trip_and_bounds() {
        round_trip(Body::Preparing(Preparing {
            image_size: 2 << 40,
            bytes_done: 1 << 40,
        }));
        // Size not known yet (standard input being spooled): any count goes.
        round_trip(Body::Preparing(Preparing {
            image_size: 0,
            bytes_done: 123,
        }));
        let mut v = Vec::new();
        Packet::new(
            S,
            Body::Preparing(Preparing {
                image_size: 10,
                bytes_done: 11,
            }),
        )
        .encode(&mut v);
        assert!(matches!(
            Packet::decode(&v),
            Err(PacketError::InvalidField {
                field: "bytes_done",
                ..
            })
        ));
        // One byte short, one byte over.
        assert!(Packet::decode(&v[..v.len() - 1]).is_err());
        v.truncate(v.len() - 8);
        v.extend_from_slice(&5u64.to_be_bytes());
        v.push(0);
        assert!(matches!(
            Packet::decode(&v),
            Err(PacketError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn manifest_chunk_round_trip_and_bounds() {
        round_trip(Body::ManifestChunk(ManifestChunk {
            offset: 1200,
            total_len: 2000,
            bytes: &[1; 800],
        }));
        let mut v = Vec::new();
        Packet::new(
            S,
            Body::ManifestChunk(ManifestChunk {
                offset: 1500,
                total_len: 2000,
                bytes: &[1; 800],
            }),
        )
        .encode(&mut v);
        assert!(matches!(
            Packet::decode(&v),
            Err(PacketError::InvalidField {
                field: "offset",
                ..
            })
        ));
    }

    #[test]
    fn data_round_trip_is_zero_copy() {
        let sym = [0xabu8; 1440];
        let d = Data {
            block: 3,
            esi: 700,
            k: 729,
            payload_len: 1_000_000,
            flags: DATA_COMPRESSED | DATA_REPAIR,
            symbol: &sym,
        };
        round_trip(Body::Data(d));
        let mut v = Vec::new();
        Packet::new(S, Body::Data(d)).encode(&mut v);
        assert_eq!(v.len(), DATA_OVERHEAD + 1440);
        let Body::Data(got) = Packet::decode(&v).unwrap().body else {
            panic!("not data")
        };
        assert_eq!(got.symbol.as_ptr(), v[DATA_OVERHEAD..].as_ptr());
    }

    #[test]
    fn data_rejects_zero_k_and_unknown_flags() {
        let sym = [1u8; 8];
        for (k, flags, field) in [(0u16, 0u8, "k"), (40000, 0, "k"), (1, 0x80, "flags")] {
            let mut v = Vec::new();
            Packet::new(
                S,
                Body::Data(Data {
                    block: 0,
                    esi: 0,
                    k,
                    payload_len: 8,
                    flags,
                    symbol: &sym,
                }),
            )
            .encode(&mut v);
            match Packet::decode(&v) {
                Err(PacketError::InvalidField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn join_round_trip_and_limits() {
        round_trip(Body::Join(Join {
            receiver: 42,
            flags: JOIN_HAS_MANIFEST,
            name: "web01.example",
        }));
        // Over-long names are truncated on encode (at a char boundary) so they still decode.
        let long = "é".repeat(40);
        let mut v = Vec::new();
        Packet::new(
            S,
            Body::Join(Join {
                receiver: 1,
                flags: 0,
                name: &long,
            }),
        )
        .encode(&mut v);
        let Body::Join(j) = Packet::decode(&v).unwrap().body else {
            panic!()
        };
        assert_eq!(j.name.len(), 64);
        // Invalid UTF-8 is a typed error.
        let mut bad = Vec::new();
        Packet::new(
            S,
            Body::Join(Join {
                receiver: 1,
                flags: 0,
                name: "ab",
            }),
        )
        .encode(&mut bad);
        let n = bad.len();
        bad[n - 1] = 0xff;
        assert!(matches!(
            Packet::decode(&bad),
            Err(PacketError::InvalidUtf8 { field: "name", .. })
        ));
    }

    #[test]
    fn acks_and_end_round_trip() {
        round_trip(Body::JoinAck { receiver: 7 });
        round_trip(Body::DoneAck { receiver: 8 });
        round_trip(Body::CatchUp { receiver: 9 });
        round_trip(Body::End { flags: END_ABORTED });
    }

    #[test]
    fn nak_round_trip_and_count_limit() {
        let entries: Vec<NakEntry> = (0..MAX_NAK_ENTRIES as u32)
            .map(|i| NakEntry {
                block: i,
                needed: if i == 0 { NakEntry::ALL } else { i },
                seen: i * 2,
            })
            .collect();
        round_trip(Body::Nak(Nak {
            receiver: 5,
            entries: entries.clone(),
        }));
        // A count larger than the limit is refused before anything is allocated.
        let mut v = Vec::new();
        Packet::new(
            S,
            Body::Nak(Nak {
                receiver: 5,
                entries: vec![],
            }),
        )
        .encode(&mut v);
        let n = v.len();
        v[n - 2..].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            Packet::decode(&v),
            Err(PacketError::InvalidField { field: "count", .. })
        ));
        // A count the bytes do not back is truncation.
        v[n - 2..].copy_from_slice(&3u16.to_be_bytes());
        assert!(matches!(
            Packet::decode(&v),
            Err(PacketError::Truncated {
                field: "entries",
                ..
            })
        ));
    }

    #[test]
    fn status_round_trip() {
        round_trip(Body::Status(Status {
            receiver: 1,
            blocks_done: 2,
            bytes_done: 3,
            received: 4,
            lost: 5,
            rejected: 6,
        }));
    }

    #[test]
    fn done_round_trip() {
        round_trip(Body::Done(Done {
            receiver: 9,
            ok: false,
            reason: "image hash mismatch after read-back",
        }));
    }

    #[test]
    fn header_errors() {
        assert!(matches!(
            Packet::decode(b"CRC"),
            Err(PacketError::TooShort { len: 3, .. })
        ));
        let mut v = Vec::new();
        Packet::new(S, Body::End { flags: 0 }).encode(&mut v);
        let mut bad = v.clone();
        bad[0] = b'X';
        assert!(matches!(
            Packet::decode(&bad),
            Err(PacketError::BadMagic { .. })
        ));
        let mut bad = v.clone();
        bad[4] = 9;
        assert!(matches!(
            Packet::decode(&bad),
            Err(PacketError::UnsupportedVersion { version: 9, .. })
        ));
        let mut bad = v.clone();
        bad[5] = 0x7f;
        assert!(matches!(
            Packet::decode(&bad),
            Err(PacketError::UnknownType { kind: 0x7f })
        ));
        let mut long = v.clone();
        long.push(0);
        assert!(matches!(
            Packet::decode(&long),
            Err(PacketError::TrailingBytes { extra: 1, .. })
        ));
        let mut small = [0u8; 4];
        assert!(matches!(
            Packet::new(S, Body::End { flags: 0 }).encode_to_slice(&mut small),
            Err(PacketError::BufferTooSmall { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = Packet::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_with_valid_header(
            kind in prop::sample::select(vec![1u8, 2, 3, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x20]),
            body in proptest::collection::vec(any::<u8>(), 0..1600),
        ) {
            let mut v = MAGIC.to_vec();
            v.push(VERSION);
            v.push(kind);
            v.extend_from_slice(&[0; 8]);
            v.extend_from_slice(&body);
            if let Ok(p) = Packet::decode(&v) {
                // Whatever decodes re-encodes to the same bytes.
                let mut out = Vec::new();
                p.encode(&mut out);
                prop_assert_eq!(out, v);
            }
        }

        #[test]
        fn data_round_trips(block: u32, esi: u16, k in 1u16..=32768, payload_len: u32,
                            flags in 0u8..4, symbol in proptest::collection::vec(any::<u8>(), 1..1500)) {
            let d = Data { block, esi, k, payload_len, flags, symbol: &symbol };
            let p = Packet::new(S, Body::Data(d));
            let mut v = Vec::new();
            p.encode(&mut v);
            prop_assert_eq!(Packet::decode(&v).unwrap(), p);
        }

        #[test]
        fn nak_round_trips(receiver: u64, raw in proptest::collection::vec((any::<u32>(), any::<u32>(), any::<u32>()), 0..=MAX_NAK_ENTRIES)) {
            let entries = raw.into_iter().map(|(block, needed, seen)| NakEntry { block, needed, seen }).collect();
            let p = Packet::new(S, Body::Nak(Nak { receiver, entries }));
            let mut v = Vec::new();
            p.encode(&mut v);
            prop_assert_eq!(Packet::decode(&v).unwrap(), p);
        }

        #[test]
        fn text_round_trips(receiver: u64, ok: bool, name in "\\PC{0,64}", reason in "\\PC{0,200}") {
            let name = truncate_str(&name, MAX_NAME_LEN);
            let p = Packet::new(S, Body::Join(Join { receiver, flags: 0, name }));
            let mut v = Vec::new();
            p.encode(&mut v);
            prop_assert_eq!(Packet::decode(&v).unwrap(), p);
            let p = Packet::new(S, Body::Done(Done { receiver, ok, reason: &reason }));
            let mut v = Vec::new();
            p.encode(&mut v);
            prop_assert_eq!(Packet::decode(&v).unwrap(), p);
        }
    }
}
