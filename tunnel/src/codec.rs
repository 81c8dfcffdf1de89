//! The cannelloni UDP datagram format (version 2): encoding frames into MTU-bounded datagrams
//! and decoding datagrams with typed rejections.
//!
//! Wire layout (all multi-byte fields big-endian):
//!
//! ```text
//! header:  version u8 (= 2) | op_code u8 (DATA = 0) | seq_no u8 | count u16
//! frame:   can_id u32 (EFF/RTR/ERR flags included) | len u8 (0x80 = CAN FD)
//!          | flags u8 (FD frames only) | data[len & 0x7f] (absent when RTR is set)
//! ```
//!
//! Decoding trusts nothing in the datagram: counts and lengths are checked against the bytes
//! actually present and nothing is allocated from a received count. Where the framing itself is
//! broken (a bad header, a count or a length that does not match the bytes) the datagram is
//! rejected as a whole, since no frame boundary after the fault can be trusted. Where one frame
//! is bad but its extent is unambiguous, only that frame is affected: an FD length that no DLC
//! encodes (9, 33, ...) is rounded up to the next valid length with zero padding, as the kernel
//! does with such frames (`canfd_sanitize_len`), and an FD frame with the RTR flag is dropped
//! and counted ([`Header::fd_remote_dropped`]).
#![forbid(unsafe_code)]

/// The only format version this codec speaks.
pub const VERSION: u8 = 2;
/// The op code of a data datagram (the only one cannelloni sends).
pub const OP_DATA: u8 = 0;
/// Bytes of the datagram header.
pub const HEADER_LEN: usize = 5;
/// Bytes of a frame before its optional FD flags and data (`can_id` + `len`).
pub const FRAME_HEADER_LEN: usize = 5;
/// The largest encoded frame: an FD frame with 64 data bytes.
pub const MAX_FRAME_LEN: usize = FRAME_HEADER_LEN + 1 + 64;
/// The smallest datagram size limit the encoder accepts: a header plus the largest frame.
pub const MIN_DATAGRAM_LEN: usize = HEADER_LEN + MAX_FRAME_LEN;

/// `can_id` flag: 29-bit (extended) identifier.
pub const CAN_EFF_FLAG: u32 = 0x8000_0000;
/// `can_id` flag: remote transmission request.
pub const CAN_RTR_FLAG: u32 = 0x4000_0000;
/// `can_id` flag: error message frame.
pub const CAN_ERR_FLAG: u32 = 0x2000_0000;
/// Mask of a 29-bit identifier.
pub const CAN_EFF_MASK: u32 = 0x1fff_ffff;
/// Mask of an 11-bit identifier.
pub const CAN_SFF_MASK: u32 = 0x0000_07ff;
/// The bit of the `len` byte that marks a CAN FD frame.
pub const FD_LEN_FLAG: u8 = 0x80;
/// FD flag: bit rate switch.
pub const CANFD_BRS: u8 = 0x01;
/// FD flag: error state indicator.
pub const CANFD_ESI: u8 = 0x02;

const CLASSIC_MAX_LEN: u8 = 8;
const FD_MAX_LEN: u8 = 64;

/// Whether `len` is a payload length a CAN FD frame can have (0..=8, 12, 16, 20, 24, 32, 48, 64).
pub fn is_valid_fd_len(len: u8) -> bool {
    matches!(len, 0..=8 | 12 | 16 | 20 | 24 | 32 | 48 | 64)
}

/// One CAN frame as carried by the tunnel: Classic (data or remote) or FD.
///
/// The identifier word keeps the Linux `can_id` layout, flags included, so it goes to and from
/// the wire and the socket unchanged.
///
/// ```
/// use can_dra_tunnel::codec::Frame;
/// let frame = Frame::classic(0x123, &[0xde, 0xad]).unwrap();
/// assert_eq!((frame.id(), frame.data()), (0x123, &[0xde, 0xad][..]));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frame {
    can_id: u32,
    /// `Some(flags)` for an FD frame.
    fd_flags: Option<u8>,
    /// Payload length; for a remote frame, the requested DLC.
    len: u8,
    /// Bytes past `len` (and all bytes of a remote frame) are zero, so derived equality is
    /// equality of what goes on the wire.
    data: [u8; 64],
}

/// Why a [`Frame`] cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More payload than the frame kind carries.
    #[error("a {kind} frame carries at most {max} data bytes, got {len}")]
    TooLong {
        /// "Classic" or "FD".
        kind: &'static str,
        /// The limit.
        max: u8,
        /// The length given.
        len: usize,
    },
    /// A length CAN FD cannot encode in a DLC.
    #[error("{len} is not a CAN FD payload length (0-8, 12, 16, 20, 24, 32, 48, 64)")]
    InvalidFdLength {
        /// The length given.
        len: usize,
    },
    /// CAN FD has no remote frames.
    #[error("a CAN FD frame cannot be a remote frame")]
    FdRemote,
}

impl Frame {
    /// A Classic data frame (or an error frame, if `can_id` has [`CAN_ERR_FLAG`]); `can_id` must
    /// not carry [`CAN_RTR_FLAG`] (use [`Frame::remote`]), it is cleared if it does.
    pub fn classic(can_id: u32, data: &[u8]) -> Result<Self, FrameError> {
        if data.len() > usize::from(CLASSIC_MAX_LEN) {
            return Err(FrameError::TooLong {
                kind: "Classic",
                max: CLASSIC_MAX_LEN,
                len: data.len(),
            });
        }
        Ok(Self::filled(can_id & !CAN_RTR_FLAG, None, data))
    }

    /// A Classic remote frame requesting `dlc` bytes (0..=8).
    pub fn remote(can_id: u32, dlc: u8) -> Result<Self, FrameError> {
        if dlc > CLASSIC_MAX_LEN {
            return Err(FrameError::TooLong {
                kind: "Classic",
                max: CLASSIC_MAX_LEN,
                len: usize::from(dlc),
            });
        }
        Ok(Self {
            can_id: can_id | CAN_RTR_FLAG,
            fd_flags: None,
            len: dlc,
            data: [0; 64],
        })
    }

    /// A CAN FD frame with the given FD flags byte ([`CANFD_BRS`], [`CANFD_ESI`], ...).
    pub fn fd(can_id: u32, flags: u8, data: &[u8]) -> Result<Self, FrameError> {
        if can_id & CAN_RTR_FLAG != 0 {
            return Err(FrameError::FdRemote);
        }
        if data.len() > usize::from(FD_MAX_LEN) {
            return Err(FrameError::TooLong {
                kind: "FD",
                max: FD_MAX_LEN,
                len: data.len(),
            });
        }
        let len = u8::try_from(data.len()).unwrap_or(u8::MAX);
        if !is_valid_fd_len(len) {
            return Err(FrameError::InvalidFdLength { len: data.len() });
        }
        Ok(Self::filled(can_id, Some(flags), data))
    }

    fn filled(can_id: u32, fd_flags: Option<u8>, data: &[u8]) -> Self {
        let mut bytes = [0; 64];
        bytes[..data.len()].copy_from_slice(data);
        Self {
            can_id,
            fd_flags,
            len: u8::try_from(data.len()).unwrap_or(u8::MAX),
            data: bytes,
        }
    }

    /// The identifier word with its EFF/RTR/ERR flags, as in Linux `can_id`.
    pub fn can_id(&self) -> u32 {
        self.can_id
    }

    /// The identifier without flags (11 or 29 bits).
    pub fn id(&self) -> u32 {
        if self.is_extended() {
            self.can_id & CAN_EFF_MASK
        } else {
            self.can_id & CAN_SFF_MASK
        }
    }

    /// Whether the identifier is 29 bits wide.
    pub fn is_extended(&self) -> bool {
        self.can_id & CAN_EFF_FLAG != 0
    }

    /// Whether this is a remote (RTR) frame.
    pub fn is_remote(&self) -> bool {
        self.can_id & CAN_RTR_FLAG != 0
    }

    /// Whether this is an error message frame.
    pub fn is_error(&self) -> bool {
        self.can_id & CAN_ERR_FLAG != 0
    }

    /// Whether this is a CAN FD frame.
    pub fn is_fd(&self) -> bool {
        self.fd_flags.is_some()
    }

    /// The FD flags byte, for FD frames.
    pub fn fd_flags(&self) -> Option<u8> {
        self.fd_flags
    }

    /// The payload length, or the requested DLC of a remote frame.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether the frame has no payload (a remote frame never has one).
    pub fn is_empty(&self) -> bool {
        self.data().is_empty()
    }

    /// The payload (empty for a remote frame).
    pub fn data(&self) -> &[u8] {
        if self.is_remote() {
            &[]
        } else {
            &self.data[..usize::from(self.len)]
        }
    }

    /// Bytes this frame takes in a datagram.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + usize::from(self.fd_flags.is_some()) + self.data().len()
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.can_id.to_be_bytes());
        match self.fd_flags {
            Some(flags) => {
                out.push(self.len | FD_LEN_FLAG);
                out.push(flags);
            }
            None => out.push(self.len),
        }
        out.extend_from_slice(self.data());
    }
}

/// Why the encoder cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncoderError {
    /// The size limit cannot hold even one frame of every kind.
    #[error(
        "a datagram limit of {limit} bytes is below the {MIN_DATAGRAM_LEN} bytes one FD frame needs"
    )]
    LimitTooSmall {
        /// The limit given.
        limit: usize,
    },
}

/// Packs frames into datagrams no larger than a limit, numbering them with a wrapping
/// sequence number as cannelloni does.
///
/// ```
/// use can_dra_tunnel::codec::{Encoder, Frame};
/// let mut encoder = Encoder::new(1472).unwrap();
/// let frames = [Frame::classic(0x1, &[1, 2]).unwrap()];
/// let datagrams = encoder.encode_all(&frames);
/// assert_eq!(datagrams, vec![vec![2, 0, 0, 0, 1, 0, 0, 0, 1, 2, 1, 2]]);
/// ```
#[derive(Debug, Clone)]
pub struct Encoder {
    limit: usize,
    seq: u8,
}

impl Encoder {
    /// An encoder whose datagrams are at most `limit` bytes (the UDP payload size: a 1500-byte
    /// IPv4 link MTU leaves 1472).
    pub fn new(limit: usize) -> Result<Self, EncoderError> {
        if limit < MIN_DATAGRAM_LEN {
            return Err(EncoderError::LimitTooSmall { limit });
        }
        Ok(Self { limit, seq: 0 })
    }

    /// The datagram size limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Writes one datagram holding as many of `frames` (from the front) as fit into `out`
    /// (cleared first) and returns how many it took. Returns 0, leaving `out` empty, when
    /// `frames` is empty.
    pub fn encode_one(&mut self, frames: &[Frame], out: &mut Vec<u8>) -> usize {
        out.clear();
        if frames.is_empty() {
            return 0;
        }
        out.extend_from_slice(&[VERSION, OP_DATA, self.seq, 0, 0]);
        let mut taken: u16 = 0;
        for frame in frames {
            if out.len() + frame.encoded_len() > self.limit || taken == u16::MAX {
                break;
            }
            frame.encode_into(out);
            taken += 1;
        }
        out[3..5].copy_from_slice(&taken.to_be_bytes());
        self.seq = self.seq.wrapping_add(1);
        usize::from(taken)
    }

    /// Encodes all `frames` into as many datagrams as the limit requires, in order.
    pub fn encode_all(&mut self, frames: &[Frame]) -> Vec<Vec<u8>> {
        let mut datagrams = Vec::new();
        let mut rest = frames;
        while !rest.is_empty() {
            let mut datagram = Vec::with_capacity(self.limit.min(4096));
            let taken = self.encode_one(rest, &mut datagram);
            if taken == 0 {
                // Unreachable while the limit holds the largest frame; never spin.
                break;
            }
            datagrams.push(datagram);
            rest = &rest[taken..];
        }
        datagrams
    }
}

/// Why a datagram was rejected. Every variant maps to one [`RejectReason`] counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("datagram of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    ShortHeader {
        /// The datagram length.
        len: usize,
    },
    /// A version other than [`VERSION`].
    #[error("unsupported format version {version} (expected {VERSION})")]
    WrongVersion {
        /// The version received.
        version: u8,
    },
    /// An op code other than [`OP_DATA`].
    #[error("unsupported op code {op_code} (only DATA = {OP_DATA} carries frames)")]
    WrongOpCode {
        /// The op code received.
        op_code: u8,
    },
    /// The header announced more frames than the datagram holds.
    #[error("header announces {count} frames but the datagram ends after {decoded}")]
    CountBeyondPayload {
        /// The announced count.
        count: u16,
        /// Complete frames present.
        decoded: u16,
    },
    /// A frame ends past the end of the datagram.
    #[error("frame {index} is truncated: it needs {needed} more bytes than the datagram has")]
    TruncatedFrame {
        /// The frame's position in the datagram.
        index: u16,
        /// Missing bytes.
        needed: usize,
    },
    /// A payload length beyond what the frame kind carries.
    #[error("frame {index} has length {len}, above the {max} bytes of a {kind} frame")]
    OversizedLength {
        /// The frame's position in the datagram.
        index: u16,
        /// "Classic" or "FD".
        kind: &'static str,
        /// The length received (without the FD bit).
        len: u8,
        /// The limit.
        max: u8,
    },
    /// Bytes left over after the announced frames.
    #[error("{extra} bytes follow the {count} announced frames")]
    TrailingBytes {
        /// The announced count.
        count: u16,
        /// Bytes left over.
        extra: usize,
    },
}

/// A rejection reason, for counting ([`DecodeError::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// [`DecodeError::ShortHeader`].
    ShortHeader,
    /// [`DecodeError::WrongVersion`].
    WrongVersion,
    /// [`DecodeError::WrongOpCode`].
    WrongOpCode,
    /// [`DecodeError::CountBeyondPayload`].
    CountBeyondPayload,
    /// [`DecodeError::TruncatedFrame`].
    TruncatedFrame,
    /// [`DecodeError::OversizedLength`].
    OversizedLength,
    /// [`DecodeError::TrailingBytes`].
    TrailingBytes,
}

impl RejectReason {
    /// Every reason, in a stable order (for counter tables).
    pub const ALL: [RejectReason; 7] = [
        RejectReason::ShortHeader,
        RejectReason::WrongVersion,
        RejectReason::WrongOpCode,
        RejectReason::CountBeyondPayload,
        RejectReason::TruncatedFrame,
        RejectReason::OversizedLength,
        RejectReason::TrailingBytes,
    ];

    /// A stable snake_case name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::ShortHeader => "short_header",
            RejectReason::WrongVersion => "wrong_version",
            RejectReason::WrongOpCode => "wrong_op_code",
            RejectReason::CountBeyondPayload => "count_beyond_payload",
            RejectReason::TruncatedFrame => "truncated_frame",
            RejectReason::OversizedLength => "oversized_length",
            RejectReason::TrailingBytes => "trailing_bytes",
        }
    }

    /// The position of this reason in [`RejectReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl DecodeError {
    /// The counter this rejection belongs to.
    pub fn reason(&self) -> RejectReason {
        match self {
            DecodeError::ShortHeader { .. } => RejectReason::ShortHeader,
            DecodeError::WrongVersion { .. } => RejectReason::WrongVersion,
            DecodeError::WrongOpCode { .. } => RejectReason::WrongOpCode,
            DecodeError::CountBeyondPayload { .. } => RejectReason::CountBeyondPayload,
            DecodeError::TruncatedFrame { .. } => RejectReason::TruncatedFrame,
            DecodeError::OversizedLength { .. } => RejectReason::OversizedLength,
            DecodeError::TrailingBytes { .. } => RejectReason::TrailingBytes,
        }
    }
}

/// The header fields of an accepted datagram, and what happened to its odd frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sender's sequence number (informational: UDP does not order, and neither do we).
    pub seq: u8,
    /// Frames in the datagram, as announced (dropped ones included).
    pub count: u16,
    /// FD frames with the RTR flag (CAN FD has no remote frames): skipped, not appended.
    pub fd_remote_dropped: u16,
    /// FD frames whose length no DLC encodes, appended rounded up to the next valid length.
    pub fd_len_rounded: u16,
}

/// Decodes one datagram, appending its frames to `frames`.
///
/// On error (broken framing) `frames` is left as it was. A frame that is bad but whose extent is
/// certain costs only itself (see the module docs and [`Header`]). A count of 0 is a valid,
/// empty datagram. `frames` grows only by frames actually present, so a hostile count cannot make
/// it allocate.
///
/// ```
/// use can_dra_tunnel::codec::{decode, Frame};
/// let mut frames = Vec::new();
/// decode(&[2, 0, 7, 0, 1, 0, 0, 1, 0x23, 1, 0xaa], &mut frames).unwrap();
/// assert_eq!(frames, vec![Frame::classic(0x123, &[0xaa]).unwrap()]);
/// ```
pub fn decode(datagram: &[u8], frames: &mut Vec<Frame>) -> Result<Header, DecodeError> {
    let start = frames.len();
    let result = decode_frames(datagram, frames);
    if result.is_err() {
        frames.truncate(start);
    }
    result
}

fn decode_frames(datagram: &[u8], frames: &mut Vec<Frame>) -> Result<Header, DecodeError> {
    let [version, op_code, seq, count_hi, count_lo, ref body @ ..] = *datagram else {
        return Err(DecodeError::ShortHeader {
            len: datagram.len(),
        });
    };
    if version != VERSION {
        return Err(DecodeError::WrongVersion { version });
    }
    if op_code != OP_DATA {
        return Err(DecodeError::WrongOpCode { op_code });
    }
    let count = u16::from_be_bytes([count_hi, count_lo]);
    let mut header = Header {
        seq,
        count,
        fd_remote_dropped: 0,
        fd_len_rounded: 0,
    };
    let mut rest = body;
    for index in 0..count {
        let (decoded, tail) = decode_frame(rest, index, count)?;
        match decoded {
            Decoded::Frame(frame) => frames.push(frame),
            Decoded::Rounded(frame) => {
                header.fd_len_rounded += 1;
                frames.push(frame);
            }
            Decoded::FdRemote => header.fd_remote_dropped += 1,
        }
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            count,
            extra: rest.len(),
        });
    }
    Ok(header)
}

/// One frame's extent decoded: a frame to append, or one to count and skip.
enum Decoded {
    Frame(Frame),
    /// An FD frame whose length was rounded up to a valid FD length.
    Rounded(Frame),
    /// An FD frame with the RTR flag.
    FdRemote,
}

/// The smallest valid CAN FD payload length at or above `len` (`len` at most 64).
fn round_up_fd_len(len: u8) -> u8 {
    match len {
        0..=8 => len,
        9..=12 => 12,
        13..=16 => 16,
        17..=20 => 20,
        21..=24 => 24,
        25..=32 => 32,
        33..=48 => 48,
        _ => 64,
    }
}

fn decode_frame(bytes: &[u8], index: u16, count: u16) -> Result<(Decoded, &[u8]), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::CountBeyondPayload {
            count,
            decoded: index,
        });
    }
    let truncated = |needed: usize| DecodeError::TruncatedFrame { index, needed };
    let [i0, i1, i2, i3, len_byte, ref rest @ ..] = *bytes else {
        return Err(truncated(FRAME_HEADER_LEN - bytes.len()));
    };
    let can_id = u32::from_be_bytes([i0, i1, i2, i3]);
    let len = len_byte & !FD_LEN_FLAG;
    let remote = can_id & CAN_RTR_FLAG != 0;
    let (fd_flags, rest) = if len_byte & FD_LEN_FLAG != 0 {
        if len > FD_MAX_LEN {
            return Err(DecodeError::OversizedLength {
                index,
                kind: "FD",
                len,
                max: FD_MAX_LEN,
            });
        }
        let [flags, ref rest @ ..] = *rest else {
            return Err(truncated(1 + usize::from(len)));
        };
        (Some(flags), rest)
    } else {
        if len > CLASSIC_MAX_LEN {
            return Err(DecodeError::OversizedLength {
                index,
                kind: "Classic",
                len,
                max: CLASSIC_MAX_LEN,
            });
        }
        (None, rest)
    };
    let carried = if remote { 0 } else { usize::from(len) };
    if rest.len() < carried {
        return Err(truncated(carried - rest.len()));
    }
    let (data, rest) = rest.split_at(carried);
    if fd_flags.is_some() && remote {
        return Ok((Decoded::FdRemote, rest));
    }
    let mut frame = Frame {
        can_id,
        fd_flags,
        len,
        data: [0; 64],
    };
    frame.data[..carried].copy_from_slice(data);
    if fd_flags.is_some() && !is_valid_fd_len(len) {
        // The padding bytes are already zero.
        frame.len = round_up_fd_len(len);
        return Ok((Decoded::Rounded(frame), rest));
    }
    Ok((Decoded::Frame(frame), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(datagram: &[u8]) -> Result<Vec<Frame>, DecodeError> {
        let mut frames = Vec::new();
        decode(datagram, &mut frames).map(|_| frames)
    }

    #[test]
    fn classic_standard_frame_encodes_byte_for_byte() {
        let mut encoder = Encoder::new(1472).unwrap();
        let frame = Frame::classic(0x123, &[0xde, 0xad, 0xbe, 0xef]).unwrap();
        let datagrams = encoder.encode_all(&[frame]);
        #[rustfmt::skip]
        let expected = vec![
            2, 0, 0, 0, 1,            // version 2, DATA, seq 0, count 1
            0x00, 0x00, 0x01, 0x23,   // can_id 0x123
            4,                        // len 4, Classic
            0xde, 0xad, 0xbe, 0xef,   // data
        ];
        assert_eq!(datagrams, vec![expected]);
    }

    #[test]
    fn extended_remote_and_fd_frames_encode_byte_for_byte() {
        let mut encoder = Encoder::new(1472).unwrap();
        let remote = Frame::remote(CAN_EFF_FLAG | 0x1abc_def0, 3).unwrap();
        let fd = Frame::fd(0x42, CANFD_BRS | CANFD_ESI, &[0x11; 12]).unwrap();
        let datagrams = encoder.encode_all(&[remote, fd]);
        #[rustfmt::skip]
        let mut expected = vec![
            2, 0, 0, 0, 2,            // header, count 2
            0xda, 0xbc, 0xde, 0xf0,   // EFF|RTR (0xc0000000) | 0x1abcdef0
            3,                        // requested DLC 3; no data follows a remote frame
            0x00, 0x00, 0x00, 0x42,   // can_id 0x42
            0x8c,                     // 0x80 (FD) | 12
            0x03,                     // BRS|ESI
        ];
        expected.extend_from_slice(&[0x11; 12]);
        assert_eq!(datagrams, vec![expected]);
    }

    #[test]
    fn sequence_number_increments_per_datagram_and_wraps() {
        let mut encoder = Encoder::new(MIN_DATAGRAM_LEN).unwrap();
        let frame = Frame::classic(1, &[]).unwrap();
        let seqs: Vec<u8> = (0..258)
            .map(|_| encoder.encode_all(&[frame])[0][2])
            .collect();
        assert_eq!(&seqs[..3], &[0, 1, 2]);
        assert_eq!(&seqs[255..], &[255, 0, 1]);
    }

    #[test]
    fn batches_split_at_the_size_limit_and_keep_order() {
        // An FD frame with 64 bytes takes 70 bytes: a 5 + 2 * 70 = 145-byte limit holds two.
        let mut encoder = Encoder::new(145).unwrap();
        let frames: Vec<Frame> = (0..5u8)
            .map(|i| Frame::fd(u32::from(i), 0, &[i; 64]).unwrap())
            .collect();
        let datagrams = encoder.encode_all(&frames);
        let lens: Vec<usize> = datagrams.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![145, 145, 75]);
        let counts: Vec<u16> = datagrams
            .iter()
            .map(|d| u16::from_be_bytes([d[3], d[4]]))
            .collect();
        assert_eq!(counts, vec![2, 2, 1]);
        let mut back = Vec::new();
        for datagram in &datagrams {
            decode(datagram, &mut back).unwrap();
        }
        assert_eq!(back, frames);
    }

    #[test]
    fn encoder_refuses_a_limit_below_one_full_fd_frame() {
        assert_eq!(
            Encoder::new(MIN_DATAGRAM_LEN - 1).unwrap_err(),
            EncoderError::LimitTooSmall { limit: 74 }
        );
        assert!(Encoder::new(75).is_ok());
    }

    #[test]
    fn hand_built_datagram_decodes() {
        #[rustfmt::skip]
        let datagram = [
            2, 0, 200, 0, 3,
            0x80, 0x00, 0x00, 0x10, 2, 0x01, 0x02,        // EFF 0x10, Classic, 2 bytes
            0x40, 0x00, 0x07, 0xff, 8,                    // RTR 0x7ff, DLC 8, no data
            0x00, 0x00, 0x00, 0x05, 0x80, 0x01,           // FD 0x5, len 0, BRS
        ];
        let mut frames = Vec::new();
        let header = decode(&datagram, &mut frames).unwrap();
        assert_eq!(
            header,
            Header {
                seq: 200,
                count: 3,
                fd_remote_dropped: 0,
                fd_len_rounded: 0,
            }
        );
        assert_eq!(
            frames,
            vec![
                Frame::classic(CAN_EFF_FLAG | 0x10, &[1, 2]).unwrap(),
                Frame::remote(0x7ff, 8).unwrap(),
                Frame::fd(0x5, CANFD_BRS, &[]).unwrap(),
            ]
        );
        assert!(frames[0].is_extended() && frames[1].is_remote() && frames[2].is_fd());
        assert_eq!(frames[1].len(), 8);
        assert!(frames[1].data().is_empty());
    }

    #[test]
    fn empty_datagram_is_accepted_with_no_frames() {
        assert_eq!(decoded(&[2, 0, 9, 0, 0]).unwrap(), vec![]);
    }

    #[test]
    fn malformed_datagrams_are_rejected_with_their_reason() {
        let cases: &[(&[u8], DecodeError)] = &[
            (&[], DecodeError::ShortHeader { len: 0 }),
            (&[2, 0, 0, 0], DecodeError::ShortHeader { len: 4 }),
            (&[1, 0, 0, 0, 0], DecodeError::WrongVersion { version: 1 }),
            (&[2, 1, 0, 0, 0], DecodeError::WrongOpCode { op_code: 1 }),
            // count 2, one complete frame
            (
                &[2, 0, 0, 0, 2, 0, 0, 0, 1, 0],
                DecodeError::CountBeyondPayload {
                    count: 2,
                    decoded: 1,
                },
            ),
            // count 65535, nothing present: no allocation, just a rejection
            (
                &[2, 0, 0, 0xff, 0xff],
                DecodeError::CountBeyondPayload {
                    count: 65535,
                    decoded: 0,
                },
            ),
            // frame header cut after 3 id bytes
            (
                &[2, 0, 0, 0, 1, 0, 0, 1],
                DecodeError::TruncatedFrame {
                    index: 0,
                    needed: 2,
                },
            ),
            // Classic len 4, 3 data bytes
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 1, 4, 9, 9, 9],
                DecodeError::TruncatedFrame {
                    index: 0,
                    needed: 1,
                },
            ),
            // FD len 8, flags byte missing
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 1, 0x88],
                DecodeError::TruncatedFrame {
                    index: 0,
                    needed: 9,
                },
            ),
            // Classic len 9
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                DecodeError::OversizedLength {
                    index: 0,
                    kind: "Classic",
                    len: 9,
                    max: 8,
                },
            ),
            // Classic RTR with DLC 15 (no data would follow, still out of range)
            (
                &[2, 0, 0, 0, 1, 0x40, 0, 0, 1, 15],
                DecodeError::OversizedLength {
                    index: 0,
                    kind: "Classic",
                    len: 15,
                    max: 8,
                },
            ),
            // FD len 0x7f
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 1, 0xff, 0],
                DecodeError::OversizedLength {
                    index: 0,
                    kind: "FD",
                    len: 127,
                    max: 64,
                },
            ),
            // FD len 9 with only the flags byte: truncated, not rounded
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 1, 0x89, 0],
                DecodeError::TruncatedFrame {
                    index: 0,
                    needed: 9,
                },
            ),
            // one complete frame, then two stray bytes
            (
                &[2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0xaa, 0xbb],
                DecodeError::TrailingBytes { count: 1, extra: 2 },
            ),
            // count 0 with a body
            (
                &[2, 0, 0, 0, 0, 1],
                DecodeError::TrailingBytes { count: 0, extra: 1 },
            ),
        ];
        for (datagram, expected) in cases {
            assert_eq!(decoded(datagram), Err(*expected), "{datagram:?}");
        }
    }

    /// A datagram packed by hand: a valid Classic frame, an FD frame of `odd_len` bytes
    /// (0x11 each) and a valid FD frame, as cannelloni forwards them from a virtual bus.
    fn around_odd_fd_frame(odd_len: u8) -> Vec<u8> {
        let mut datagram = vec![2, 0, 5, 0, 3];
        datagram.extend([0, 0, 1, 0x23, 2, 0xaa, 0xbb]);
        datagram.extend([0, 0, 2, 0x34, 0x80 | odd_len, CANFD_BRS]);
        datagram.extend(std::iter::repeat_n(0x11, usize::from(odd_len)));
        datagram.extend([0, 0, 3, 0x45, 0x80 | 12, 0]);
        datagram.extend([0x22; 12]);
        datagram
    }

    #[test]
    fn an_fd_frame_of_a_length_no_dlc_encodes_is_rounded_up_and_its_neighbours_kept() {
        for (odd, rounded) in [(9u8, 12u8), (11, 12), (13, 16), (33, 48), (49, 64)] {
            let mut frames = Vec::new();
            let header = decode(&around_odd_fd_frame(odd), &mut frames).unwrap();
            assert_eq!(
                (header.count, header.fd_len_rounded),
                (3, 1),
                "length {odd}"
            );
            assert_eq!(header.fd_remote_dropped, 0);
            let mut padded = vec![0x11; usize::from(odd)];
            padded.resize(usize::from(rounded), 0);
            assert_eq!(
                frames,
                vec![
                    Frame::classic(0x123, &[0xaa, 0xbb]).unwrap(),
                    Frame::fd(0x234, CANFD_BRS, &padded).unwrap(),
                    Frame::fd(0x345, 0, &[0x22; 12]).unwrap(),
                ],
                "length {odd}"
            );
        }
    }

    #[test]
    fn an_fd_remote_frame_is_dropped_alone_and_counted() {
        // Classic 0x123, then FD with RTR (flags byte, no data), then Classic 0x124.
        let datagram = [
            2, 0, 0, 0, 3, 0, 0, 1, 0x23, 1, 0xaa, 0x40, 0, 0, 1, 0x88, 0, 0, 0, 1, 0x24, 1, 0xbb,
        ];
        let mut frames = Vec::new();
        let header = decode(&datagram, &mut frames).unwrap();
        assert_eq!((header.count, header.fd_remote_dropped), (3, 1));
        assert_eq!(
            frames,
            vec![
                Frame::classic(0x123, &[0xaa]).unwrap(),
                Frame::classic(0x124, &[0xbb]).unwrap(),
            ]
        );
    }

    #[test]
    fn a_rejected_datagram_adds_no_frames() {
        let mut frames = vec![Frame::classic(7, &[7]).unwrap()];
        // first frame fine, second truncated
        let datagram = [2, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 2, 2, 0xaa];
        assert!(decode(&datagram, &mut frames).is_err());
        assert_eq!(frames, vec![Frame::classic(7, &[7]).unwrap()]);
    }

    #[test]
    fn frame_constructors_enforce_can_limits() {
        assert!(Frame::classic(1, &[0; 9]).is_err());
        assert!(Frame::remote(1, 9).is_err());
        assert_eq!(
            Frame::fd(1, 0, &[0; 10]),
            Err(FrameError::InvalidFdLength { len: 10 })
        );
        assert_eq!(
            Frame::fd(CAN_RTR_FLAG | 1, 0, &[]),
            Err(FrameError::FdRemote)
        );
        assert!(Frame::fd(1, 0, &[0; 65]).is_err());
        assert!(Frame::fd(1, 0, &[0; 48]).is_ok());
        assert!(!Frame::classic(CAN_RTR_FLAG | 1, &[1]).unwrap().is_remote());
    }

    #[test]
    fn reason_indices_match_the_table() {
        for (i, reason) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }

    /// A small deterministic generator (xorshift64*), so the property test needs no dependency
    /// and every failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn frame(&mut self) -> Frame {
            let extended = self.below(2) == 1;
            let id = if extended {
                CAN_EFF_FLAG | (self.next() as u32 & CAN_EFF_MASK)
            } else {
                self.next() as u32 & CAN_SFF_MASK
            };
            let mut data = [0u8; 64];
            for byte in &mut data {
                *byte = self.next() as u8;
            }
            match self.below(4) {
                0 => Frame::remote(id, self.below(9) as u8).unwrap(),
                1 => {
                    const FD_LENS: [usize; 16] =
                        [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64];
                    let len = FD_LENS[self.below(16) as usize];
                    Frame::fd(id, self.next() as u8 & 0x07, &data[..len]).unwrap()
                }
                2 => Frame::classic(id | CAN_ERR_FLAG, &data[..8]).unwrap(),
                _ => Frame::classic(id, &data[..self.below(9) as usize]).unwrap(),
            }
        }
    }

    #[test]
    fn decode_inverts_encode_for_generated_batches() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..3000 {
            let count = rng.below(120) as usize;
            let frames: Vec<Frame> = (0..count).map(|_| rng.frame()).collect();
            let limit = MIN_DATAGRAM_LEN + rng.below(1500) as usize;
            let mut encoder = Encoder::new(limit).unwrap();
            let datagrams = encoder.encode_all(&frames);
            let mut back = Vec::new();
            for datagram in &datagrams {
                assert!(datagram.len() <= limit, "case {case}: datagram over limit");
                decode(datagram, &mut back).unwrap();
            }
            assert_eq!(back, frames, "case {case}");
            // Splitting is greedy: no datagram could have taken the next frame.
            let mut taken = 0;
            for datagram in &datagrams {
                let n = usize::from(u16::from_be_bytes([datagram[3], datagram[4]]));
                taken += n;
                if let Some(next) = frames.get(taken) {
                    assert!(datagram.len() + next.encoded_len() > limit, "case {case}");
                }
            }
        }
    }

    #[test]
    fn every_truncation_of_a_valid_datagram_is_rejected() {
        let mut rng = Rng(42);
        for _ in 0..200 {
            let frames: Vec<Frame> = (0..1 + rng.below(10)).map(|_| rng.frame()).collect();
            let datagram = Encoder::new(1472).unwrap().encode_all(&frames).remove(0);
            for cut in 0..datagram.len() {
                assert!(decoded(&datagram[..cut]).is_err(), "cut at {cut}");
            }
        }
    }
}
