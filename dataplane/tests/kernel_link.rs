//! Kernel tests of `link`: vxcan members created over netlink with the peer born inside another
//! namespace, link utilities, CAN controller enumeration and the link monitor. Results are
//! checked with `ip -d -j link`, `candump`/`cansend` and SocketCAN sockets from Rust. Each test
//! builds its own namespaces (removed on drop, also on panic) and never touches the namespace it
//! runs in.

// Test helpers outside #[test] functions fail loudly on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use can_dra_dataplane::link::{
    CanKind, CanMtu, LinkError, LinkEvent, LinkMonitor, Links, OperState, VxcanSpec,
};
use can_dra_dataplane::netns::{Netns, NetnsError};
use can_dra_testkit::{
    Candump, Namespace, TestNetns, add_vcan, cansend, exited_pid, link_in, links_in,
};
use socketcan::{
    CanAnyFrame, CanFdFrame, CanFdSocket, CanFrame, EmbeddedFrame, Frame, Socket, StandardId,
};

/// How long a receiver waits for a frame, or for silence. Generous: the tests usually run
/// under QEMU without acceleration.
const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(500);

/// A namespace for the test, with its Rust handle.
struct Ns {
    fixture: TestNetns,
    netns: Netns,
}

impl Ns {
    fn new(tag: &str) -> Self {
        let fixture = TestNetns::new(tag).unwrap();
        let netns = Netns::from_path(fixture.path()).unwrap();
        Self { fixture, netns }
    }

    fn links(&self) -> Links {
        Links::open_in(&self.netns).unwrap()
    }

    /// Names of the links iproute2 sees, loopback excluded.
    fn link_names(&self) -> Vec<String> {
        links_in(&self.fixture)
            .unwrap()
            .into_iter()
            .map(|link| link.name)
            .filter(|name| name != "lo")
            .collect()
    }

    fn can_socket(&self, interface: &str) -> socketcan::CanSocket {
        let interface = interface.to_string();
        self.netns
            .run(move || socketcan::CanSocket::open(&interface))
            .unwrap()
            .unwrap()
    }

    fn fd_socket(&self, interface: &str) -> CanFdSocket {
        let interface = interface.to_string();
        self.netns
            .run(move || CanFdSocket::open(&interface))
            .unwrap()
            .unwrap()
    }
}

fn classic(id: u16, data: &[u8]) -> CanFrame {
    CanFrame::new(StandardId::new(id).unwrap(), data).unwrap()
}

fn fd(id: u16, data: &[u8]) -> CanFdFrame {
    CanFdFrame::new(StandardId::new(id).unwrap(), data).unwrap()
}

/// Receives exactly one classic frame and then silence.
fn receive_once(socket: &socketcan::CanSocket) -> CanFrame {
    let frame = socket.read_frame_timeout(WAIT).expect("frame delivered");
    let extra = socket.read_frame_timeout(QUIET);
    assert!(extra.is_err(), "frame delivered twice: {extra:?}");
    frame
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn vxcan_peer_is_born_in_the_pod_namespace_and_carries_frames_both_ways() {
    let host = Ns::new("fh");
    let pod = Ns::new("fp");
    let mut links = host.links();
    let pair = links
        .create_vxcan(
            &VxcanSpec::new("vxh-found", "can0", CanMtu::Classic),
            &pod.netns,
        )
        .unwrap();
    assert_eq!(pair.host.name, "vxh-found");
    assert_eq!(pair.peer.name, "can0");

    // Independent observer: each end is in its own namespace, named, MTU 16, up.
    let host_end = link_in(&host.fixture, "vxh-found").unwrap().unwrap();
    let pod_end = link_in(&pod.fixture, "can0").unwrap().unwrap();
    for (end, index) in [(&host_end, pair.host.index), (&pod_end, pair.peer.index)] {
        assert_eq!(end.kind.as_deref(), Some("vxcan"), "{end:?}");
        assert_eq!(end.mtu, 16, "{end:?}");
        assert!(end.up, "{end:?}");
        assert_eq!(end.index, index, "{end:?}");
        assert!(
            end.link_netnsid.is_some(),
            "peer is in the other namespace: {end:?}"
        );
    }
    assert_eq!(host_end.link_index, Some(pair.peer.index));
    assert_eq!(pod_end.link_index, Some(pair.host.index));
    assert_eq!(host.link_names(), vec!["vxh-found".to_string()]);
    assert_eq!(pod.link_names(), vec!["can0".to_string()]);

    // Pod -> host, seen by a Rust socket and by candump on the host end.
    let host_socket = host.can_socket("vxh-found");
    let pod_socket = pod.can_socket("can0");
    let dump = Candump::start(&host.fixture, "vxh-found").unwrap();
    pod_socket
        .write_frame(&classic(0x123, &[0xde, 0xad, 0xbe, 0xef]))
        .unwrap();
    let received = receive_once(&host_socket);
    assert_eq!(received.raw_id(), 0x123);
    assert_eq!(received.data(), &[0xde, 0xad, 0xbe, 0xef]);
    let captured = dump.stop().unwrap();
    assert_eq!(captured.len(), 1, "{captured:?}");
    assert_eq!(
        (captured[0].id, captured[0].data.as_slice()),
        (0x123, &[0xde, 0xad, 0xbe, 0xef][..])
    );

    // Host -> pod, sent by cansend, received by the pod's socket.
    cansend(&host.fixture, "vxh-found", "321#0102").unwrap();
    let received = receive_once(&pod_socket);
    assert_eq!((received.raw_id(), received.data()), (0x321, &[1, 2][..]));
    // Other sockets on the sending interface get the local echo, once.
    let echo = receive_once(&host_socket);
    assert_eq!(echo.raw_id(), 0x321);

    // A 16-byte MTU member refuses CAN FD frames.
    let pod_fd = pod.fd_socket("can0");
    assert!(pod_fd.write_frame(&fd(0x100, &[7; 12])).is_err());
    assert!(host_socket.read_frame_timeout(QUIET).is_err());

    // Deleting the host end removes both ends; nothing is left in either namespace.
    drop((host_socket, pod_socket, pod_fd));
    links.delete(pair.host.index).unwrap();
    assert!(host.link_names().is_empty(), "{:?}", host.link_names());
    assert!(pod.link_names().is_empty(), "{:?}", pod.link_names());
    assert!(links.by_index(pair.host.index).unwrap().is_none());
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn fd_member_carries_fd_and_classic_frames() {
    let host = Ns::new("dh");
    let pod = Ns::new("dp");
    let pair = host
        .links()
        .create_vxcan(&VxcanSpec::new("vxh-fd", "can0", CanMtu::Fd), &pod.netns)
        .unwrap();
    assert_eq!(pair.mtu, CanMtu::Fd);
    assert_eq!(link_in(&host.fixture, "vxh-fd").unwrap().unwrap().mtu, 72);
    assert_eq!(link_in(&pod.fixture, "can0").unwrap().unwrap().mtu, 72);

    let host_socket = host.fd_socket("vxh-fd");
    let pod_socket = pod.fd_socket("can0");
    let dump = Candump::start(&pod.fixture, "can0").unwrap();
    let payload: Vec<u8> = (0..64).collect();
    host_socket.write_frame(&fd(0x42, &payload)).unwrap();
    host_socket.write_frame(&classic(0x43, &[9])).unwrap();
    match pod_socket.read_frame_timeout(WAIT).unwrap() {
        CanAnyFrame::Fd(frame) => {
            assert_eq!(frame.raw_id(), 0x42);
            assert_eq!(frame.data(), payload.as_slice());
        }
        other => panic!("expected an FD frame, got {other:?}"),
    }
    match pod_socket.read_frame_timeout(WAIT).unwrap() {
        CanAnyFrame::Normal(frame) => assert_eq!((frame.raw_id(), frame.data()), (0x43, &[9][..])),
        other => panic!("expected a classic frame, got {other:?}"),
    }
    assert!(pod_socket.read_frame_timeout(QUIET).is_err());
    let captured = dump.stop().unwrap();
    assert_eq!(captured.len(), 2, "{captured:?}");
    assert!(captured[0].fd && captured[0].data == payload);
    assert!(!captured[1].fd);
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn pinned_indexes_are_honoured_on_both_ends() {
    let host = Ns::new("ih");
    let pod = Ns::new("ip");
    let mut links = host.links();
    // A small pod-side index, as the bus layer may pin to avoid can-gw's ifindex collision.
    let pair = links
        .create_vxcan(
            &VxcanSpec::new("vxh-pin", "can0", CanMtu::Classic).with_indexes(4242, 7),
            &pod.netns,
        )
        .unwrap();
    assert_eq!((pair.host.index, pair.peer.index), (4242, 7));
    assert_eq!(
        link_in(&host.fixture, "vxh-pin").unwrap().unwrap().index,
        4242
    );
    assert_eq!(link_in(&pod.fixture, "can0").unwrap().unwrap().index, 7);

    // The same indexes again: the host index is taken, nothing else is created.
    let error = links
        .create_vxcan(
            &VxcanSpec::new("vxh-pin2", "can1", CanMtu::Classic).with_indexes(4242, 8),
            &pod.netns,
        )
        .unwrap_err();
    assert!(
        matches!(error, LinkError::IndexInUse { index: 4242, .. }),
        "{error}"
    );
    // A taken pod-side index.
    let error = links
        .create_vxcan(
            &VxcanSpec::new("vxh-pin3", "can2", CanMtu::Classic).with_indexes(4243, 7),
            &pod.netns,
        )
        .unwrap_err();
    assert!(
        matches!(error, LinkError::IndexInUse { index: 7, .. }),
        "{error}"
    );
    // A peer index without a host index would be ignored by the kernel: refused up front.
    let error = links
        .create_vxcan(
            &VxcanSpec {
                peer_index: Some(9),
                ..VxcanSpec::new("vxh-pin4", "can3", CanMtu::Classic)
            },
            &pod.netns,
        )
        .unwrap_err();
    assert!(matches!(error, LinkError::InvalidRequest { .. }), "{error}");
    assert_eq!(host.link_names(), vec!["vxh-pin".to_string()]);
    assert_eq!(pod.link_names(), vec!["can0".to_string()]);
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn can_links_are_enumerated_with_kind_fd_and_state() {
    let host = Ns::new("eh");
    let pod = Ns::new("ep");
    add_vcan(&host.fixture, "vcan-c", 16).unwrap();
    add_vcan(&host.fixture, "vcan-f", 72).unwrap();
    let mut links = host.links();
    let pair = links
        .create_vxcan(&VxcanSpec::new("vxh-enum", "can0", CanMtu::Fd), &pod.netns)
        .unwrap();

    let controllers = links.can_controllers().unwrap();
    let find = |name: &str| {
        controllers
            .iter()
            .find(|controller| controller.name == name)
            .unwrap_or_else(|| panic!("{name} not enumerated: {controllers:?}"))
    };
    assert!(
        controllers.iter().all(|controller| controller.name != "lo"),
        "{controllers:?}"
    );
    let classic = find("vcan-c");
    assert_eq!(
        (classic.kind, classic.mtu, classic.fd),
        (CanKind::Vcan, 16, false)
    );
    assert!(classic.up);
    assert_eq!(
        classic.state, None,
        "virtual links have no controller state"
    );
    assert_eq!(classic.driver, None);
    let fd = find("vcan-f");
    assert_eq!((fd.kind, fd.mtu, fd.fd), (CanKind::Vcan, 72, true));
    let vxcan = find("vxh-enum");
    assert_eq!((vxcan.kind, vxcan.fd), (CanKind::Vxcan, true));
    assert_eq!(vxcan.peer_index, Some(pair.peer.index));
    // Carrier comes on once both ends are up; the kernel updates operstate asynchronously.
    let deadline = Instant::now() + WAIT;
    let mut operstate = vxcan.operstate;
    while operstate != OperState::Up && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        operstate = links.by_index(vxcan.index).unwrap().unwrap().operstate;
    }
    assert_eq!(operstate, OperState::Up, "both ends up: carrier on");
    let in_pod = pod.links().can_controllers().unwrap();
    assert_eq!(in_pod.len(), 1, "{in_pod:?}");
    assert_eq!(
        (in_pod[0].name.as_str(), in_pod[0].kind),
        ("can0", CanKind::Vxcan)
    );

    // Utilities: the MTU changes only while down; up/down is visible to iproute2.
    let index = classic.index;
    let error = links.set_mtu(index, 72).unwrap_err();
    assert!(matches!(error, LinkError::Busy { .. }), "{error}");
    links.set_up(index, false).unwrap();
    links.set_mtu(index, 72).unwrap();
    let observed = link_in(&host.fixture, "vcan-c").unwrap().unwrap();
    assert!(!observed.up);
    assert_eq!(observed.mtu, 72);
    let after = links.by_name("vcan-c").unwrap().unwrap();
    assert!(!after.up);
    assert_eq!(after.mtu, 72);
    links.set_up(index, true).unwrap();
    assert!(link_in(&host.fixture, "vcan-c").unwrap().unwrap().up);
    assert_eq!(links.by_index(index).unwrap().unwrap().name, "vcan-c");
    assert!(links.by_name("nothing-here").unwrap().is_none());
    let listed = links.list().unwrap();
    assert!(listed.iter().any(|link| link.name == "lo"));
    assert_eq!(listed.len(), 4, "{listed:?}");
    let error = links.delete(31_337).unwrap_err();
    assert!(matches!(error, LinkError::NotFound { .. }), "{error}");
}

/// Waits for an event matching `wanted`, skipping others; fails after `WAIT`.
fn expect_event(
    monitor: &mut LinkMonitor,
    what: &str,
    wanted: impl Fn(&LinkEvent) -> bool,
) -> LinkEvent {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Some(event) = monitor.next_event(Duration::from_millis(200)).unwrap() {
            if wanted(&event) {
                return event;
            }
            seen.push(event);
        }
    }
    panic!("no {what} event; saw {seen:#?}");
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn monitor_reports_added_downed_and_removed_vcan() {
    let host = Ns::new("mh");
    let mut monitor = LinkMonitor::open_in(&host.netns).unwrap();
    assert_eq!(monitor.known().count(), 0);
    assert_eq!(
        monitor.next_event(Duration::from_millis(100)).unwrap(),
        None
    );

    add_vcan(&host.fixture, "vcan-mon", 16).unwrap();
    let added = expect_event(
        &mut monitor,
        "added",
        |event| matches!(event, LinkEvent::Added(c) if c.name == "vcan-mon" && c.kind == CanKind::Vcan),
    );
    let LinkEvent::Added(controller) = added else {
        unreachable!()
    };
    expect_event(
        &mut monitor,
        "up",
        |event| matches!(event, LinkEvent::Changed { after, .. } if after.index == controller.index && after.up),
    );

    host.fixture
        .exec("ip", &["link", "set", "vcan-mon", "down"])
        .unwrap();
    expect_event(
        &mut monitor,
        "down",
        |event| matches!(event, LinkEvent::Changed { before, after } if before.up && !after.up && after.index == controller.index),
    );

    host.fixture
        .exec("ip", &["link", "del", "vcan-mon"])
        .unwrap();
    expect_event(
        &mut monitor,
        "removed",
        |event| matches!(event, LinkEvent::Removed(c) if c.index == controller.index),
    );
    assert_eq!(monitor.known().count(), 0);

    // Non-CAN links produce nothing.
    host.fixture
        .exec(
            "ip",
            &[
                "link",
                "add",
                "dummy-or-veth",
                "type",
                "veth",
                "peer",
                "vpeer",
            ],
        )
        .ok();
    assert_eq!(
        monitor.next_event(Duration::from_millis(500)).unwrap(),
        None
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn bad_names_are_refused_before_any_kernel_call() {
    let host = Ns::new("bh");
    let pod = Ns::new("bp");
    let mut links = host.links();
    for (host_name, peer_name) in [
        ("vxh-sixteen-byte", "can0"),
        ("vxh-ok", "pod/can0"),
        ("", "can0"),
        ("vxh-ok", ""),
    ] {
        let error = links
            .create_vxcan(
                &VxcanSpec::new(host_name, peer_name, CanMtu::Classic),
                &pod.netns,
            )
            .unwrap_err();
        assert!(
            matches!(error, LinkError::InvalidName { .. }),
            "{host_name:?}/{peer_name:?}: {error}"
        );
    }
    assert!(host.link_names().is_empty(), "{:?}", host.link_names());
    assert!(pod.link_names().is_empty(), "{:?}", pod.link_names());
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn duplicate_names_are_typed_errors_that_leave_existing_links_alone() {
    let host = Ns::new("xh");
    let pod = Ns::new("xp");
    add_vcan(&host.fixture, "taken0", 72).unwrap();
    let before = link_in(&host.fixture, "taken0").unwrap().unwrap();
    let mut links = host.links();

    let error = links
        .create_vxcan(
            &VxcanSpec::new("taken0", "can0", CanMtu::Classic),
            &pod.netns,
        )
        .unwrap_err();
    match &error {
        LinkError::Exists { name, .. } => assert_eq!(name, "taken0"),
        other => panic!("expected Exists, got {other}"),
    }
    assert!(error.to_string().contains("EEXIST"), "{error}");
    let after = link_in(&host.fixture, "taken0").unwrap().unwrap();
    assert_eq!(
        (after.index, after.kind.as_deref(), after.mtu, after.up),
        (before.index, Some("vcan"), 72, true)
    );
    assert_eq!(host.link_names(), vec!["taken0".to_string()]);
    assert!(pod.link_names().is_empty());

    // The peer's name taken inside the pod namespace.
    add_vcan(&pod.fixture, "can0", 16).unwrap();
    let error = links
        .create_vxcan(
            &VxcanSpec::new("vxh-new", "can0", CanMtu::Classic),
            &pod.netns,
        )
        .unwrap_err();
    match &error {
        LinkError::Exists {
            name, namespace, ..
        } => {
            assert_eq!(name, "can0");
            assert!(namespace.contains(pod.fixture.name()), "{namespace}");
        }
        other => panic!("expected Exists, got {other}"),
    }
    assert_eq!(host.link_names(), vec!["taken0".to_string()]);
    assert_eq!(pod.link_names(), vec!["can0".to_string()]);
    assert_eq!(
        link_in(&pod.fixture, "can0")
            .unwrap()
            .unwrap()
            .kind
            .as_deref(),
        Some("vcan")
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn a_gone_namespace_is_a_typed_error_and_a_dying_one_takes_the_pair_along() {
    let host = Ns::new("gh");
    let mut links = host.links();

    // The pod's process has exited: its namespace cannot be opened.
    let pid = exited_pid().unwrap();
    let opened: Result<Netns, LinkError> = Netns::from_pid(pid).map_err(LinkError::from);
    let error = opened.unwrap_err();
    assert!(
        matches!(error, LinkError::Namespace(NetnsError::Open { .. })),
        "{error}"
    );
    assert!(error.to_string().contains(&pid.to_string()), "{error}");
    assert!(host.link_names().is_empty());

    // A namespace deleted from /run/netns cannot be opened either.
    let doomed = TestNetns::new("gd").unwrap();
    let path = doomed.path();
    drop(doomed);
    assert!(matches!(
        Netns::from_path(&path),
        Err(NetnsError::Open { .. })
    ));

    // The handle keeps a namespace alive; once the last reference goes, the kernel destroys
    // the pod end and with it the host end: nothing is left behind.
    let pod = Ns::new("gp");
    links
        .create_vxcan(
            &VxcanSpec::new("vxh-dying", "can0", CanMtu::Classic),
            &pod.netns,
        )
        .unwrap();
    assert_eq!(host.link_names(), vec!["vxh-dying".to_string()]);
    drop(pod);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host.link_names().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(host.link_names().is_empty(), "{:?}", host.link_names());
}

/// The fixtures themselves: namespaces are removed when dropped, and the namespace under test
/// is never the one the test runs in.
#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn test_namespaces_are_isolated_and_removed() {
    let path = {
        let ns = Ns::new("fx");
        assert_ne!(ns.netns.id(), Netns::current().unwrap().id());
        assert!(ns.fixture.label().contains(ns.fixture.name()));
        ns.fixture.path()
    };
    assert!(!path.exists(), "{path:?} left behind");
}
