//! The node-to-node CAN tunnel of can-dra.
//!
//! A bus that spans nodes has, on each node, one tunnel endpoint that joins the local can-gw
//! mesh through a CAN interface and exchanges frames with the other nodes' endpoints over UDP.
//! This crate owns:
//! - [`batching`]: when frames read from CAN leave as a datagram (adaptive window by default);
//! - [`codec`]: cannelloni's UDP datagram format (version 2), byte for byte, so an existing
//!   cannelloni endpoint (a HIL rack, an ESP32 bridge) can be a peer;
//! - [`endpoint`]: the running endpoint (tokio): one raw CAN socket, one UDP socket, a peer set
//!   that changes at run time (node peers and external peers, whose frames it relays), bounded
//!   buffers and counters;
//! - [`socket_buffers`]: the kernel buffer sizes its sockets ask for and are granted.
//!
//! See `docs/tunnel.md` for the wiring on a node.

pub mod batching;
pub mod codec;
pub mod endpoint;
pub mod socket_buffers;

pub use batching::Batching;
pub use codec::{DecodeError, Encoder, Frame, RejectReason, decode};
pub use endpoint::{
    CountersSnapshot, DropReason, Endpoint, EndpointConfig, EndpointError, Namespaces, PeerClass,
    PeerCounters,
};
pub use socket_buffers::SocketBuffers;
