//! Kernel tests of `gateway`: can-gw rules made over netlink, checked with `cangw -L`,
//! `candump` and SocketCAN sockets as independent observers. Each test builds its own
//! network namespaces and removes them when it ends, even on panic.

// Test helpers may fail loudly; clippy only exempts `#[test]` functions themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use can_dra_dataplane::gateway::{
    self, CAN_EFF_FLAG, FrameKind, GatewayError, GwFilter, GwRule, GwRuleStats,
};
use can_dra_dataplane::netlink::RouteSocket;
use can_dra_dataplane::netns::Netns;
use socketcan::{
    CanAnyFrame, CanFdFrame, CanFdSocket, CanFrame, EmbeddedFrame, ExtendedId, Frame, Socket,
    StandardId,
};

/// How long a receiver waits for one more frame before it decides the bus is quiet.
/// Generous because the kernel tests usually run under QEMU without acceleration.
const QUIET: Duration = Duration::from_millis(700);

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace named `gw<pid>-<tag><n>`, deleted on drop.
struct Ns {
    name: String,
    netns: Netns,
}

impl Ns {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "gw{}-{tag}{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let netns = Netns::from_path(format!("/run/netns/{name}")).unwrap();
        let ns = Self { name, netns };
        ns.ip("link set lo up");
        ns
    }

    /// Runs `ip -n <ns> <args>`.
    fn ip(&self, args: &str) {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run("ip", &all);
    }

    /// Runs a command inside the namespace and returns its output.
    fn exec(&self, command: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend(command);
        run("ip", &all)
    }

    fn ifindex(&self, ifname: &str) -> u32 {
        let ifname = ifname.to_string();
        self.netns
            .run(move || nix::net::if_::if_nametoindex(ifname.as_str()))
            .unwrap()
            .unwrap()
    }

    /// Creates an FD-capable vcan (MTU 72, set explicitly: newer kernels default to CAN XL), up.
    fn vcan(&self, ifname: &str) -> u32 {
        self.ip(&format!("link add {ifname} mtu 72 type vcan"));
        self.ip(&format!("link set {ifname} up"));
        self.ifindex(ifname)
    }

    fn route(&self) -> RouteSocket {
        RouteSocket::open_in(&self.netns).unwrap()
    }

    /// A raw CAN socket (Classic and FD) bound to `ifname` inside the namespace.
    fn socket(&self, ifname: &str) -> CanFdSocket {
        let ifname = ifname.to_string();
        self.netns
            .run(move || CanFdSocket::open(&ifname))
            .unwrap()
            .unwrap()
    }

    fn cangw_list(&self) -> Vec<CangwLine> {
        // can-utils 2020.11 `cangw -L` exits non-zero even when it lists fine, so judge it
        // by its error output instead.
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, "cangw", "-L"])
            .output()
            .unwrap();
        assert!(
            output.stderr.is_empty(),
            "cangw -L: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        parse_cangw(&String::from_utf8_lossy(&output.stdout))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// One rule as printed by `cangw -L`: the command line that would recreate it, then
/// `# N handled N dropped N deleted`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CangwLine {
    src: String,
    dst: String,
    options: Vec<String>,
    handled: u32,
    dropped: u32,
    deleted: u32,
}

fn parse_cangw(text: &str) -> Vec<CangwLine> {
    let mut rules = Vec::new();
    for line in text.lines().filter(|line| line.starts_with("cangw ")) {
        let (command, counters) = line.split_once('#').unwrap();
        let tokens: Vec<&str> = command.split_whitespace().collect();
        let value_of = |flag: &str| {
            let at = tokens.iter().position(|token| *token == flag).unwrap();
            tokens[at + 1].to_string()
        };
        // Everything after `cangw -A` except the interface arguments.
        let mut options = Vec::new();
        let mut rest = tokens.iter().skip(2);
        while let Some(token) = rest.next() {
            if *token == "-s" || *token == "-d" {
                rest.next();
            } else {
                options.push(token.to_string());
            }
        }
        let numbers: Vec<u32> = counters
            .split_whitespace()
            .filter_map(|word| word.parse().ok())
            .collect();
        assert_eq!(numbers.len(), 3, "counters in {line:?}");
        rules.push(CangwLine {
            src: value_of("-s"),
            dst: value_of("-d"),
            options,
            handled: numbers[0],
            dropped: numbers[1],
            deleted: numbers[2],
        });
    }
    rules
}

/// Frames a socket received until the bus stayed quiet: (identifier word with flags, is FD).
fn received(socket: &CanFdSocket) -> Vec<(u32, bool)> {
    let mut frames = Vec::new();
    loop {
        match socket.read_frame_timeout(QUIET) {
            Ok(frame) => frames.push((frame.id_word(), matches!(frame, CanAnyFrame::Fd(_)))),
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

fn classic(id: u32) -> CanFrame {
    if id & CAN_EFF_FLAG != 0 {
        CanFrame::new(ExtendedId::new(id & !CAN_EFF_FLAG).unwrap(), &[1, 2, 3]).unwrap()
    } else {
        CanFrame::new(
            StandardId::new(u16::try_from(id).unwrap()).unwrap(),
            &[1, 2, 3],
        )
        .unwrap()
    }
}

fn fd(id: u32) -> CanFdFrame {
    CanFdFrame::new(
        StandardId::new(u16::try_from(id).unwrap()).unwrap(),
        &[7; 24],
    )
    .unwrap()
}

fn stats_of(rules: &[GwRuleStats], src: u32, dst: u32) -> Vec<GwRuleStats> {
    rules
        .iter()
        .filter(|stats| stats.rule.src == src && stats.rule.dst == dst)
        .copied()
        .collect()
}

/// Whether a CAN socket with a match-all filter is bound to `ifname` in `ns`, according to
/// the kernel's `/proc/net/can/rcvlist_all` of that namespace.
fn has_receiver(ns: &Ns, ifname: &str) -> bool {
    let table = ns
        .netns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/can/rcvlist_all"))
        .unwrap()
        .unwrap();
    // Entries read "  <dev>  <can_id>  <mask>  ..."; an empty list reads "(<dev>: no entry)".
    table
        .lines()
        .any(|line| line.split_whitespace().next() == Some(ifname))
}

/// `candump -L -T` running in a namespace: it ends by itself after a quiet period.
struct Candump {
    child: Child,
}

impl Candump {
    fn start(ns: &Ns, ifname: &str) -> Self {
        let child = Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "candump", "-L", "-T", "3000", ifname,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Frames sent before candump has bound its socket would be missed (and a "nothing
        // arrived" check would pass by accident), so wait until its receive-all filter is
        // registered on the interface. Nothing else listens in this namespace.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !has_receiver(ns, ifname) {
            assert!(
                Instant::now() < deadline,
                "candump did not bind to {ifname} in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child }
    }

    /// The `ID#DATA` part of every frame candump logged.
    fn frames(self) -> Vec<String> {
        let output = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().nth(2).map(str::to_string))
            .collect()
    }
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn rule_forwards_frames_and_list_counts_agree_with_cangw() {
    let ns = Ns::new("fwd");
    let a = ns.vcan("gwa");
    let b = ns.vcan("gwb");
    let mut route = ns.route();
    let rule = GwRule {
        echo: true,
        ..GwRule::new(a, b, FrameKind::Classic)
    };
    gateway::add(&mut route, &rule).unwrap();

    let sender = ns.socket("gwa");
    let receiver = ns.socket("gwb");
    for id in 0x100..0x105 {
        sender.write_frame(&classic(id)).unwrap();
    }
    let frames = received(&receiver);
    assert_eq!(
        frames,
        (0x100..0x105).map(|id| (id, false)).collect::<Vec<_>>(),
        "every frame forwarded once, in order"
    );

    let listed = gateway::list(&mut route).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].rule, rule);
    assert_eq!(
        (listed[0].handled, listed[0].dropped, listed[0].deleted),
        (5, 0, 0)
    );

    let cangw = ns.cangw_list();
    assert_eq!(
        cangw,
        vec![CangwLine {
            src: "gwa".into(),
            dst: "gwb".into(),
            options: vec!["-e".into()],
            handled: 5,
            dropped: 0,
            deleted: 0,
        }]
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn classic_rules_carry_only_classic_frames_and_fd_rules_only_fd() {
    let ns = Ns::new("kind");
    let a = ns.vcan("gwa");
    let classic_dst = ns.vcan("gwc");
    let fd_dst = ns.vcan("gwf");
    let mut route = ns.route();
    for (dst, frames) in [(classic_dst, FrameKind::Classic), (fd_dst, FrameKind::Fd)] {
        let rule = GwRule {
            echo: true,
            ..GwRule::new(a, dst, frames)
        };
        gateway::add(&mut route, &rule).unwrap();
    }

    let sender = ns.socket("gwa");
    let classic_rx = ns.socket("gwc");
    let fd_rx = ns.socket("gwf");
    sender.write_frame(&classic(0x10)).unwrap();
    sender.write_frame(&fd(0x20)).unwrap();
    sender.write_frame(&classic(0x11)).unwrap();

    assert_eq!(received(&classic_rx), vec![(0x10, false), (0x11, false)]);
    assert_eq!(received(&fd_rx), vec![(0x20, true)]);
    let listed = gateway::list(&mut route).unwrap();
    assert_eq!(stats_of(&listed, a, classic_dst)[0].handled, 2);
    assert_eq!(stats_of(&listed, a, fd_dst)[0].handled, 1);
    assert_eq!(stats_of(&listed, a, fd_dst)[0].rule.frames, FrameKind::Fd);
    let cangw = ns.cangw_list();
    let fd_line = cangw.iter().find(|line| line.dst == "gwf").unwrap();
    assert!(fd_line.options.contains(&"-X".to_string()), "{fd_line:?}");
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn filters_forward_only_matching_ids_including_inverted_and_extended() {
    let ns = Ns::new("filt");
    let a = ns.vcan("gwa");
    let only = ns.vcan("gwonly");
    let except = ns.vcan("gwexcept");
    let ext = ns.vcan("gwext");
    let mut route = ns.route();
    let rules = [
        (only, GwFilter::standard(0x123)),
        (except, GwFilter::standard(0x123).inverted()),
        (ext, GwFilter::extended(0x0123_4567)),
    ];
    for (dst, filter) in rules {
        let rule = GwRule {
            echo: true,
            ..GwRule::new(a, dst, FrameKind::Classic).with_filter(filter)
        };
        gateway::add(&mut route, &rule).unwrap();
    }

    let receivers = [
        ns.socket("gwonly"),
        ns.socket("gwexcept"),
        ns.socket("gwext"),
    ];
    let sender = ns.socket("gwa");
    let sent = [
        0x123,
        0x124,
        0x123 | CAN_EFF_FLAG,
        0x0123_4567 | CAN_EFF_FLAG,
    ];
    for id in sent {
        sender.write_frame(&classic(id)).unwrap();
    }
    let ids = |socket| -> Vec<u32> { received(socket).into_iter().map(|(id, _)| id).collect() };
    assert_eq!(ids(&receivers[0]), vec![0x123]);
    assert_eq!(
        ids(&receivers[1]),
        vec![0x124, 0x123 | CAN_EFF_FLAG, 0x0123_4567 | CAN_EFF_FLAG]
    );
    assert_eq!(ids(&receivers[2]), vec![0x0123_4567 | CAN_EFF_FLAG]);

    // The dump reports each filter exactly as given, so a delete can repeat it.
    let listed = gateway::list(&mut route).unwrap();
    for (dst, filter) in rules {
        assert_eq!(stats_of(&listed, a, dst)[0].rule.filter, Some(filter));
    }
    let cangw = ns.cangw_list();
    let except_line = cangw.iter().find(|line| line.dst == "gwexcept").unwrap();
    assert_eq!(except_line.handled, 3);
    assert!(
        except_line
            .options
            .iter()
            .any(|option| option.contains('~')),
        "cangw shows the inverted filter: {except_line:?}"
    );
    for (dst, filter) in rules {
        let rule = GwRule {
            echo: true,
            ..GwRule::new(a, dst, FrameKind::Classic).with_filter(filter)
        };
        gateway::delete(&mut route, &rule).unwrap();
    }
    assert!(gateway::list(&mut route).unwrap().is_empty());
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn ensure_never_doubles_a_rule_and_delete_removes_exactly_one() {
    let ns = Ns::new("dup");
    let a = ns.vcan("gwa");
    let b = ns.vcan("gwb");
    let mut route = ns.route();
    let rule = GwRule {
        echo: true,
        ..GwRule::mesh(a, b, FrameKind::Classic)
    };
    let sender = ns.socket("gwa");
    let receiver = ns.socket("gwb");
    let copies_of_one_frame = |id: u32| {
        sender.write_frame(&classic(id)).unwrap();
        received(&receiver).len()
    };

    assert!(
        gateway::ensure(&mut route, &rule).unwrap(),
        "first ensure adds"
    );
    assert!(
        !gateway::ensure(&mut route, &rule).unwrap(),
        "second ensure adds nothing"
    );
    assert_eq!(ns.cangw_list().len(), 1);
    assert_eq!(copies_of_one_frame(0x1), 1);

    // The kernel itself does not de-duplicate: a plain add doubles the traffic.
    gateway::add(&mut route, &rule).unwrap();
    assert_eq!(ns.cangw_list().len(), 2);
    assert_eq!(copies_of_one_frame(0x2), 2);

    // Reconciling removes the extra copy.
    let report = gateway::ensure_exactly(&mut route, &[rule], |_| true).unwrap();
    assert_eq!(report.removed_duplicates, vec![rule]);
    assert!(report.added.is_empty() && report.removed_stale.is_empty());
    assert_eq!(copies_of_one_frame(0x3), 1);

    // delete removes one copy at a time, then reports NotFound.
    gateway::add(&mut route, &rule).unwrap();
    gateway::delete(&mut route, &rule).unwrap();
    assert_eq!(gateway::list(&mut route).unwrap().len(), 1);
    assert_eq!(copies_of_one_frame(0x4), 1);
    gateway::delete(&mut route, &rule).unwrap();
    assert!(ns.cangw_list().is_empty());
    assert_eq!(copies_of_one_frame(0x5), 0);
    let error = gateway::delete(&mut route, &rule).unwrap_err();
    assert!(matches!(error, GatewayError::NotFound { .. }), "{error}");

    // A delete must repeat the exact rule: the same interfaces with other flags match nothing.
    gateway::add(&mut route, &rule).unwrap();
    let error = gateway::delete(&mut route, &GwRule::mesh(a, b, FrameKind::Classic)).unwrap_err();
    assert!(matches!(error, GatewayError::NotFound { .. }), "{error}");
    assert_eq!(ns.cangw_list().len(), 1);
}

/// The cross-namespace first-ingress ifindex pitfall (can-kernel.md §0.1, §1.8), reproduced.
///
/// A frame sent by a pod keeps, as its "first ingress" ifindex, the index of the pod-side
/// vxcan end *in the pod's namespace*. can-gw skips a frame, without counting it, when that
/// index equals the destination's index; here the pod's `can0` has the same index as the host's
/// stand-in for a physical controller, so a naive rule loses every pod -> bus frame while
/// the bus -> pod direction works. The product's rules (IIF_TX_OK) deliver them.
#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn pod_to_physical_frames_are_silently_lost_without_iif_tx_ok_and_delivered_with_it() {
    const COLLIDING_INDEX: u32 = 10;
    let host = Ns::new("host");
    let wire = Ns::new("wire");
    let pod = Ns::new("pod");
    // The "physical" controller: host `phys` whose other end `ecu` is the far side of the wire.
    host.ip(&format!(
        "link add phys index {COLLIDING_INDEX} type vxcan peer name ecu netns {}",
        wire.name
    ));
    host.ip("link set phys up");
    wire.ip("link set ecu up");
    // A virtual bus on the host as well.
    let vbus = host.vcan("vbus");
    // The pod member: host end `vxpod`, pod end `can0` pinned to the physical index.
    host.ip(&format!(
        "link add vxpod index 20 type vxcan peer name can0 netns {} index {COLLIDING_INDEX}",
        pod.name
    ));
    host.ip("link set vxpod up");
    pod.ip("link set can0 up");
    let phys = host.ifindex("phys");
    let member = host.ifindex("vxpod");
    assert_eq!(
        pod.ifindex("can0"),
        phys,
        "the pod's can0 must share the host physical interface's index"
    );

    let mut route = host.route();
    let mesh = |iif_tx_ok: bool| {
        let rule = |src, dst, echo| GwRule {
            echo,
            iif_tx_ok,
            ..GwRule::new(src, dst, FrameKind::Classic)
        };
        // Echo only into the vcan, where local sockets would otherwise never see routed frames.
        vec![
            rule(member, phys, false),
            rule(phys, member, false),
            rule(member, vbus, true),
            rule(vbus, member, false),
        ]
    };

    // 1. The naive mesh, as `cangw -A -s X -d Y` would make it.
    for rule in mesh(false) {
        gateway::add(&mut route, &rule).unwrap();
    }
    let pod_socket = pod.socket("can0");
    let vbus_rx = host.socket("vbus");
    let ecu = Candump::start(&wire, "ecu");
    for _ in 0..3 {
        pod_socket.write_frame(&classic(0x321)).unwrap();
    }
    assert_eq!(
        ecu.frames(),
        Vec::<String>::new(),
        "naive rules: nothing reaches the wire"
    );
    assert_eq!(
        received(&vbus_rx).len(),
        3,
        "the same frames did reach the host"
    );
    let listed = gateway::list(&mut route).unwrap();
    let lost = stats_of(&listed, member, phys)[0];
    assert_eq!(
        (lost.handled, lost.dropped, lost.deleted),
        (0, 0, 0),
        "the loss is silent: no counter moves"
    );
    assert_eq!(stats_of(&listed, member, vbus)[0].handled, 3);
    let cangw = host.cangw_list();
    let line = cangw
        .iter()
        .find(|line| line.src == "vxpod" && line.dst == "phys")
        .unwrap();
    assert_eq!((line.handled, line.dropped, line.deleted), (0, 0, 0));
    // The other direction is unaffected: the wire reaches the pod.
    wire.exec(&["cansend", "ecu", "456#AA"]);
    assert_eq!(received(&pod_socket), vec![(0x456, false)]);

    // 2. The product's mesh: IIF_TX_OK on every rule.
    let report = gateway::ensure_exactly(&mut route, &mesh(true), |_| true).unwrap();
    assert_eq!(report.added.len(), 4);
    assert_eq!(report.removed_stale.len(), 4);
    let ecu = Candump::start(&wire, "ecu");
    for _ in 0..3 {
        pod_socket.write_frame(&classic(0x321)).unwrap();
    }
    assert_eq!(
        ecu.frames(),
        vec!["321#010203"; 3],
        "IIF_TX_OK rules: every frame reaches the wire exactly once"
    );
    assert_eq!(received(&vbus_rx).len(), 3);
    let listed = gateway::list(&mut route).unwrap();
    assert_eq!(stats_of(&listed, member, phys)[0].handled, 3);
    let cangw = host.cangw_list();
    let line = cangw
        .iter()
        .find(|line| line.src == "vxpod" && line.dst == "phys")
        .unwrap();
    assert_eq!(line.handled, 3);
    assert!(line.options.contains(&"-i".to_string()), "{line:?}");
    wire.exec(&["cansend", "ecu", "456#BB"]);
    assert_eq!(received(&pod_socket), vec![(0x456, false)]);
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn flush_removes_every_rule_including_foreign_ones() {
    let ns = Ns::new("flush");
    let a = ns.vcan("gwa");
    let b = ns.vcan("gwb");
    let mut route = ns.route();
    gateway::add(&mut route, &GwRule::mesh(a, b, FrameKind::Classic)).unwrap();
    gateway::add(&mut route, &GwRule::mesh(b, a, FrameKind::Fd)).unwrap();
    // A rule made by someone else, with a frame modification this module cannot express.
    ns.exec(&[
        "cangw",
        "-A",
        "-s",
        "gwa",
        "-d",
        "gwb",
        "-m",
        "SET:I:333.4.1122334455667788",
    ]);

    let listed = gateway::list(&mut route).unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(
        listed.iter().filter(|stats| stats.modifies_frames).count(),
        1
    );
    // ensure does not mistake the modifying rule for a plain one.
    assert!(gateway::ensure(&mut route, &GwRule::new(a, b, FrameKind::Classic)).unwrap());
    assert_eq!(ns.cangw_list().len(), 4);

    gateway::flush(&mut route).unwrap();
    assert!(gateway::list(&mut route).unwrap().is_empty());
    assert!(ns.cangw_list().is_empty());
    // Flushing an empty set is fine too.
    gateway::flush(&mut route).unwrap();
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn deleting_an_interface_removes_its_rules() {
    let ns = Ns::new("unreg");
    let a = ns.vcan("gwa");
    let b = ns.vcan("gwb");
    let c = ns.vcan("gwc");
    let mut route = ns.route();
    for (src, dst) in [(a, b), (b, c), (c, a)] {
        gateway::add(&mut route, &GwRule::mesh(src, dst, FrameKind::Classic)).unwrap();
    }
    ns.ip("link del gwb");
    let remaining: Vec<GwRule> = gateway::list(&mut route)
        .unwrap()
        .into_iter()
        .map(|stats| stats.rule)
        .collect();
    assert_eq!(remaining, vec![GwRule::mesh(c, a, FrameKind::Classic)]);
    let cangw = ns.cangw_list();
    assert_eq!(cangw.len(), 1);
    assert_eq!(
        (cangw[0].src.as_str(), cangw[0].dst.as_str()),
        ("gwc", "gwa")
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn bad_input_gives_typed_errors_and_leaves_no_rule_behind() {
    let ns = Ns::new("bad");
    let a = ns.vcan("gwa");
    let b = ns.vcan("gwb");
    let mut route = ns.route();

    let unknown = GwRule::mesh(a, 9999, FrameKind::Classic);
    let error = gateway::add(&mut route, &unknown).unwrap_err();
    assert!(
        matches!(error, GatewayError::NoSuchInterface { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("if9999"), "{error}");
    // `lo` exists but is not a CAN interface.
    let lo = ns.ifindex("lo");
    let error = gateway::add(&mut route, &GwRule::mesh(lo, a, FrameKind::Classic)).unwrap_err();
    assert!(
        matches!(error, GatewayError::NoSuchInterface { .. }),
        "{error}"
    );
    let error = gateway::add(&mut route, &GwRule::new(a, a, FrameKind::Classic)).unwrap_err();
    assert!(matches!(error, GatewayError::InvalidRule { .. }), "{error}");

    // A hop limit the module refuses (above its max_hops) is the kernel's EINVAL.
    let max_hops: u8 = std::fs::read_to_string("/sys/module/can_gw/parameters/max_hops")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if max_hops < gateway::MAX_HOPS {
        let rule = GwRule {
            limit_hops: Some(max_hops + 1),
            ..GwRule::mesh(a, b, FrameKind::Classic)
        };
        let error = gateway::add(&mut route, &rule).unwrap_err();
        assert!(matches!(error, GatewayError::InvalidRule { .. }), "{error}");
    }

    let error = gateway::delete(&mut route, &GwRule::mesh(a, b, FrameKind::Classic)).unwrap_err();
    assert!(matches!(error, GatewayError::NotFound { .. }), "{error}");

    // A batch with one bad rule adds nothing, even though the good rule came first.
    let error = gateway::ensure_all(
        &mut route,
        &[GwRule::mesh(a, b, FrameKind::Classic), unknown],
    )
    .unwrap_err();
    assert!(
        matches!(error, GatewayError::NoSuchInterface { .. }),
        "{error}"
    );

    assert!(gateway::list(&mut route).unwrap().is_empty());
    assert!(ns.cangw_list().is_empty());
}

/// Loads `can-gw` again after the test removed it, even if the test panics.
struct ReloadCanGw;

impl Drop for ReloadCanGw {
    fn drop(&mut self) {
        if reload_can_gw().is_err() {
            eprintln!("could not load can-gw again: later tests in this kernel will fail");
        }
    }
}

fn reload_can_gw() -> Result<(), String> {
    if std::path::Path::new("/sys/module/can_gw").exists() {
        return Ok(());
    }
    if Command::new("modprobe")
        .arg("can-gw")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
    {
        return Ok(());
    }
    // The test VM keeps its module tree in the harness cache, not in /lib/modules.
    let release = String::from_utf8_lossy(&run("uname", &["-r"]).stdout)
        .trim()
        .to_string();
    let cache = std::env::var("CAN_DRA_VM_CACHE")
        .ok()
        .filter(|dir| !dir.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{}/.cache/can-dra/vm",
                std::env::var("HOME").unwrap_or_default()
            )
        });
    let root = format!("{cache}/{release}/root");
    let status = Command::new("modprobe")
        .args(["-d", &root, "can-gw"])
        .status()
        .map_err(|error| error.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("modprobe -d {root} can-gw failed"))
    }
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn missing_can_gw_module_is_reported_as_module_missing() {
    let ns = Ns::new("nomod");
    let a = ns.vcan("gwa");
    let b = ns.vcan("gwb");
    let lsmod = String::from_utf8_lossy(&run("lsmod", &[]).stdout).to_string();
    assert!(
        lsmod.lines().any(|line| line.starts_with("can_gw ")),
        "can_gw must be a loaded module for this test:\n{lsmod}"
    );
    run("rmmod", &["can_gw"]);
    let _reload = ReloadCanGw;
    let mut route = ns.route();

    let error = gateway::add(&mut route, &GwRule::mesh(a, b, FrameKind::Classic)).unwrap_err();
    assert!(
        matches!(error, GatewayError::ModuleMissing { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("modprobe can-gw"), "{error}");
    println!("add without can-gw: {error}");
    // Without can-gw the dump is answered by other families: it must not invent rules.
    assert!(gateway::list(&mut route).unwrap().is_empty());

    reload_can_gw().unwrap();
    gateway::add(&mut route, &GwRule::mesh(a, b, FrameKind::Classic)).unwrap();
    assert_eq!(gateway::list(&mut route).unwrap().len(), 1);
}

/// Not a timed assertion: prints what `ensure` costs for 1 and 1000 rules (one dump per
/// call) against `ensure_all` (one dump per batch). Run with `--nocapture` to see it.
#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn measure_ensure_cost_for_1_and_1000_rules() {
    let ns = Ns::new("bench");
    let a = ns.vcan("gwa");
    let b = ns.vcan("gwb");
    let mut route = ns.route();
    let rules: Vec<GwRule> = (0..1000)
        .map(|id| GwRule::mesh(a, b, FrameKind::Classic).with_filter(GwFilter::standard(id)))
        .collect();
    let timed = |work: &mut dyn FnMut()| {
        let start = Instant::now();
        work();
        start.elapsed()
    };

    let one_into_empty = timed(&mut || {
        assert!(gateway::ensure(&mut route, &rules[0]).unwrap());
    });
    gateway::flush(&mut route).unwrap();
    let thousand_one_by_one = timed(&mut || {
        for rule in &rules {
            assert!(gateway::ensure(&mut route, rule).unwrap());
        }
    });
    assert_eq!(gateway::list(&mut route).unwrap().len(), 1000);
    let list_1000 = timed(&mut || {
        assert_eq!(gateway::list(&mut route).unwrap().len(), 1000);
    });
    let one_present_among_1000 = timed(&mut || {
        assert!(!gateway::ensure(&mut route, &rules[500]).unwrap());
    });
    let all_present_batch = timed(&mut || {
        assert!(gateway::ensure_all(&mut route, &rules).unwrap().is_empty());
    });
    gateway::flush(&mut route).unwrap();
    let thousand_batch = timed(&mut || {
        assert_eq!(gateway::ensure_all(&mut route, &rules).unwrap().len(), 1000);
    });
    assert_eq!(ns.cangw_list().len(), 1000);

    println!("gateway ensure cost (one run, this machine):");
    println!("  ensure 1 rule into an empty set:          {one_into_empty:?}");
    println!("  ensure 1000 rules one by one (dump each):  {thousand_one_by_one:?}");
    println!("  ensure_all 1000 rules (one dump):          {thousand_batch:?}");
    println!("  list 1000 rules:                           {list_1000:?}");
    println!("  ensure 1 present rule among 1000:          {one_present_among_1000:?}");
    println!("  ensure_all 1000 present rules:             {all_present_batch:?}");
    println!(
        "  ratio one-by-one / batch for 1000: {:.1}",
        thousand_one_by_one.as_secs_f64() / thousand_batch.as_secs_f64()
    );
}
