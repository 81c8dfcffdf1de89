//! Kernel tests of `bus`: shared buses built over netlink, checked with SocketCAN sockets,
//! `candump`, `cangw -L`, `ip -d link` and `tc qdisc` as independent observers. Each test
//! uses a fresh namespace as the node's host namespace and one namespace per member, all
//! removed on drop, even on panic.

// Test helpers fail the test on any unexpected error, which is what unwrap does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use can_dra_dataplane::bus::kernel::{Kernel, LinkKind};
use can_dra_dataplane::bus::model::{
    Access, BusSpec, CanFilter, DesiredState, MemberShaping, MemberSpec, NetnsRef,
};
use can_dra_dataplane::bus::naming::host_name;
use can_dra_dataplane::bus::system::SystemKernel;
use can_dra_dataplane::bus::{BusError, Buses};
use can_dra_dataplane::netns::Netns;
use can_dra_testkit::{Candump, Namespace, TestNetns, exited_pid, links_in};
use socketcan::{
    CanAnyFrame, CanFdFrame, CanFdSocket, CanFrame, EmbeddedFrame, Frame, Socket, StandardId,
};

/// How long a receiver waits for one more frame before it decides the bus is quiet
/// (generous: the tests usually run under QEMU without acceleration).
const QUIET: Duration = Duration::from_millis(500);

/// A node: a namespace standing in for the host, and the bus manager working in it.
struct Node {
    host: TestNetns,
    buses: Buses<SystemKernel>,
}

impl Node {
    fn new() -> Self {
        let host = TestNetns::new("bushost").unwrap();
        let netns = Netns::from_path(host.path()).unwrap();
        let buses = Buses::new(SystemKernel::open_in(&netns).unwrap());
        Self { host, buses }
    }

    fn ip(&self, args: &str) {
        let args: Vec<&str> = args.split_whitespace().collect();
        self.host.exec("ip", &args).unwrap();
    }

    /// `cangw -L` in the host namespace, rules only (can-utils 2020.11 exits non-zero even
    /// when it lists fine, so judge it by its error output).
    fn cangw(&self) -> Vec<String> {
        cangw_list(&self.host)
    }

    /// `cangw -L` lines translated to member ids / interface names, sorted.
    fn rule_names(&self, ids: &[&str]) -> Vec<String> {
        let names: BTreeMap<String, String> = ids
            .iter()
            .map(|id| (host_name(id), (*id).to_string()))
            .collect();
        let mut rules: Vec<String> = self
            .cangw()
            .iter()
            .map(|line| {
                let line = line
                    .split('#')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                names
                    .iter()
                    .fold(line, |line, (host, id)| line.replace(host, id))
            })
            .collect();
        rules.sort();
        rules
    }

    fn link_names(&self) -> Vec<String> {
        let mut names: Vec<String> = links_in(&self.host)
            .unwrap()
            .into_iter()
            .map(|link| link.name)
            .collect();
        names.sort();
        names
    }

    fn ifindex(&self, name: &str) -> u32 {
        ifindex_in(&self.host, name)
    }
}

fn cangw_list(ns: &TestNetns) -> Vec<String> {
    let output = ns.command("cangw").arg("-L").output().unwrap();
    assert!(
        output.stderr.is_empty(),
        "cangw -L: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("cangw "))
        .map(str::to_string)
        .collect()
}

fn ifindex_in(ns: &TestNetns, name: &str) -> u32 {
    links_in(ns)
        .unwrap()
        .into_iter()
        .find(|link| link.name == name)
        .map(|link| link.index)
        .unwrap_or_else(|| panic!("no link {name} in {}", ns.name()))
}

fn pods(count: usize) -> Vec<TestNetns> {
    (0..count)
        .map(|_| TestNetns::new("buspod").unwrap())
        .collect()
}

fn member(id: &str, pod: &TestNetns) -> MemberSpec {
    MemberSpec::new(id, NetnsRef::Path(pod.path()), "can0")
}

/// A raw CAN socket (Classic and FD) bound to `ifname` inside `ns`.
fn socket(ns: &TestNetns, ifname: &str) -> CanFdSocket {
    let ifname = ifname.to_string();
    Netns::from_path(ns.path())
        .unwrap()
        .run(move || CanFdSocket::open(&ifname))
        .unwrap()
        .unwrap()
}

fn classic(id: u16, data: &[u8]) -> CanFrame {
    CanFrame::new(StandardId::new(id).unwrap(), data).unwrap()
}

fn fd(id: u16) -> CanFdFrame {
    CanFdFrame::new(StandardId::new(id).unwrap(), &[7; 24]).unwrap()
}

/// Frames a socket received until the bus stayed quiet: (identifier, is FD, data).
fn received(socket: &CanFdSocket) -> Vec<(u32, bool, Vec<u8>)> {
    let mut frames = Vec::new();
    loop {
        match socket.read_frame_timeout(QUIET) {
            Ok(CanAnyFrame::Normal(frame)) => {
                frames.push((frame.raw_id(), false, frame.data().to_vec()));
            }
            Ok(CanAnyFrame::Fd(frame)) => {
                frames.push((frame.raw_id(), true, frame.data().to_vec()))
            }
            Ok(other) => panic!("unexpected frame {other:?}"),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                return frames;
            }
            Err(error) => panic!("reading frames: {error}"),
        }
    }
}

fn ids(frames: &[(u32, bool, Vec<u8>)]) -> Vec<u32> {
    let mut ids: Vec<u32> = frames.iter().map(|frame| frame.0).collect();
    ids.sort_unstable();
    ids
}

/// Every member sends one frame (id 0x100 + its position); every member must receive each
/// other member's frame exactly once and never its own.
fn assert_full_exchange(sockets: &[CanFdSocket]) {
    for (i, socket) in sockets.iter().enumerate() {
        let id = 0x100 + u16::try_from(i).unwrap();
        socket.write_frame(&classic(id, &[i as u8])).unwrap();
    }
    for (i, socket) in sockets.iter().enumerate() {
        let expected: Vec<u32> = (0..sockets.len())
            .filter(|j| *j != i)
            .map(|j| 0x100 + j as u32)
            .collect();
        assert_eq!(ids(&received(socket)), expected, "member {i}");
    }
}

fn bus_of(node: &mut Node, pods: &[TestNetns]) {
    let mut bus = BusSpec::new("mesh");
    bus.members = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| member(&format!("m{i}"), pod))
        .collect();
    node.buses.add_bus(bus).unwrap();
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn two_and_sixteen_member_buses_deliver_every_frame_once_and_never_back() {
    for size in [2usize, 16] {
        let mut node = Node::new();
        let pods = pods(size);
        bus_of(&mut node, &pods);
        assert_eq!(
            node.cangw().len(),
            size * (size - 1),
            "one rule per ordered pair"
        );
        for line in node.cangw() {
            assert!(
                line.contains(" -i "),
                "IIF_TX_OK on every mesh rule: {line}"
            );
            assert!(!line.contains(" -e "), "no echo towards vxcan: {line}");
        }
        let sockets: Vec<_> = pods.iter().map(|pod| socket(pod, "can0")).collect();
        assert_full_exchange(&sockets);
    }
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn three_member_bus_seen_by_candump_in_each_pod() {
    let mut node = Node::new();
    let pods = pods(3);
    bus_of(&mut node, &pods);
    for pod in &pods {
        let link = links_in(pod)
            .unwrap()
            .into_iter()
            .find(|link| link.name == "can0")
            .unwrap();
        assert_eq!(link.kind.as_deref(), Some("vxcan"));
        assert_eq!(link.mtu, 16);
        assert!(link.up);
    }
    let dumps: Vec<_> = pods
        .iter()
        .map(|pod| Candump::start(pod, "can0").unwrap())
        .collect();
    for (i, pod) in pods.iter().enumerate() {
        pod.exec("cansend", &["can0", &format!("{:03X}#0{i}", 0x200 + i)])
            .unwrap();
    }
    for (i, dump) in dumps.into_iter().enumerate() {
        // candump also logs the pod's own sent frame (local loopback); the bus must not
        // deliver it a second time.
        let frames = dump.stop().unwrap();
        let mut seen: Vec<u32> = frames.iter().map(|frame| frame.id).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0x200, 0x201, 0x202], "pod {i}: {frames:?}");
    }
}

/// Physical stand-ins: a vcan, or a vxcan whose peer sits in an "ECU" namespace. Created
/// first in a fresh host namespace, it gets ifindex 2 there, like the pods' `can0`.
fn physical_round_trip(kind: &str) {
    let mut node = Node::new();
    let ecu = TestNetns::new("busecu").unwrap();
    let (wire_ns, wire_if): (&TestNetns, &str) = if kind == "vcan" {
        node.ip("link add can0 mtu 16 type vcan");
        node.ip("link set can0 up");
        (&node.host, "can0")
    } else {
        node.ip(&format!(
            "link add can0 mtu 16 type vxcan peer name ecu0 netns {}",
            ecu.name()
        ));
        node.ip("link set can0 up");
        ecu.exec("ip", &["link", "set", "ecu0", "mtu", "16"])
            .unwrap();
        ecu.exec("ip", &["link", "set", "ecu0", "up"]).unwrap();
        (&ecu, "ecu0")
    };
    let pods = pods(2);
    let mut bus = BusSpec::new("wire");
    bus.physical = Some("can0".into());
    bus.members = vec![member("a", &pods[0]), member("b", &pods[1])];
    node.buses.add_bus(bus).unwrap();
    // The collision that silently loses pod -> physical frames without IIF_TX_OK.
    let host_index = node.ifindex("can0");
    assert!(
        pods.iter().any(|pod| ifindex_in(pod, "can0") == host_index),
        "a pod's can0 shares ifindex {host_index} with the host's can0"
    );
    let echo = node
        .cangw()
        .iter()
        .filter(|line| line.contains("-d can0") && line.contains(" -e "))
        .count();
    assert_eq!(
        echo,
        if kind == "vcan" { 2 } else { 0 },
        "{:?}",
        node.cangw()
    );

    let wire = socket(wire_ns, wire_if);
    let a = socket(&pods[0], "can0");
    let b = socket(&pods[1], "can0");
    wire.write_frame(&classic(0x10, &[1])).unwrap();
    a.write_frame(&classic(0x20, &[2])).unwrap();
    b.write_frame(&classic(0x30, &[3])).unwrap();
    assert_eq!(
        ids(&received(&wire)),
        vec![0x20, 0x30],
        "wire side ({kind})"
    );
    assert_eq!(ids(&received(&a)), vec![0x10, 0x30], "member a ({kind})");
    assert_eq!(ids(&received(&b)), vec![0x10, 0x20], "member b ({kind})");
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn vcan_physical_stand_in_exchanges_frames_both_ways_despite_ifindex_collision() {
    physical_round_trip("vcan");
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn vxcan_physical_stand_in_with_ecu_peer_exchanges_frames_both_ways() {
    physical_round_trip("vxcan");
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn listen_only_allow_list_and_receive_filters_are_enforced_and_counted() {
    let mut node = Node::new();
    let pods = pods(4);
    let mut bus = BusSpec::new("access");
    let mut listener = member("listener", &pods[1]);
    listener.access = Access::ListenOnly;
    let mut limited = member("limited", &pods[2]);
    limited.transmit_allow.push(CanFilter {
        id: 0x100,
        mask: 0x7f0,
        extended: false,
        invert: false,
    });
    let mut picky = member("picky", &pods[3]);
    picky.receive_filters.push(CanFilter {
        id: 0x300,
        mask: 0x7ff,
        extended: false,
        invert: false,
    });
    bus.members = vec![member("open", &pods[0]), listener, limited, picky];
    node.buses.add_bus(bus).unwrap();
    assert!(
        node.cangw()
            .iter()
            .all(|line| !line.contains(&format!("-s {}", host_name("listener")))),
        "no rule from a listen-only member"
    );
    let sockets: Vec<_> = pods.iter().map(|pod| socket(pod, "can0")).collect();
    sockets[1].write_frame(&classic(0x050, &[])).unwrap(); // listener: dropped
    sockets[2].write_frame(&classic(0x105, &[])).unwrap(); // limited: allowed
    sockets[2].write_frame(&classic(0x200, &[])).unwrap(); // limited: dropped
    sockets[0].write_frame(&classic(0x300, &[])).unwrap(); // open: picky takes it
    sockets[0].write_frame(&classic(0x301, &[])).unwrap(); // open: picky refuses it
    assert_eq!(ids(&received(&sockets[0])), vec![0x105]);
    assert_eq!(ids(&received(&sockets[1])), vec![0x105, 0x300, 0x301]);
    assert_eq!(ids(&received(&sockets[2])), vec![0x300, 0x301]);
    assert_eq!(ids(&received(&sockets[3])), vec![0x300]);

    let listener = node.buses.counters("access", "listener").unwrap();
    assert_eq!(listener.transmit_dropped, 1, "{listener:?}");
    assert_eq!(listener.forwarded_from, 0);
    assert_eq!(listener.forwarded_to, 3, "0x105, 0x300, 0x301");
    let limited = node.buses.counters("access", "limited").unwrap();
    assert_eq!(limited.transmit_dropped, 1, "{limited:?}");
    // 0x105 was routed to three members; picky's receive filter refused it on the way out,
    // which can-gw counts as a drop.
    assert_eq!(limited.forwarded_from, 2, "{limited:?}");
    assert_eq!(limited.gateway_dropped, 1, "{limited:?}");
    let picky = node.buses.counters("access", "picky").unwrap();
    assert_eq!(picky.receive_dropped, 2, "0x105 and 0x301: {picky:?}");
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn fd_frames_never_reach_classic_members_and_classic_frames_reach_all() {
    let mut node = Node::new();
    let pods = pods(3);
    let mut bus = BusSpec::new("fd");
    bus.fd = true;
    let mut a = member("a", &pods[0]);
    a.fd = true;
    let mut b = member("b", &pods[1]);
    b.fd = true;
    bus.members = vec![a, b, member("c", &pods[2])];
    node.buses.add_bus(bus).unwrap();
    assert_eq!(
        links_in(&pods[0])
            .unwrap()
            .iter()
            .find(|l| l.name == "can0")
            .unwrap()
            .mtu,
        72
    );
    assert_eq!(
        links_in(&pods[2])
            .unwrap()
            .iter()
            .find(|l| l.name == "can0")
            .unwrap()
            .mtu,
        16
    );
    let sockets: Vec<_> = pods.iter().map(|pod| socket(pod, "can0")).collect();
    sockets[0].write_frame(&fd(0x111)).unwrap();
    sockets[0].write_frame(&classic(0x222, &[2])).unwrap();
    let b_frames = received(&sockets[1]);
    assert_eq!(
        b_frames.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(),
        vec![(0x111, true), (0x222, false)]
    );
    let c_frames = received(&sockets[2]);
    assert_eq!(
        c_frames.iter().map(|f| (f.0, f.1)).collect::<Vec<_>>(),
        vec![(0x222, false)]
    );
    assert!(received(&sockets[0]).is_empty());
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn shaping_one_member_delays_only_that_member() {
    let mut node = Node::new();
    let pods = pods(3);
    let mut bus = BusSpec::new("shaped");
    let mut slow = member("slow", &pods[2]);
    slow.rx_shaping = Some(MemberShaping {
        delay_us: 200_000,
        ..MemberShaping::default()
    });
    bus.members = vec![member("sender", &pods[0]), member("fast", &pods[1]), slow];
    node.buses.add_bus(bus).unwrap();
    let qdiscs = can_dra_testkit::tc_qdiscs(&node.host, &host_name("slow")).unwrap();
    assert!(
        qdiscs.iter().any(|q| q["kind"] == "netem"),
        "netem on the slow member's host end: {qdiscs:?}"
    );
    let sender = socket(&pods[0], "can0");
    let fast = socket(&pods[1], "can0");
    let slow = socket(&pods[2], "can0");
    let started = Instant::now();
    sender.write_frame(&classic(0x42, &[1])).unwrap();
    fast.read_frame_timeout(Duration::from_secs(5)).unwrap();
    let fast_latency = started.elapsed();
    slow.read_frame_timeout(Duration::from_secs(5)).unwrap();
    let slow_latency = started.elapsed();
    assert!(
        slow_latency >= Duration::from_millis(190),
        "{slow_latency:?}"
    );
    assert!(
        fast_latency < Duration::from_millis(150),
        "{fast_latency:?}"
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn members_joining_and_leaving_do_not_disturb_a_running_stream() {
    const FRAMES: u16 = 1500;
    let mut node = Node::new();
    let pods = pods(4);
    let mut bus = BusSpec::new("churn");
    bus.members = vec![member("talker", &pods[0]), member("listener", &pods[1])];
    node.buses.add_bus(bus).unwrap();
    let talker = socket(&pods[0], "can0");
    let listener = socket(&pods[1], "can0");
    // Read while the stream runs: a socket's receive buffer holds only a few hundred frames.
    let receiving = std::thread::spawn(move || {
        let mut sequence = Vec::new();
        // Until the stream is complete, or silent for long enough to call it lost; then
        // a little longer, to catch duplicates.
        while sequence.len() < usize::from(FRAMES) {
            match listener.read_frame_timeout(Duration::from_secs(10)) {
                Ok(CanAnyFrame::Normal(frame)) => {
                    sequence.push(u16::from_be_bytes([frame.data()[0], frame.data()[1]]));
                }
                Ok(other) => panic!("unexpected frame {other:?}"),
                Err(_) => break,
            }
        }
        sequence.extend(
            received(&listener)
                .iter()
                .map(|frame| u16::from_be_bytes([frame.2[0], frame.2[1]])),
        );
        sequence
    });
    let done = Arc::new(AtomicBool::new(false));
    let sending = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            for seq in 0..FRAMES {
                let frame = classic(0x7a, &seq.to_be_bytes());
                talker.write_frame_insist(&frame).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut cycles = 0;
    while !done.load(Ordering::SeqCst) {
        for (i, pod) in pods[2..].iter().enumerate() {
            let id = format!("churn{i}");
            node.buses.join("churn", member(&id, pod)).unwrap();
            node.buses.leave("churn", &id).unwrap();
        }
        cycles += 1;
    }
    sending.join().unwrap();
    let sequence = receiving.join().unwrap();
    assert!(
        cycles >= 2,
        "membership changed during the stream ({cycles} cycles)"
    );
    assert_eq!(
        sequence,
        (0..FRAMES).collect::<Vec<_>>(),
        "no loss, no duplicate, in order"
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn reconcile_after_a_crash_repairs_rules_and_removes_orphans() {
    let mut node = Node::new();
    let pods = pods(3);
    let mut bus = BusSpec::new("crash");
    bus.members = vec![
        member("a", &pods[0]),
        member("b", &pods[1]),
        member("c", &pods[2]),
    ];
    let desired = DesiredState {
        buses: vec![bus.clone()],
    };
    node.buses.add_bus(bus).unwrap();
    let expected = node.rule_names(&["a", "b", "c"]);
    assert_eq!(expected.len(), 6);
    // The process is killed: the manager goes away without teardown.
    let Node { host, buses } = node;
    drop(buses);
    let [a, b, c] = ["a", "b", "c"].map(host_name);
    let cangw = |args: &str| {
        let args: Vec<&str> = args.split_whitespace().collect();
        let output = host.command("cangw").args(&args).output().unwrap();
        assert!(output.status.success(), "cangw {args:?}: {output:?}");
    };
    cangw(&format!("-D -s {a} -d {b} -i -l 1"));
    cangw(&format!("-A -s {b} -d {c} -i -l 1"));
    cangw(&format!("-A -s {c} -d {a} -f 123:7FF -i -l 1"));
    let orphan = "cdra0123456789a";
    host.exec(
        "ip",
        &[
            "link", "add", orphan, "type", "vxcan", "peer", "name", "stray0",
        ],
    )
    .unwrap();
    host.exec("ip", &["link", "set", orphan, "up"]).unwrap();
    host.exec("ip", &["link", "set", "stray0", "up"]).unwrap();
    cangw(&format!("-A -s {orphan} -d {a} -i -l 1"));
    assert_eq!(cangw_list(&host).len(), 8, "6 - 1 deleted + 3 added");

    let netns = Netns::from_path(host.path()).unwrap();
    let mut node = Node {
        buses: Buses::new(SystemKernel::open_in(&netns).unwrap()),
        host,
    };
    let report = node.buses.reconcile(desired.clone()).unwrap();
    assert_eq!(report.rules_added, 1, "{report:?}");
    assert_eq!(report.links_deleted, vec![orphan.to_string()], "{report:?}");
    assert_eq!(
        report.rules_deleted, 2,
        "duplicate and filtered: {report:?}"
    );
    assert_eq!(node.rule_names(&["a", "b", "c"]), expected);
    assert!(!node.link_names().contains(&orphan.to_string()));
    assert!(node.buses.reconcile(desired).unwrap().is_noop());
    let sockets: Vec<_> = pods.iter().map(|pod| socket(pod, "can0")).collect();
    assert_full_exchange(&sockets);
}

fn qdisc_snapshot(node: &Node) -> Vec<String> {
    node.link_names()
        .iter()
        .map(|name| {
            node.host
                .exec("tc", &["qdisc", "show", "dev", name])
                .unwrap()
        })
        .collect()
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn removing_a_bus_leaves_links_rules_and_qdiscs_as_they_were() {
    let mut node = Node::new();
    node.ip("link add vcan0 mtu 16 type vcan");
    node.ip("link set vcan0 up");
    let pods = pods(3);
    let (links, rules, qdiscs) = (node.link_names(), node.cangw(), qdisc_snapshot(&node));
    let pod_links: Vec<_> = pods
        .iter()
        .map(|pod| links_in(pod).unwrap().len())
        .collect();
    let mut bus = BusSpec::new("gone");
    bus.physical = Some("vcan0".into());
    let mut shaped = member("shaped", &pods[0]);
    shaped.rx_shaping = Some(MemberShaping {
        bitrate: Some(125_000),
        ..MemberShaping::default()
    });
    shaped.tx_shaping = Some(MemberShaping {
        delay_us: 1000,
        ..MemberShaping::default()
    });
    let mut listener = member("listener", &pods[1]);
    listener.access = Access::ListenOnly;
    bus.members = vec![shaped, listener, member("plain", &pods[2])];
    node.buses.add_bus(bus).unwrap();
    // Transmitters shaped, plain and vcan0, each to the three other endpoints.
    assert_eq!(node.cangw().len(), 9, "{:?}", node.cangw());
    node.buses.remove_bus("gone").unwrap();
    assert_eq!(node.link_names(), links);
    assert_eq!(node.cangw(), rules);
    assert_eq!(qdisc_snapshot(&node), qdiscs);
    let after: Vec<_> = pods
        .iter()
        .map(|pod| links_in(pod).unwrap().len())
        .collect();
    assert_eq!(after, pod_links);
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn bad_input_is_refused_with_a_typed_error_and_leaves_nothing_behind() {
    let mut node = Node::new();
    let pods = pods(1);
    let before = node.link_names();
    node.buses.add_bus(BusSpec::new("bad")).unwrap();

    let mut physical = BusSpec::new("phys");
    physical.physical = Some("can9".into());
    let error = node.buses.add_bus(physical).unwrap_err();
    assert!(
        matches!(error, BusError::UnknownInterface { .. }),
        "{error}"
    );
    let mut loopback = BusSpec::new("lo");
    loopback.physical = Some("lo".into());
    let error = node.buses.add_bus(loopback).unwrap_err();
    assert!(matches!(error, BusError::NotCan { .. }), "{error}");

    let long = MemberSpec::new("long", NetnsRef::Path(pods[0].path()), "can-interface-01");
    let error = node.buses.join("bad", long).unwrap_err();
    assert!(
        matches!(error, BusError::InvalidInterfaceName { .. }),
        "{error}"
    );

    let gone = MemberSpec::new("gone", NetnsRef::Pid(exited_pid().unwrap()), "can0");
    let error = node.buses.join("bad", gone).unwrap_err();
    assert!(matches!(error, BusError::NamespaceGone { .. }), "{error}");

    // The same namespace through a process inside it: the interface name is taken.
    node.buses.join("bad", member("first", &pods[0])).unwrap();
    let mut sleeper = pods[0].command("sleep");
    let mut sleeper = sleeper.arg("30").spawn().unwrap();
    wait_until_in(sleeper.id(), &pods[0]);
    let alias = MemberSpec::new("second", NetnsRef::Pid(sleeper.id()), "can0");
    let error = node.buses.join("bad", alias);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let error = error.unwrap_err();
    assert!(
        matches!(error, BusError::InterfaceTaken { ref other, .. } if other.as_deref() == Some("first")),
        "{error}"
    );
    let error = node
        .buses
        .join("bad", member("first", &pods[0]))
        .unwrap_err();
    assert!(matches!(error, BusError::DuplicateMember { .. }), "{error}");

    node.buses.remove_bus("bad").unwrap();
    assert_eq!(node.link_names(), before);
    assert!(node.cangw().is_empty());
    assert_eq!(links_in(&pods[0]).unwrap().len(), 1, "only lo in the pod");
}

/// Waits until `pid` has entered the namespace of `ns` (`ip netns exec` switches after exec).
fn wait_until_in(pid: u32, ns: &TestNetns) {
    let wanted = Netns::from_path(ns.path()).unwrap().id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Netns::from_pid(pid).map(|netns| netns.id()).ok() != Some(wanted) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} never entered {}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn host_links_report_their_kinds() {
    // The adapter's view of link kinds, checked against ip -d link.
    let node = Node::new();
    node.ip("link add vcan7 type vcan");
    let mut kernel = SystemKernel::open_in(&Netns::from_path(node.host.path()).unwrap()).unwrap();
    let links = kernel.host_links().unwrap();
    let vcan = links.iter().find(|link| link.name == "vcan7").unwrap();
    assert_eq!(vcan.kind, LinkKind::Vcan);
    assert_eq!(vcan.ifindex, node.ifindex("vcan7"));
}
