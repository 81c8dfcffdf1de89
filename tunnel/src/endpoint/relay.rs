//! Relaying: which peers a batch of frames goes to, by where it came from, and the one send path
//! every batch takes (frames read from the local CAN interface and frames relayed from a peer).
//!
//! Node peers (the other can-dra endpoints of the bus) form a full mesh, so a frame from one
//! reaches every node directly and is never sent on to another node. An external peer (a
//! cannelloni, a HIL rack) talks to one endpoint only, the one that serves it, so that endpoint
//! relays:
//!
//! | from            | to the local bus | to node peers | to external peers served here |
//! |-----------------|------------------|---------------|-------------------------------|
//! | local CAN       | (already there)  | all           | all                           |
//! | a node peer     | yes              | none          | all                           |
//! | external peer X | yes              | all           | all but X                     |
//!
//! With full-mesh node peers every party gets each frame exactly once: a node relays only what
//! an external peer sent it, to nodes that relay it no further than their own external peers.

use std::net::{IpAddr, SocketAddr};

use tokio::net::UdpSocket;

use super::{DropReason, Peer, Shared, bump};
use crate::codec::{Encoder, Frame};

/// What a peer is to an endpoint; it decides where the peer's frames are relayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerClass {
    /// Another can-dra endpoint of the same bus. Its frames go to the local bus and to the
    /// external peers served here, never to another node (it sent them there itself).
    #[default]
    Node,
    /// A peer that is not a can-dra endpoint (a cannelloni). Its frames go to the local bus, to
    /// every node peer and to the other external peers served here.
    External,
}

/// Where a batch of frames came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// Read from the local CAN interface.
    Local,
    /// Received from the peer at this address, of this class.
    Peer(SocketAddr, PeerClass),
}

impl Origin {
    /// Whether a batch from here goes to `peer` (the table in the module docs).
    pub(super) fn reaches(self, peer: &Peer) -> bool {
        match self {
            Origin::Local => true,
            Origin::Peer(_, PeerClass::Node) => peer.class == PeerClass::External,
            Origin::Peer(source, PeerClass::External) => peer.addr != source,
        }
    }
}

/// The send path: one encoder on the endpoint's UDP socket.
#[derive(Debug)]
pub(super) struct Sender {
    udp: std::sync::Arc<UdpSocket>,
    encoder: Encoder,
    ipv6_socket: bool,
}

impl Sender {
    pub(super) fn new(udp: std::sync::Arc<UdpSocket>, encoder: Encoder, ipv6_socket: bool) -> Self {
        Self {
            udp,
            encoder,
            ipv6_socket,
        }
    }

    /// The largest datagram this sender builds.
    pub(super) fn limit(&self) -> usize {
        self.encoder.limit()
    }

    /// Packs `batch` into datagrams and sends each to every current peer that `origin` reaches.
    /// Frames sent are counted per peer (relayed ones also as `relayed_out`). A send that fails
    /// is counted for that peer (`send_failures`, `udp_send_failed`) and the other peers go on:
    /// UDP keeps no connection, so a peer that was unreachable gets the next datagram as if
    /// nothing happened.
    pub(super) async fn send(
        &mut self,
        shared: &Shared,
        origin: Origin,
        batch: &[Frame],
        datagram: &mut Vec<u8>,
    ) {
        let peers = shared.peers();
        let targets: Vec<&Peer> = peers.iter().filter(|peer| origin.reaches(peer)).collect();
        if targets.is_empty() {
            return;
        }
        let relayed = origin != Origin::Local;
        let mut rest = batch;
        while !rest.is_empty() {
            let taken = self.encoder.encode_one(rest, datagram);
            if taken == 0 {
                break;
            }
            rest = &rest[taken..];
            for peer in &targets {
                let target = if self.ipv6_socket {
                    SocketAddr::new(to_v6(peer.addr.ip()), peer.addr.port())
                } else {
                    peer.addr
                };
                match self.udp.send_to(datagram, target).await {
                    Ok(_) => {
                        bump(&peer.stats.datagrams_out, 1);
                        bump(&peer.stats.frames_out, taken as u64);
                        if relayed {
                            bump(&peer.stats.relayed_out, taken as u64);
                        }
                    }
                    Err(error) => {
                        bump(&peer.stats.send_failures, 1);
                        shared.drop_count(DropReason::UdpSendFailed, 1);
                        tracing::debug!(peer = %peer.addr, %error, "sending a datagram failed");
                    }
                }
            }
        }
    }
}

/// An IPv6 socket reaches IPv4 peers through their mapped address.
fn to_v6(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdpSocket;
    use std::sync::Arc;
    use std::time::Duration;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Where a batch from `origin` goes, among node peers n1, n2 and external peers x1, x2.
    fn destinations(origin: Origin) -> Vec<&'static str> {
        let shared = Shared::new();
        let named = [
            ("n1", "192.0.2.1:1", PeerClass::Node),
            ("n2", "192.0.2.2:1", PeerClass::Node),
            ("x1", "198.51.100.1:20000", PeerClass::External),
            ("x2", "198.51.100.2:20000", PeerClass::External),
        ];
        shared.set_classified_peers(named.iter().map(|(_, a, class)| (addr(a), *class)));
        let peers = shared.peers();
        named
            .iter()
            .zip(peers.iter())
            .filter(|(_, peer)| origin.reaches(peer))
            .map(|((name, _, _), _)| *name)
            .collect()
    }

    #[test]
    fn the_relay_table_sends_each_frame_on_once_and_never_back() {
        assert_eq!(destinations(Origin::Local), ["n1", "n2", "x1", "x2"]);
        // A node peer reaches the other nodes itself: only the external peers served here.
        let from_node = Origin::Peer(addr("192.0.2.1:1"), PeerClass::Node);
        assert_eq!(destinations(from_node), ["x1", "x2"]);
        // An external peer reaches nobody else: everyone but itself.
        let from_x1 = Origin::Peer(addr("198.51.100.1:20000"), PeerClass::External);
        assert_eq!(destinations(from_x1), ["n1", "n2", "x2"]);
    }

    #[test]
    fn admitted_frames_are_relayed_whole_even_when_the_can_queue_is_full() {
        let shared = Shared::new();
        let external = addr("198.51.100.1:20000");
        shared.set_classified_peers([
            (addr("192.0.2.1:1"), PeerClass::Node),
            (external, PeerClass::External),
        ]);
        let frames = [
            Frame::classic(1, &[]).unwrap(),
            Frame::classic(crate::codec::CAN_ERR_FLAG | 4, &[0; 8]).unwrap(),
            Frame::classic(2, &[]).unwrap(),
            Frame::classic(3, &[]).unwrap(),
        ];
        let bytes = Encoder::new(1472).unwrap().encode_all(&frames).remove(0);
        let (mut scratch, mut queue) = (Vec::new(), std::collections::VecDeque::new());
        let origin = shared.admit(external, &bytes, &mut scratch, &mut queue, 1);
        assert_eq!(origin, Some(Origin::Peer(external, PeerClass::External)));
        // The error frame goes nowhere; the queue towards CAN took one frame, the relay all.
        let ids =
            |frames: &mut dyn Iterator<Item = &Frame>| frames.map(Frame::id).collect::<Vec<_>>();
        assert_eq!(ids(&mut scratch.iter()), [1, 2, 3]);
        assert_eq!(ids(&mut queue.iter()), [1]);
        // A non-peer's datagram is neither queued nor relayed.
        let stranger = shared.admit(addr("203.0.113.9:1"), &bytes, &mut scratch, &mut queue, 9);
        assert_eq!((stranger, scratch.len()), (None, 0));
    }

    /// A local UDP socket that a test reads what the endpoint sent from.
    fn receiver() -> StdUdpSocket {
        let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket
    }

    fn received_ids(socket: &StdUdpSocket, datagrams: usize) -> Vec<u32> {
        let mut buffer = [0u8; 2048];
        let mut ids = Vec::new();
        for _ in 0..datagrams {
            let (len, _) = socket.recv_from(&mut buffer).unwrap();
            let mut frames = Vec::new();
            crate::codec::decode(&buffer[..len], &mut frames).unwrap();
            ids.extend(frames.iter().map(Frame::id));
        }
        ids
    }

    async fn sender() -> Sender {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // The smallest limit: a 5-byte header and five 13-byte Classic frames of 8 bytes.
        Sender::new(Arc::new(udp), Encoder::new(75).unwrap(), false)
    }

    #[tokio::test]
    async fn a_peer_whose_sends_fail_costs_the_others_nothing_and_is_counted() {
        let (good_a, good_b) = (receiver(), receiver());
        let (a, b) = (good_a.local_addr().unwrap(), good_b.local_addr().unwrap());
        // Port 0 cannot be sent to (EINVAL), every time: a peer that never takes a datagram.
        let bad = addr("127.0.0.1:0");
        let shared = Shared::new();
        shared.set_classified_peers([
            (a, PeerClass::Node),
            (bad, PeerClass::External),
            (b, PeerClass::External),
        ]);
        // Three datagrams: 5, 5 and 2 frames.
        let batch: Vec<Frame> = (1..=12)
            .map(|i| Frame::classic(i, &[0; 8]).unwrap())
            .collect();
        let mut sender = sender().await;
        sender
            .send(&shared, Origin::Local, &batch, &mut Vec::new())
            .await;

        let all: Vec<u32> = (1..=12).collect();
        assert_eq!(received_ids(&good_a, 3), all);
        assert_eq!(received_ids(&good_b, 3), all);
        let counters = shared.snapshot();
        assert_eq!(counters.peers[&bad].send_failures, 3);
        assert_eq!(counters.peers[&bad].frames_out, 0);
        assert_eq!(counters.dropped(DropReason::UdpSendFailed), 3);
        for good in [a, b] {
            let peer = counters.peers[&good];
            assert_eq!((peer.frames_out, peer.datagrams_out), (12, 3));
            assert_eq!((peer.send_failures, peer.relayed_out), (0, 0));
        }
    }

    #[tokio::test]
    async fn relayed_frames_are_counted_and_a_peer_that_returns_gets_frames_again() {
        let node = receiver();
        let node_addr = node.local_addr().unwrap();
        let external = receiver();
        let external_addr = external.local_addr().unwrap();
        let shared = Shared::new();
        shared.set_classified_peers([
            (node_addr, PeerClass::Node),
            (external_addr, PeerClass::External),
        ]);
        let mut sender = sender().await;
        let frames = [Frame::classic(7, &[]).unwrap()];
        let from_external = Origin::Peer(external_addr, PeerClass::External);
        sender
            .send(&shared, from_external, &frames, &mut Vec::new())
            .await;
        assert_eq!(received_ids(&node, 1), [7]);

        // The external peer goes away (its port is closed: the kernel answers ICMP port
        // unreachable) while frames keep coming, then comes back on the same port.
        drop(external);
        let from_node = Origin::Peer(node_addr, PeerClass::Node);
        for id in 8..10 {
            let frames = [Frame::classic(id, &[]).unwrap()];
            sender
                .send(&shared, from_node, &frames, &mut Vec::new())
                .await;
            sender
                .send(&shared, Origin::Local, &frames, &mut Vec::new())
                .await;
        }
        let back = StdUdpSocket::bind(external_addr).unwrap();
        back.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let frames = [Frame::classic(10, &[]).unwrap()];
        sender
            .send(&shared, from_node, &frames, &mut Vec::new())
            .await;
        assert_eq!(received_ids(&back, 1), [10]);
        // And the node peer missed nothing sent locally meanwhile.
        assert_eq!(received_ids(&node, 2), [8, 9]);

        let counters = shared.snapshot();
        assert_eq!(counters.peers[&node_addr].relayed_out, 1);
        assert_eq!(counters.peers[&node_addr].frames_out, 3);
        // One frame per datagram: every send to the external peer was made, taken or failed.
        let external = counters.peers[&external_addr];
        assert_eq!(external.frames_out + external.send_failures, 5);
        assert_eq!(external.class, PeerClass::External);
    }
}
