//! Kernel tests of the tunnel: "nodes" are network namespaces routed through a hub namespace
//! (addresses from 192.0.2.0/24, TEST-NET-1, only inside these namespaces), each with a vcan
//! "bus" and an endpoint on it. can-utils (`cansend`, `candump`) put frames on the buses and
//! observe them; a Python peer written from the format description checks interoperability.
// Test helpers: a failed step should fail the test right there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use can_dra_dataplane::netns::Netns;
use can_dra_testkit::{Candump, CapturedFrame, TestNetns, cansend, run};
use can_dra_tunnel::codec::{Encoder, Frame};
use can_dra_tunnel::{DropReason, Endpoint, EndpointConfig, Namespaces, RejectReason};
use tokio::runtime::Runtime;

const PORT: u16 = 20000;
const BUS: &str = "bus0";

/// One node: its namespace, on the hub network at `ip`, with a vcan bus `bus0`.
struct Node {
    ns: TestNetns,
    netns: Netns,
    ip: Ipv4Addr,
}

impl Node {
    fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, PORT))
    }

    fn start(&self, runtime: &Runtime, peers: &[&Node]) -> Endpoint {
        eprintln!("starting the endpoint of {}", self.ip);
        let config = EndpointConfig::new(self.addr(), BUS);
        let endpoint = runtime
            .block_on(Endpoint::start(config, Namespaces::both(&self.netns)))
            .unwrap();
        endpoint.set_peers(peers.iter().map(|peer| peer.addr()));
        endpoint
    }

    fn capture(&self) -> Candump {
        eprintln!("capturing on {}", self.ip);
        Candump::start(&self.ns, BUS).unwrap()
    }

    fn send(&self, frame: &str) {
        cansend(&self.ns, BUS, frame).unwrap();
    }

    /// A UDP socket inside this node's namespace, bound to `port` on its address.
    fn udp(&self, port: u16) -> UdpSocket {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.ip, port));
        self.netns.run(|| UdpSocket::bind(addr)).unwrap().unwrap()
    }
}

/// Nodes routed through a hub namespace; dropping it removes every namespace.
struct Lan {
    nodes: Vec<Node>,
    _hub: TestNetns,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap();
}

/// `count` nodes; node i has 192.0.2.(4i+2)/30 and a default route via the hub at 4i+1.
fn lan(tag: &str, count: u8) -> Lan {
    let hub = TestNetns::new(&format!("{tag}-hub")).unwrap();
    hub.exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        .unwrap();
    let mut nodes = Vec::new();
    for i in 0..count {
        let ns = TestNetns::new(&format!("{tag}-n{i}")).unwrap();
        let (hub_name, node_name) = (hub.name(), ns.name());
        let hub_side = format!("h{i}");
        let gateway = Ipv4Addr::new(192, 0, 2, 4 * i + 1);
        let node_ip = Ipv4Addr::new(192, 0, 2, 4 * i + 2);
        ip(&[
            "-n", hub_name, "link", "add", &hub_side, "type", "veth", "peer", "name", "eth0",
            "netns", node_name,
        ]);
        ip(&[
            "-n",
            hub_name,
            "addr",
            "add",
            &format!("{gateway}/30"),
            "dev",
            &hub_side,
        ]);
        ip(&["-n", hub_name, "link", "set", &hub_side, "up"]);
        ip(&[
            "-n",
            node_name,
            "addr",
            "add",
            &format!("{node_ip}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", node_name, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            node_name,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ]);
        ip(&["-n", node_name, "link", "add", BUS, "type", "vcan"]);
        ip(&["-n", node_name, "link", "set", BUS, "mtu", "72"]);
        ip(&["-n", node_name, "link", "set", BUS, "up"]);
        let netns = Netns::from_path(ns.path()).unwrap();
        nodes.push(Node {
            ns,
            netns,
            ip: node_ip,
        });
    }
    Lan { nodes, _hub: hub }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What a user compares: id, kind, FD flags (BRS/ESI) and payload.
fn key(frame: &CapturedFrame) -> (u32, bool, bool, u8, bool, Vec<u8>) {
    (
        frame.id,
        frame.extended,
        frame.fd,
        frame.fd_flags & 0x3,
        frame.remote,
        frame.data.clone(),
    )
}

fn keys(frames: &[CapturedFrame]) -> Vec<(u32, bool, bool, u8, bool, Vec<u8>)> {
    let mut keys: Vec<_> = frames.iter().map(key).collect();
    keys.sort();
    keys
}

fn parsed(lines: &[&str]) -> Vec<CapturedFrame> {
    lines
        .iter()
        .map(|frame| CapturedFrame::parse_log_line(&format!("(0.0) {BUS} {frame}")).unwrap())
        .collect()
}

/// Frames of every kind, as `cansend` takes them (and `candump -L` prints them).
fn mixed_frames(tag: u8) -> Vec<String> {
    vec![
        format!("1{tag:02X}#DEADBEEF"),
        format!("1ABCDE{tag:02X}#0102030405060708"),
        format!("2{tag:02X}#R"),
        format!("3{tag:02X}##1{}", "A5".repeat(12)),
        format!("0000004{tag:01X}##0{}", "5A".repeat(64)),
        format!("4{tag:02X}#"),
    ]
}

/// Waits until `dump` holds `count` frames, then a little longer so duplicates would show.
fn settle(dump: Candump, count: usize) -> Vec<CapturedFrame> {
    let got = dump.wait_for(count, Duration::from_secs(10));
    eprintln!("captured {got} of {count} frames");
    dump.stop().unwrap()
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn two_nodes_carry_classic_and_fd_frames_exactly_once_each_way() {
    let lan = lan("tun2", 2);
    let [a, b] = [&lan.nodes[0], &lan.nodes[1]];
    let runtime = runtime();
    let endpoint_a = a.start(&runtime, &[b]);
    let endpoint_b = b.start(&runtime, &[a]);

    let from_a = mixed_frames(0xa);
    let from_b = mixed_frames(0xb);
    let (dump_a, dump_b) = (a.capture(), b.capture());
    for frame in &from_a {
        a.send(frame);
    }
    for frame in &from_b {
        b.send(frame);
    }
    let seen_a = settle(dump_a, 12);
    let seen_b = settle(dump_b, 12);

    // Each bus sees its own frames (local loopback) and the other's, each exactly once: no
    // loss, no duplicate, nothing echoed back.
    let all: Vec<&str> = from_a.iter().chain(&from_b).map(String::as_str).collect();
    assert_eq!(keys(&seen_a), keys(&parsed(&all)));
    assert_eq!(keys(&seen_b), keys(&parsed(&all)));

    let counters_a = endpoint_a.counters();
    assert_eq!(counters_a.frames_from_can, 6);
    assert_eq!(counters_a.frames_to_can, 6);
    assert_eq!(counters_a.peers[&b.addr()].frames_out, 6);
    assert_eq!(counters_a.peers[&b.addr()].frames_in, 6);
    assert_eq!(counters_a.drops.values().sum::<u64>(), 0, "{counters_a:?}");
    runtime.block_on(endpoint_a.shutdown()).unwrap();
    runtime.block_on(endpoint_b.shutdown()).unwrap();
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn the_endpoint_is_granted_the_socket_buffers_it_asks_for() {
    let lan = lan("tunbuf", 1);
    let node = &lan.nodes[0];
    let runtime = runtime();
    // As root, SO_RCVBUFFORCE/SO_SNDBUFFORCE pass net.core.rmem_max/wmem_max; the kernel
    // reports twice the size it set.
    let endpoint = node.start(&runtime, &[]);
    let granted = endpoint.socket_buffers();
    assert_eq!(
        (granted.udp_receive, granted.udp_send, granted.can_receive),
        (8 << 20, 2 << 20, 8 << 20)
    );
    runtime.block_on(endpoint.shutdown()).unwrap();
    // What is read back follows the request.
    let mut config = EndpointConfig::new(node.addr(), BUS);
    (
        config.udp_receive_buffer,
        config.udp_send_buffer,
        config.can_receive_buffer,
    ) = (300_000, 200_000, 100_000);
    let endpoint = runtime
        .block_on(Endpoint::start(config, Namespaces::both(&node.netns)))
        .unwrap();
    let granted = endpoint.socket_buffers();
    assert_eq!(
        (granted.udp_receive, granted.udp_send, granted.can_receive),
        (600_000, 400_000, 200_000)
    );
    runtime.block_on(endpoint.shutdown()).unwrap();
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn three_nodes_form_a_mesh_without_relaying() {
    let lan = lan("tun3", 3);
    let [a, b, c] = [&lan.nodes[0], &lan.nodes[1], &lan.nodes[2]];
    let runtime = runtime();
    let endpoints = [
        a.start(&runtime, &[b, c]),
        b.start(&runtime, &[a, c]),
        c.start(&runtime, &[a, b]),
    ];
    let dumps = [a.capture(), b.capture(), c.capture()];
    let mut sent = Vec::new();
    for (i, node) in [a, b, c].into_iter().enumerate() {
        let frames = mixed_frames(u8::try_from(i).unwrap());
        for frame in &frames {
            node.send(frame);
        }
        sent.extend(frames);
    }
    let all: Vec<&str> = sent.iter().map(String::as_str).collect();
    for dump in dumps {
        // Every frame exactly once on every bus: had an endpoint relayed what it got from one
        // peer to another, the third bus would see it twice.
        assert_eq!(keys(&settle(dump, 18)), keys(&parsed(&all)));
    }
    for endpoint in endpoints {
        let counters = endpoint.counters();
        assert_eq!((counters.frames_from_can, counters.frames_to_can), (6, 12));
        runtime.block_on(endpoint.shutdown()).unwrap();
    }
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn a_node_that_leaves_stops_getting_frames_and_gets_them_again_when_back() {
    let lan = lan("tunleave", 3);
    let [a, b, c] = [&lan.nodes[0], &lan.nodes[1], &lan.nodes[2]];
    let runtime = runtime();
    let endpoint_a = a.start(&runtime, &[b, c]);
    let endpoint_b = b.start(&runtime, &[a, c]);
    let endpoint_c = c.start(&runtime, &[a, b]);

    // C leaves the bus: A and B drop it from their peers; C's endpoint still runs and still
    // sends to them, which they now refuse.
    endpoint_a.set_peers([b.addr()]);
    endpoint_b.set_peers([a.addr()]);
    let (dump_b, dump_c) = (b.capture(), c.capture());
    a.send("111#01");
    c.send("333#03");
    let seen_b = settle(dump_b, 1);
    let seen_c = settle(dump_c, 1);
    assert_eq!(keys(&seen_b), keys(&parsed(&["111#01"])));
    assert_eq!(
        keys(&seen_c),
        keys(&parsed(&["333#03"])),
        "C got nothing from A"
    );
    assert_eq!(endpoint_a.counters().dropped(DropReason::UnknownSource), 1);
    assert_eq!(endpoint_b.counters().dropped(DropReason::UnknownSource), 1);

    // C is a member again, but its endpoint is down: what A sends meanwhile is lost, not
    // buffered for later.
    runtime.block_on(endpoint_c.shutdown()).unwrap();
    endpoint_a.set_peers([b.addr(), c.addr()]);
    endpoint_b.set_peers([a.addr(), c.addr()]);
    let dump_c = c.capture();
    a.send("112#02");
    std::thread::sleep(Duration::from_millis(300));

    // C's endpoint comes back: frames flow both ways again.
    let endpoint_c = c.start(&runtime, &[a, b]);
    let dump_a = a.capture();
    a.send("113#03");
    c.send("334#04");
    let seen_c = settle(dump_c, 2);
    let seen_a = settle(dump_a, 2);
    assert_eq!(keys(&seen_c), keys(&parsed(&["113#03", "334#04"])));
    assert_eq!(keys(&seen_a), keys(&parsed(&["113#03", "334#04"])));
    for endpoint in [endpoint_a, endpoint_b, endpoint_c] {
        runtime.block_on(endpoint.shutdown()).unwrap();
    }
}

/// The frames of a `cannelloni_peer.py` output line.
fn python_frame(line: &str) -> CapturedFrame {
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    let id = u32::try_from(value["id"].as_u64().unwrap()).unwrap();
    let data = value["data"].as_str().unwrap();
    let fd = value["fd"].as_bool().unwrap_or(false);
    let (id_text, body) = if id & 0x8000_0000 != 0 {
        (format!("{:08X}", id & 0x1fff_ffff), data.to_uppercase())
    } else {
        (format!("{:03X}", id & 0x7ff), data.to_uppercase())
    };
    let line = if fd {
        let flags = value["flags"].as_u64().unwrap();
        format!("{id_text}##{:X}{body}", flags & 0x3)
    } else if id & 0x4000_0000 != 0 {
        format!("{id_text}#R")
    } else {
        format!("{id_text}#{body}")
    };
    parsed(&[line.as_str()]).remove(0)
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn an_independent_cannelloni_peer_exchanges_frames_both_ways() {
    let lan = lan("tunpy", 2);
    let [a, b] = [&lan.nodes[0], &lan.nodes[1]];
    let runtime = runtime();
    // B runs no endpoint: the Python peer listens on B's address instead.
    let endpoint_a = a.start(&runtime, &[b]);
    let dump_a = a.capture();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cannelloni_peer.py");
    let send = r#"[{"id": 291, "data": "c0ffee"},
                   {"id": 2427178479, "data": "0102030405060708"},
                   {"id": 1073743809, "dlc": 4},
                   {"id": 801, "fd": true, "flags": 1, "data": "000102030405060708090a0b0c0d0e0f"}]"#;
    let mut peer =
        b.ns.command_args(
            "/usr/bin/python3",
            &[
                script,
                "--bind",
                &b.addr().to_string(),
                "--to",
                &a.addr().to_string(),
                "--send",
                send,
                "--expect",
                "3",
                "--timeout",
                "15",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(peer.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "READY");
    assert_eq!(lines.next().unwrap().unwrap(), "SENT");

    // Python -> bus: what the peer packed by hand arrives as CAN frames on A's bus.
    let seen_a = settle(dump_a, 4);
    assert_eq!(
        keys(&seen_a),
        keys(&parsed(&[
            "123#C0FFEE",
            "10ABCDEF#0102030405060708",
            "7C1#R",
            "321##1000102030405060708090A0B0C0D0E0F",
        ]))
    );

    // Bus -> Python: frames sent on A's bus arrive as datagrams the peer unpacks by hand.
    let to_python = ["7FF#1122", "1FFFFFFF#R", "055##3AABBCCDDEEFF001122334455"];
    for frame in to_python {
        a.send(frame);
    }
    let received: Vec<CapturedFrame> = lines.map(|line| python_frame(&line.unwrap())).collect();
    assert!(peer.wait().unwrap().success());
    assert_eq!(keys(&received), keys(&parsed(&to_python)));
    let counters = endpoint_a.counters();
    assert_eq!(counters.peers[&b.addr()].frames_in, 4);
    assert_eq!(counters.peers[&b.addr()].frames_out, 3);
    runtime.block_on(endpoint_a.shutdown()).unwrap();
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn an_fd_frame_of_odd_length_from_an_independent_peer_costs_none_of_its_neighbours() {
    // A virtual bus accepts FD frames of lengths no DLC encodes (9, 11, 33, ...) and cannelloni
    // forwards them as they are, batched with valid frames.
    let lan = lan("tunodd", 2);
    let [a, b] = [&lan.nodes[0], &lan.nodes[1]];
    let runtime = runtime();
    let endpoint_a = a.start(&runtime, &[b]);
    let dump_a = a.capture();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cannelloni_peer.py");
    let send = r#"[{"id": 291, "data": "c0ffee"},
                   {"id": 564, "fd": true, "flags": 1, "data": "111111111111111111"},
                   {"id": 837, "fd": true, "flags": 0, "data": "2222222222222222222222222222222222"},
                   {"id": 292, "data": "01"}]"#;
    let output =
        b.ns.command_args(
            "/usr/bin/python3",
            &[
                script,
                "--bind",
                &b.addr().to_string(),
                "--to",
                &a.addr().to_string(),
                "--send",
                send,
                "--expect",
                "0",
                "--timeout",
                "1",
            ],
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    // Every frame arrives once and in order; the odd lengths 9 and 17 are rounded up to 12
    // and 20 with zero padding, as the kernel itself pads them.
    let seen_a = settle(dump_a, 4);
    assert_eq!(
        keys(&seen_a),
        keys(&parsed(&[
            "123#C0FFEE",
            "234##1111111111111111111000000",
            "345##02222222222222222222222222222222222000000",
            "124#01",
        ]))
    );
    let counters = endpoint_a.counters();
    assert_eq!(counters.rejected(), 0);
    assert_eq!(counters.peers[&b.addr()].frames_in, 4);
    assert_eq!(counters.frames_to_can, 4);
    runtime.block_on(endpoint_a.shutdown()).unwrap();
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn malformed_and_foreign_datagrams_are_dropped_counted_and_forwarding_goes_on() {
    let lan = lan("tunbad", 3);
    let [a, b, stranger] = [&lan.nodes[0], &lan.nodes[1], &lan.nodes[2]];
    let runtime = runtime();
    let endpoint_a = a.start(&runtime, &[b]);
    let dump_a = a.capture();

    let peer = b.udp(PORT);
    let bad: [(&[u8], RejectReason); 6] = [
        (
            &[1, 0, 0, 0, 1, 0, 0, 1, 0x23, 0],
            RejectReason::WrongVersion,
        ),
        (&[2, 2, 0, 0, 0], RejectReason::WrongOpCode),
        (
            &[2, 0, 0, 0, 9, 0, 0, 1, 0x23, 0],
            RejectReason::CountBeyondPayload,
        ),
        (
            &[2, 0, 0, 0, 1, 0, 0, 1, 0x23, 15, 1, 2, 3, 4, 5, 6, 7, 8],
            RejectReason::OversizedLength,
        ),
        (
            &[2, 0, 0, 0, 1, 0, 0, 1, 0x23, 4, 1, 2],
            RejectReason::TruncatedFrame,
        ),
        (
            &[2, 0, 0, 0, 1, 0, 0, 1, 0x23, 0, 0xff],
            RejectReason::TrailingBytes,
        ),
    ];
    for (datagram, _) in &bad {
        peer.send_to(datagram, a.addr()).unwrap();
    }
    // A well-formed datagram from a node that is not a peer.
    let valid = Encoder::new(1472)
        .unwrap()
        .encode_all(&[Frame::classic(0x124, &[4]).unwrap()])
        .remove(0);
    stranger.udp(PORT).send_to(&valid, a.addr()).unwrap();

    // Then a good datagram from the peer still gets through.
    let good = Encoder::new(1472)
        .unwrap()
        .encode_all(&[Frame::classic(0x125, &[5]).unwrap()])
        .remove(0);
    peer.send_to(&good, a.addr()).unwrap();
    let seen = settle(dump_a, 1);
    assert_eq!(keys(&seen), keys(&parsed(&["125#05"])));

    let deadline = Instant::now() + Duration::from_secs(5);
    let counters = loop {
        let counters = endpoint_a.counters();
        if counters.rejected() + counters.dropped(DropReason::UnknownSource) >= 7
            || Instant::now() > deadline
        {
            break counters;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for (_, reason) in &bad {
        assert_eq!(
            counters.dropped(DropReason::Rejected(*reason)),
            1,
            "{reason:?}"
        );
    }
    assert_eq!(counters.dropped(DropReason::UnknownSource), 1);
    assert_eq!(counters.peers[&b.addr()].datagrams_rejected, 6);
    assert_eq!(counters.frames_to_can, 1);
    runtime.block_on(endpoint_a.shutdown()).unwrap();
}
