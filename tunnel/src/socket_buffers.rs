//! The kernel buffers of the endpoint's sockets: the sizes asked for and what the kernel
//! granted.
//!
//! A saturated bus fills buffers in bursts (a batch leaving at once, a receiver busy for a
//! moment), and an overflowing socket buffer drops silently. The endpoint asks for more than
//! the kernel's defaults: `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` first (with CAP_NET_ADMIN they pass
//! `net.core.rmem_max`/`wmem_max`), else the plain option, which the kernel caps at those
//! limits. It then reads back what it got, logs it and keeps it ([`SocketBuffers`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use socketcan::SocketOptions;

/// Socket buffer sizes as the kernel reports them (`SO_RCVBUF`, `SO_SNDBUF`), in bytes. The
/// kernel reports twice the size it set, to account for its own bookkeeping: a 4 MiB request
/// granted in full reads back as 8 MiB, one capped at a `net.core.rmem_max` of 208 KiB as
/// 416 KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketBuffers {
    /// The UDP socket's receive buffer: datagrams from all peers wait here.
    pub udp_receive: usize,
    /// The UDP socket's send buffer: datagrams to all peers wait here.
    pub udp_send: usize,
    /// The CAN socket's receive buffer: frames from the bus wait here while a batch is sent.
    pub can_receive: usize,
}

/// Which buffer of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buffer {
    Receive,
    Send,
}

impl Buffer {
    /// The forcing option, the plain one, and the name for logs.
    fn options(self) -> (libc::c_int, libc::c_int, &'static str) {
        match self {
            Buffer::Receive => (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
            Buffer::Send => (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
        }
    }
}

/// Socket options of any socket by its descriptor (the UDP socket borrows the CAN crate's
/// option calls this way).
pub(crate) struct Options<'a, S: AsRawFd>(pub &'a S);

impl<S: AsRawFd> AsRawFd for Options<'_, S> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl<S: AsRawFd> SocketOptions for Options<'_, S> {}

/// Asks for a `bytes`-byte buffer (forced first, then capped) and returns what the kernel
/// reports; a failure to enlarge it is logged, not fatal (the default buffer works, bursts just
/// overflow sooner).
pub(crate) fn request(
    socket: &impl SocketOptions,
    buffer: Buffer,
    bytes: usize,
    socket_name: &'static str,
) -> io::Result<usize> {
    let (force, plain, which) = buffer.options();
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if socket
        .set_socket_option_int(libc::SOL_SOCKET, force, size)
        .is_err()
        && let Err(error) = socket.set_socket_option_int(libc::SOL_SOCKET, plain, size)
    {
        tracing::warn!(%error, asked = bytes, "cannot enlarge the {socket_name} {which} buffer");
    }
    let granted = socket.get_socket_option_int(libc::SOL_SOCKET, plain)?;
    let granted = usize::try_from(granted).unwrap_or(0);
    if granted < bytes {
        tracing::warn!(
            asked = bytes,
            granted,
            "the {socket_name} {which} buffer is smaller than asked for (capped by \
             net.core.{}mem_max; CAP_NET_ADMIN lifts the cap)",
            if buffer == Buffer::Receive { "r" } else { "w" }
        );
    }
    Ok(granted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn the_granted_size_is_read_back_forced_or_capped() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let options = Options(&socket);
        let asked = 4 << 20;
        let receive = request(&options, Buffer::Receive, asked, "UDP").unwrap();
        let send = request(&options, Buffer::Send, 1 << 20, "UDP").unwrap();
        // Forced (CAP_NET_ADMIN): twice the request; else the kernel's cap, twice.
        let (rmem_max, wmem_max) = (sysctl("rmem_max"), sysctl("wmem_max"));
        assert!(
            receive == 2 * asked || receive == 2 * rmem_max.min(asked),
            "receive buffer {receive}, rmem_max {rmem_max}"
        );
        assert!(
            send == 2 << 20 || send == 2 * wmem_max.min(1 << 20),
            "send buffer {send}, wmem_max {wmem_max}"
        );
    }
}
