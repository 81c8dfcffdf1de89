//! A small synchronous `NETLINK_ROUTE` client, plus attribute (NLA) encoding and decoding.
//!
//! The client speaks raw bytes: callers build the family header and attributes (typed
//! `netlink-packet-route` messages serialised with `Emitable`, or hand-built payloads for
//! can-gw and the tc options rtnetlink has no types for). It handles framing, sequence
//! numbers, acknowledgements, multi-part dumps and kernel error codes, and never blocks
//! forever: every receive has a timeout.

use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use crate::netns::{Netns, NetnsError};

/// `NLM_F_REQUEST`: the message is a request.
pub const NLM_F_REQUEST: u16 = 0x01;
/// `NLM_F_MULTI`: part of a multi-part reply.
pub const NLM_F_MULTI: u16 = 0x02;
/// `NLM_F_ACK`: ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 0x04;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`): dump every object.
pub const NLM_F_DUMP: u16 = 0x300;
/// `NLM_F_REPLACE`: replace an existing object.
pub const NLM_F_REPLACE: u16 = 0x100;
/// `NLM_F_EXCL`: fail if the object exists.
pub const NLM_F_EXCL: u16 = 0x200;
/// `NLM_F_CREATE`: create the object if it does not exist.
pub const NLM_F_CREATE: u16 = 0x400;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const HEADER_LEN: usize = 16;
/// `NLA_F_NESTED | NLA_F_NET_BYTEORDER`: flag bits in an attribute type.
const NLA_TYPE_FLAGS: u16 = 0xc000;
/// `NLA_F_NESTED`.
pub const NLA_F_NESTED: u16 = 0x8000;

/// How long a request waits for the kernel's answer before giving up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors from the netlink transport or from the kernel's answer.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be created, bound or configured.
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The socket could not be created inside a namespace.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Sending or receiving failed.
    #[error("netlink I/O: {0}")]
    Io(#[source] std::io::Error),
    /// No answer arrived in time.
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
    /// The kernel rejected the request.
    #[error("kernel error {errno}: {}", errno.desc())]
    Kernel {
        /// The error code the kernel returned.
        errno: Errno,
    },
    /// A reply did not follow the netlink framing rules.
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
}

impl NetlinkError {
    /// The kernel error code, when the kernel rejected the request.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel { errno } => Some(*errno),
            _ => None,
        }
    }
}

/// One message received from the kernel (not an acknowledgement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The netlink message type, e.g. `RTM_NEWLINK`.
    pub message_type: u16,
    /// The netlink flags of the reply.
    pub flags: u16,
    /// The bytes after the 16-byte netlink header.
    pub payload: Vec<u8>,
}

/// A `NETLINK_ROUTE` socket bound to the namespace it was opened in.
#[derive(Debug)]
pub struct RouteSocket {
    socket: Socket,
    sequence: u32,
    port: u32,
    timeout: Duration,
}

impl RouteSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        let address = socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        // Dumps of many links or rules can exceed the default receive buffer.
        socket
            .set_rx_buf_sz(1 << 20)
            .map_err(NetlinkError::Socket)?;
        let mut route = Self {
            socket,
            sequence: 0,
            port: address.port_number(),
            timeout: DEFAULT_TIMEOUT,
        };
        route.set_timeout(DEFAULT_TIMEOUT)?;
        Ok(route)
    }

    /// Opens a socket inside `netns`. The socket stays bound to that namespace for its lifetime,
    /// whichever thread uses it later.
    pub fn open_in(netns: &Netns) -> Result<Self, NetlinkError> {
        netns.run(Self::open)?
    }

    /// Changes how long a request waits for each reply.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), NetlinkError> {
        let micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
        setsockopt(
            &self.socket,
            sockopt::ReceiveTimeout,
            &TimeVal::new(micros / 1_000_000, micros % 1_000_000),
        )
        .map_err(|errno| NetlinkError::Socket(errno.into()))?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends a request with `NLM_F_REQUEST | NLM_F_ACK | extra_flags` and waits for the
    /// acknowledgement. Returns any non-acknowledgement replies that arrived before it.
    pub fn request(
        &mut self,
        message_type: u16,
        extra_flags: u16,
        payload: &[u8],
    ) -> Result<Vec<Reply>, NetlinkError> {
        let sequence = self.send(
            message_type,
            NLM_F_REQUEST | NLM_F_ACK | extra_flags,
            payload,
        )?;
        self.collect(sequence, false)
    }

    /// Sends a dump request (`NLM_F_REQUEST | NLM_F_DUMP`) and returns every reply until `NLMSG_DONE`.
    pub fn dump(&mut self, message_type: u16, payload: &[u8]) -> Result<Vec<Reply>, NetlinkError> {
        let sequence = self.send(message_type, NLM_F_REQUEST | NLM_F_DUMP, payload)?;
        self.collect(sequence, true)
    }

    fn send(&mut self, message_type: u16, flags: u16, payload: &[u8]) -> Result<u32, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let message = encode_message(message_type, flags, self.sequence, payload)?;
        self.socket.send(&message, 0).map_err(NetlinkError::Io)?;
        Ok(self.sequence)
    }

    fn collect(&mut self, sequence: u32, dump: bool) -> Result<Vec<Reply>, NetlinkError> {
        let mut replies = Vec::new();
        loop {
            let datagram = self.receive()?;
            for message in split_messages(&datagram)? {
                // Stale answers to an earlier, timed-out request, or multicast noise.
                if message.sequence != sequence || (message.port != 0 && message.port != self.port)
                {
                    continue;
                }
                match message.message_type {
                    NLMSG_ERROR => {
                        let code = read_i32(message.payload, 0)?;
                        if code == 0 {
                            if !dump {
                                return Ok(replies);
                            }
                        } else {
                            return Err(NetlinkError::Kernel {
                                errno: Errno::from_raw(code.saturating_neg()),
                            });
                        }
                    }
                    NLMSG_DONE => {
                        // A dump may end with an error code in the DONE payload.
                        if let Ok(code) = read_i32(message.payload, 0)
                            && code < 0
                        {
                            return Err(NetlinkError::Kernel {
                                errno: Errno::from_raw(code.saturating_neg()),
                            });
                        }
                        return Ok(replies);
                    }
                    message_type => replies.push(Reply {
                        message_type,
                        flags: message.flags,
                        payload: message.payload.to_vec(),
                    }),
                }
            }
        }
    }

    fn receive(&mut self) -> Result<Vec<u8>, NetlinkError> {
        let map = |error: std::io::Error| match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                NetlinkError::Timeout(self.timeout)
            }
            _ => NetlinkError::Io(error),
        };
        // Peek first so that a large dump message is never truncated. The probe is large on
        // purpose: the kernel sizes later dump buffers after the reader's largest receive
        // buffer, and a single object bigger than its default (about 3.7 KiB, e.g. a tc filter
        // with hundreds of em_canid entries) cannot be dumped at all otherwise (EMSGSIZE).
        let mut probe: Vec<u8> = Vec::with_capacity(32 * 1024);
        let size = self
            .socket
            .recv(&mut probe, libc::MSG_PEEK | libc::MSG_TRUNC)
            .map_err(map)?;
        let mut datagram: Vec<u8> = Vec::with_capacity(size.max(HEADER_LEN));
        self.socket.recv(&mut datagram, 0).map_err(map)?;
        Ok(datagram)
    }
}

/// Builds one netlink message: a 16-byte header followed by `payload`.
pub fn encode_message(
    message_type: u16,
    flags: u16,
    sequence: u32,
    payload: &[u8],
) -> Result<Vec<u8>, NetlinkError> {
    let length = u32::try_from(HEADER_LEN + payload.len())
        .map_err(|_| NetlinkError::Malformed("request larger than 4 GiB".to_string()))?;
    let mut message = Vec::with_capacity(HEADER_LEN + payload.len());
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&message_type.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(payload);
    Ok(message)
}

#[derive(Debug)]
struct RawMessage<'a> {
    message_type: u16,
    flags: u16,
    sequence: u32,
    port: u32,
    payload: &'a [u8],
}

fn split_messages(datagram: &[u8]) -> Result<Vec<RawMessage<'_>>, NetlinkError> {
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset + HEADER_LEN <= datagram.len() {
        let length = read_u32(datagram, offset)? as usize;
        if length < HEADER_LEN || offset + length > datagram.len() {
            return Err(NetlinkError::Malformed(format!(
                "message length {length} at offset {offset} does not fit a {}-byte datagram",
                datagram.len()
            )));
        }
        messages.push(RawMessage {
            message_type: read_u16(datagram, offset + 4)?,
            flags: read_u16(datagram, offset + 6)?,
            sequence: read_u32(datagram, offset + 8)?,
            port: read_u32(datagram, offset + 12)?,
            payload: &datagram[offset + HEADER_LEN..offset + length],
        });
        offset += align(length);
    }
    Ok(messages)
}

/// Rounds up to the 4-byte alignment netlink uses for messages and attributes.
pub const fn align(length: usize) -> usize {
    (length + 3) & !3
}

fn bytes_at<const N: usize>(bytes: &[u8], offset: usize) -> Result<[u8; N], NetlinkError> {
    bytes
        .get(offset..offset + N)
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| {
            NetlinkError::Malformed(format!(
                "{N} bytes expected at offset {offset}, have {}",
                bytes.len()
            ))
        })
}

/// Reads a host-endian `u16` at `offset`.
pub fn read_u16(bytes: &[u8], offset: usize) -> Result<u16, NetlinkError> {
    bytes_at::<2>(bytes, offset).map(u16::from_ne_bytes)
}

/// Reads a host-endian `u32` at `offset`.
pub fn read_u32(bytes: &[u8], offset: usize) -> Result<u32, NetlinkError> {
    bytes_at::<4>(bytes, offset).map(u32::from_ne_bytes)
}

/// Reads a host-endian `i32` at `offset`.
pub fn read_i32(bytes: &[u8], offset: usize) -> Result<i32, NetlinkError> {
    bytes_at::<4>(bytes, offset).map(i32::from_ne_bytes)
}

/// A buffer of netlink attributes (type-length-value, 4-byte aligned).
///
/// ```
/// use can_dra_dataplane::netlink::{attributes, AttributeBuffer};
/// let mut buffer = AttributeBuffer::default();
/// buffer.push_u32(9, 7);
/// let bytes = buffer.into_bytes();
/// let parsed: Vec<_> = attributes(&bytes).collect::<Result<_, _>>().unwrap();
/// assert_eq!(parsed, vec![(9, &7u32.to_ne_bytes()[..])]);
/// ```
#[derive(Debug, Default, Clone)]
pub struct AttributeBuffer {
    bytes: Vec<u8>,
}

impl AttributeBuffer {
    /// Appends one attribute with a raw payload.
    pub fn push(&mut self, kind: u16, payload: &[u8]) {
        // Attribute payloads here are small structs; u16 overflow would be a programming error
        // caught by the kernel as a malformed request, so saturate rather than panic.
        let length = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.bytes.extend_from_slice(&length.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.bytes.resize(align(self.bytes.len()), 0);
    }

    /// Appends a `u8` attribute.
    pub fn push_u8(&mut self, kind: u16, value: u8) {
        self.push(kind, &[value]);
    }

    /// Appends a host-endian `u32` attribute.
    pub fn push_u32(&mut self, kind: u16, value: u32) {
        self.push(kind, &value.to_ne_bytes());
    }

    /// Appends a NUL-terminated string attribute.
    pub fn push_str(&mut self, kind: u16, value: &str) {
        let mut payload = value.as_bytes().to_vec();
        payload.push(0);
        self.push(kind, &payload);
    }

    /// Appends a nested attribute whose payload is built by `build`.
    pub fn push_nested(&mut self, kind: u16, build: impl FnOnce(&mut AttributeBuffer)) {
        let mut inner = AttributeBuffer::default();
        build(&mut inner);
        self.push(kind | NLA_F_NESTED, &inner.bytes);
    }

    /// The encoded attributes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The encoded attributes, borrowed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Iterates over the attributes in `bytes`, yielding `(type, payload)` with the nested and
/// byte-order flag bits cleared from the type. A truncated attribute yields an error and ends
/// the iteration.
pub fn attributes(bytes: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NetlinkError>> {
    let mut offset = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || offset + 4 > bytes.len() {
            return None;
        }
        let parsed = (|| {
            let length = usize::from(read_u16(bytes, offset)?);
            let kind = read_u16(bytes, offset + 2)? & !NLA_TYPE_FLAGS;
            if length < 4 || offset + length > bytes.len() {
                return Err(NetlinkError::Malformed(format!(
                    "attribute {kind} claims {length} bytes at offset {offset} of {}",
                    bytes.len()
                )));
            }
            let payload = &bytes[offset + 4..offset + length];
            offset += align(length);
            Ok((kind, payload))
        })();
        failed = parsed.is_err();
        Some(parsed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_header_is_length_type_flags_sequence_port() {
        let message = encode_message(24, NLM_F_REQUEST | NLM_F_ACK, 7, &[29, 1, 0, 0]).unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(&20u32.to_ne_bytes());
        expected.extend_from_slice(&24u16.to_ne_bytes());
        expected.extend_from_slice(&5u16.to_ne_bytes());
        expected.extend_from_slice(&7u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[29, 1, 0, 0]);
        assert_eq!(message, expected);
    }

    #[test]
    fn attributes_are_padded_to_four_bytes_and_round_trip() {
        let mut buffer = AttributeBuffer::default();
        buffer.push_u8(13, 1);
        buffer.push_str(3, "can0");
        buffer.push_nested(2, |inner| inner.push_u32(1, 0xdead_beef));
        let bytes = buffer.into_bytes();
        // u8 attribute: 4 header + 1 payload, padded to 8.
        assert_eq!(&bytes[..8], &[5, 0, 13, 0, 1, 0, 0, 0]);
        let parsed: Vec<_> = attributes(&bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[1], (3, &b"can0\0"[..]));
        assert_eq!(parsed[2].0, 2, "nested flag is cleared from the type");
        let nested: Vec<_> = attributes(parsed[2].1).collect::<Result<_, _>>().unwrap();
        assert_eq!(nested, vec![(1, &0xdead_beefu32.to_ne_bytes()[..])]);
    }

    #[test]
    fn truncated_attribute_is_an_error_not_a_panic() {
        let bytes = [200, 0, 1, 0, 1, 2, 3, 4];
        let parsed: Vec<_> = attributes(&bytes).collect();
        assert_eq!(parsed.len(), 1);
        assert!(matches!(parsed[0], Err(NetlinkError::Malformed(_))));
    }

    #[test]
    fn split_rejects_a_length_beyond_the_datagram() {
        let mut datagram = encode_message(16, 0, 1, &[0; 4]).unwrap();
        datagram[0] = 99;
        assert!(matches!(
            split_messages(&datagram),
            Err(NetlinkError::Malformed(_))
        ));
    }

    #[test]
    fn dumping_links_of_this_namespace_returns_loopback() {
        // RTM_GETLINK with an empty ifinfomsg: runs on any Linux kernel, no privilege needed.
        let mut socket = RouteSocket::open().unwrap();
        let replies = socket.dump(18, &[0u8; 16]).unwrap();
        assert!(!replies.is_empty());
        assert!(
            replies.iter().all(|reply| reply.message_type == 16),
            "RTM_NEWLINK replies"
        );
        let names: Vec<Vec<u8>> = replies
            .iter()
            .flat_map(|reply| attributes(&reply.payload[16..]).filter_map(Result::ok))
            .filter(|(kind, _)| *kind == 3)
            .map(|(_, name)| name.to_vec())
            .collect();
        assert!(names.contains(&b"lo\0".to_vec()), "{names:?}");
    }

    #[test]
    fn kernel_errors_carry_the_errno() {
        // RTM_GETLINK for an ifindex that cannot exist.
        let mut socket = RouteSocket::open().unwrap();
        let mut ifinfomsg = [0u8; 16];
        ifinfomsg[4..8].copy_from_slice(&0x7fff_fff0i32.to_ne_bytes());
        let error = socket.request(18, 0, &ifinfomsg).unwrap_err();
        assert_eq!(error.errno(), Some(Errno::ENODEV), "{error}");
    }

    #[test]
    fn split_reads_consecutive_messages() {
        let mut datagram = encode_message(16, NLM_F_MULTI, 3, &[1, 2, 3, 4]).unwrap();
        datagram.extend(encode_message(NLMSG_DONE, NLM_F_MULTI, 3, &0i32.to_ne_bytes()).unwrap());
        let messages = split_messages(&datagram).unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].payload, &[1, 2, 3, 4]);
        assert_eq!(messages[1].message_type, NLMSG_DONE);
    }
}
