//! Kernel tests of member access control (`access`): transmit allow-lists, receive filters and
//! listen-only as tc filters on the host end of a vxcan pair.
//!
//! Each test builds a fresh "host" namespace holding the host end `vxh` and a vcan `bus0`, and a
//! "pod" namespace holding the peer `can0`. Frames are sent with `cansend`/`cangen` and observed
//! with `candump`, `cangw -L` and `tc -s filter show`, none of which share code with the product.
//!
//! Run with `cargo xtask test`, or build with `--no-run` and pass the binary to `cargo xtask vm`.

// Test helpers outside `#[test]` functions unwrap too: a failed setup step should fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use can_dra_dataplane::access::{
    self, AccessCounters, AccessError, AccessPolicy, CanMatch, Direction, MAX_ENTRIES, TxPolicy,
};
use can_dra_dataplane::netlink::RouteSocket;
use can_dra_dataplane::netns::Netns;
use can_dra_testkit::{Candump, CapturedFrame, Namespace, TestNetns, cansend, link_in, tc_qdiscs};

/// Where frames the pod sends show up on the host.
const HOST_END: &str = "vxh";
/// A host bus joined to the member by can-gw rules.
const BUS: &str = "bus0";
const POD_END: &str = "can0";

/// One member: a vxcan pair between a host and a pod namespace, plus a host vcan meshed with
/// the host end by can-gw (Classic and FD, both ways). Dropping it removes both namespaces.
struct Member {
    // Field order matters on drop: the socket and namespace handle go before the namespaces.
    socket: RouteSocket,
    ifindex: u32,
    host: TestNetns,
    pod: TestNetns,
}

impl Member {
    fn new() -> Self {
        let host = TestNetns::new("acch").unwrap();
        let pod = TestNetns::new("accp").unwrap();
        // The host end is created first, so its index (2) precedes bus0's (3) and the pod's
        // can0 (2 in its own namespace) never equals the index of a can-gw destination.
        for args in [
            vec![
                "link",
                "add",
                HOST_END,
                "type",
                "vxcan",
                "peer",
                "name",
                POD_END,
                "netns",
                pod.name(),
            ],
            vec!["link", "set", HOST_END, "mtu", "72"],
            vec!["link", "set", HOST_END, "up"],
            vec!["link", "add", BUS, "type", "vcan"],
            vec!["link", "set", BUS, "mtu", "72"],
            vec!["link", "set", BUS, "up"],
        ] {
            host.exec("ip", &args).unwrap();
        }
        pod.exec("ip", &["link", "set", POD_END, "mtu", "72"])
            .unwrap();
        pod.exec("ip", &["link", "set", POD_END, "up"]).unwrap();
        // bus0 -> pod, and pod -> bus0 echoed so candump on bus0 sees what arrives there.
        for args in [
            vec!["-A", "-s", BUS, "-d", HOST_END],
            vec!["-A", "-s", BUS, "-d", HOST_END, "-X"],
            vec!["-A", "-s", HOST_END, "-d", BUS, "-e"],
            vec!["-A", "-s", HOST_END, "-d", BUS, "-e", "-X"],
        ] {
            host.exec("cangw", &args).unwrap();
        }
        let ifindex = link_in(&host, HOST_END).unwrap().unwrap().index;
        let netns = Netns::from_path(host.path()).unwrap();
        let socket = RouteSocket::open_in(&netns).unwrap();
        Self {
            socket,
            ifindex,
            host,
            pod,
        }
    }

    fn apply(&mut self, policy: &AccessPolicy) -> Result<(), AccessError> {
        access::apply(&mut self.socket, self.ifindex, policy)
    }

    fn counters(&mut self) -> AccessCounters {
        access::counters(&mut self.socket, self.ifindex).unwrap()
    }

    fn read(&mut self) -> AccessPolicy {
        access::read(&mut self.socket, self.ifindex).unwrap()
    }

    /// Sends `frames` (cansend syntax) from the pod; returns what reached the host end.
    fn transmit(&self, frames: &[&str]) -> Vec<CapturedFrame> {
        let capture = Candump::start(&self.host, HOST_END).unwrap();
        for frame in frames {
            cansend(&self.pod, POD_END, frame).unwrap();
        }
        capture.stop().unwrap()
    }

    /// Sends `frames` on the host bus; returns what reached the pod through can-gw.
    fn receive(&self, frames: &[&str]) -> Vec<CapturedFrame> {
        let capture = Candump::start(&self.pod, POD_END).unwrap();
        for frame in frames {
            cansend(&self.host, BUS, frame).unwrap();
        }
        capture.stop().unwrap()
    }

    /// `tc -s -d filter show dev vxh ingress|egress`.
    fn tc_filters(&self, hook: &str) -> String {
        self.host
            .exec("tc", &["-s", "-d", "filter", "show", "dev", HOST_END, hook])
            .unwrap()
    }
}

/// What `tc -s` reports as dropped by the `gact drop` action on a hook, or `None` without one.
fn tc_action_drops(filters: &str) -> Option<u64> {
    let after = filters.split("gact action drop").nth(1)?;
    let counted = after.split("(dropped ").nth(1)?;
    counted.split(',').next()?.trim().parse().ok()
}

/// `(id, extended, fd)` of each captured frame, in arrival order.
fn ids(frames: &[CapturedFrame]) -> Vec<(u32, bool, bool)> {
    frames
        .iter()
        .map(|frame| (frame.id, frame.extended, frame.fd))
        .collect()
}

fn allow(entries: Vec<CanMatch>) -> AccessPolicy {
    AccessPolicy {
        transmit: TxPolicy::Allow(entries),
        receive: None,
    }
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn allowed_ids_pass_and_everything_else_is_dropped_and_counted() {
    let mut member = Member::new();
    member
        .apply(&allow(vec![
            CanMatch::standard(0x123, 0x7ff),
            CanMatch::standard(0x200, 0x700),
            CanMatch::extended(0x18fe_0000, 0x1fff_0000),
        ]))
        .unwrap();

    let arrived = member.transmit(&[
        "123#01",
        "124#02",
        "2AB#03",
        "323#04",
        "18FE1234#05",
        // A 29-bit frame with the low bits of an allowed 11-bit id.
        "00000123#06",
        "18FF0000#07",
    ]);

    assert_eq!(
        ids(&arrived),
        vec![
            (0x123, false, false),
            (0x2ab, false, false),
            (0x18fe_1234, true, false)
        ]
    );
    let counters = member.counters();
    assert_eq!(counters.transmit_dropped, 4, "{counters:?}");
    assert_eq!(counters.transmit_passed, 3, "{counters:?}");
    assert_eq!(
        tc_action_drops(&member.tc_filters("ingress")),
        Some(4),
        "tc agrees"
    );
    assert_eq!((counters.receive_passed, counters.receive_dropped), (0, 0));
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn fd_frames_are_filtered_by_the_same_list() {
    let mut member = Member::new();
    member
        .apply(&allow(vec![
            CanMatch::standard(0x123, 0x7ff),
            CanMatch::extended(0x1abc, 0x1fff_ffff),
        ]))
        .unwrap();

    let arrived = member.transmit(&[
        "123##1AABBCCDDEEFF0011",
        "124##1AA",
        "00001ABC##0112233445566778899",
        "00001ABD##0",
        "123#11",
    ]);

    assert_eq!(
        ids(&arrived),
        vec![
            (0x123, false, true),
            (0x1abc, true, true),
            (0x123, false, false)
        ]
    );
    assert_eq!(member.counters().transmit_dropped, 2);
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn inverted_entries_allow_everything_outside_their_range() {
    let mut member = Member::new();
    // Everything but standard 0x100..=0x1ff, plus 0x1ff itself.
    member
        .apply(&allow(vec![
            CanMatch::standard(0x100, 0x700).inverted(),
            CanMatch::standard(0x1ff, 0x7ff),
        ]))
        .unwrap();

    let arrived = member.transmit(&["150#01", "250#02", "1FF#03", "00000150#04", "100#05"]);

    assert_eq!(
        ids(&arrived),
        vec![
            (0x250, false, false),
            (0x1ff, false, false),
            (0x150, true, false)
        ]
    );
    assert_eq!(member.counters().transmit_dropped, 2);
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn receive_filters_deliver_only_matching_frames_to_the_pod() {
    let mut member = Member::new();
    member
        .apply(&AccessPolicy {
            transmit: TxPolicy::All,
            receive: Some(vec![
                CanMatch::standard(0x300, 0x7ff),
                CanMatch::extended(0x1000, 0x1fff_ff00),
            ]),
        })
        .unwrap();

    let arrived = member.receive(&["300#01", "301#02", "00001010#03", "00002010#04", "300##1AA"]);

    assert_eq!(
        ids(&arrived),
        vec![
            (0x300, false, false),
            (0x1010, true, false),
            (0x300, false, true)
        ]
    );
    let counters = member.counters();
    assert_eq!(counters.receive_dropped, 2, "{counters:?}");
    assert_eq!(counters.receive_passed, 3, "{counters:?}");
    assert_eq!(tc_action_drops(&member.tc_filters("egress")), Some(2));
    // The pod still transmits freely.
    assert_eq!(member.transmit(&["7FF#00"]).len(), 1);
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn listen_only_puts_nothing_on_the_bus_and_counts_every_frame() {
    let mut member = Member::new();
    member.apply(&AccessPolicy::listen_only()).unwrap();

    let on_bus = Candump::start(&member.host, BUS).unwrap();
    for frame in ["123#01", "7FF#02", "1FFFFFFF#03", "123##1AA"] {
        cansend(&member.pod, POD_END, frame).unwrap();
    }
    assert_eq!(on_bus.stop().unwrap(), vec![], "nothing reached the bus");
    assert_eq!(member.counters().transmit_dropped, 4);
    // The pod still receives everything.
    assert_eq!(member.receive(&["123#01", "00000456#02"]).len(), 2);
    assert_eq!(member.read(), AccessPolicy::listen_only());
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn pod_frames_reach_the_bus_through_can_gw_only_when_allowed() {
    let mut member = Member::new();
    member
        .apply(&allow(vec![CanMatch::standard(0x10, 0x7f0)]))
        .unwrap();

    let on_bus = Candump::start(&member.host, BUS).unwrap();
    for frame in ["015#01", "025#02", "01F##1BB"] {
        cansend(&member.pod, POD_END, frame).unwrap();
    }
    let arrived = on_bus.stop().unwrap();
    assert_eq!(
        ids(&arrived),
        vec![(0x15, false, false), (0x1f, false, true)]
    );
    // can-gw never saw the refused frame: its rules from vxh handled only what passed.
    // cangw -L exits non-zero even when it lists fine, so read its output through a shell.
    let listing = member.host.exec("sh", &["-c", "cangw -L || true"]).unwrap();
    let rules: Vec<&str> = listing
        .lines()
        .filter(|line| line.starts_with("cangw "))
        .collect();
    let handled: Vec<&&str> = rules
        .iter()
        .filter(|rule| rule.contains(&format!("-s {HOST_END}")))
        .collect();
    assert!(
        handled.iter().all(|rule| rule.contains("# 1 handled")),
        "{handled:?}"
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn clear_removes_every_trace_and_frames_flow_again() {
    let mut member = Member::new();
    member
        .apply(&AccessPolicy {
            transmit: TxPolicy::Nothing,
            receive: Some(vec![CanMatch::standard(0x1, 0x7ff)]),
        })
        .unwrap();
    let kinds = |member: &Member| -> Vec<String> {
        tc_qdiscs(&member.host, HOST_END)
            .unwrap()
            .iter()
            .filter_map(|qdisc| qdisc.get("kind")?.as_str().map(str::to_string))
            .collect()
    };
    assert!(kinds(&member).contains(&"clsact".to_string()));

    access::clear(&mut member.socket, member.ifindex).unwrap();

    assert!(
        !kinds(&member).contains(&"clsact".to_string()),
        "{:?}",
        kinds(&member)
    );
    assert_eq!(member.tc_filters("ingress").trim(), "");
    assert_eq!(member.tc_filters("egress").trim(), "");
    assert_eq!(member.read(), AccessPolicy::default());
    assert_eq!(member.counters(), AccessCounters::default());
    assert_eq!(member.transmit(&["123#01", "00000456#02"]).len(), 2);
    assert_eq!(member.receive(&["321#01"]).len(), 1);
    // Clearing again is fine.
    access::clear(&mut member.socket, member.ifindex).unwrap();
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn reapplying_keeps_counters_and_a_new_list_replaces_the_old() {
    let mut member = Member::new();
    let first = AccessPolicy {
        transmit: TxPolicy::Allow(vec![
            CanMatch::standard(0x20, 0x7ff),
            CanMatch::standard(0x10, 0x7ff),
            CanMatch::standard(0x10, 0x7ff),
        ]),
        receive: Some(vec![]),
    };
    member.apply(&first).unwrap();
    assert_eq!(member.read(), first.normalized());
    member.transmit(&["010#01", "099#02"]);
    let before = member.counters();
    assert_eq!((before.transmit_passed, before.transmit_dropped), (1, 1));

    member.apply(&first).unwrap();
    assert_eq!(
        member.counters(),
        before,
        "an unchanged policy keeps its filters"
    );

    let second = allow(vec![CanMatch::extended(0x99, 0x1fff_ffff)]);
    member.apply(&second).unwrap();
    assert_eq!(member.read(), second.normalized());
    let arrived = member.transmit(&["010#01", "00000099#02"]);
    assert_eq!(ids(&arrived), vec![(0x99, true, false)]);
    assert_eq!(
        member.tc_filters("egress").trim(),
        "",
        "receive filters removed"
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn bad_input_is_refused_and_nothing_is_installed() {
    let mut member = Member::new();
    let too_many = allow(vec![CanMatch::standard(0x1, 0x7ff); MAX_ENTRIES + 1]);
    let error = member.apply(&too_many).unwrap_err();
    assert!(
        matches!(error, AccessError::TooManyEntries { count: 501, .. }),
        "{error}"
    );
    let wide = AccessPolicy {
        transmit: TxPolicy::All,
        receive: Some(vec![CanMatch::standard(0x800, 0x7ff)]),
    };
    let error = member.apply(&wide).unwrap_err();
    assert!(
        matches!(
            error,
            AccessError::InvalidEntry {
                direction: Direction::Receive,
                index: 0,
                ..
            }
        ),
        "{error}"
    );
    let qdiscs = tc_qdiscs(&member.host, HOST_END).unwrap();
    assert!(
        qdiscs
            .iter()
            .all(|qdisc| qdisc.get("kind").and_then(|kind| kind.as_str()) != Some("clsact")),
        "{qdiscs:?}"
    );
    assert_eq!(member.tc_filters("ingress").trim(), "");

    // A vanished interface is a typed error too.
    let error = access::apply(&mut member.socket, 9999, &AccessPolicy::listen_only()).unwrap_err();
    assert!(
        matches!(error, AccessError::NoDevice { ifindex: 9999, .. }),
        "{error}"
    );
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn the_longest_lists_work_and_read_back_on_a_fresh_socket() {
    let mut member = Member::new();
    let count = u32::try_from(MAX_ENTRIES).unwrap();
    let policy = AccessPolicy {
        // 500 extended ids 0x10000000..=0x100001f3.
        transmit: TxPolicy::Allow(
            (0..count)
                .map(|i| CanMatch::extended(0x1000_0000 + i, 0x1fff_ffff))
                .collect(),
        ),
        // 500 inverted entries, each its own ematch: everything but standard 0x000..=0x1f3.
        receive: Some(
            (0..count)
                .map(|i| CanMatch::standard(i, 0x7ff).inverted())
                .collect(),
        ),
    };
    member.apply(&policy).unwrap();

    // A new socket has never received anything large: the first dump must still succeed.
    let netns = Netns::from_path(member.host.path()).unwrap();
    let mut fresh = RouteSocket::open_in(&netns).unwrap();
    assert_eq!(
        access::read(&mut fresh, member.ifindex).unwrap(),
        policy.normalized()
    );
    let arrived = member.transmit(&["100001F3#01", "100001F4#02"]);
    assert_eq!(ids(&arrived), vec![(0x1000_01f3, true, false)]);
    // Each inverted entry alone matches every other id, so OR-ed they let everything through.
    assert_eq!(member.receive(&["005#01", "600#02"]).len(), 2);
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn a_failure_half_way_undoes_what_was_installed() {
    let mut member = Member::new();
    // Someone else's filter at the FD allow-list's priority with another protocol: the kernel
    // refuses ours there (EINVAL) after the Classic allow-list is already in.
    member
        .host
        .exec("tc", &["qdisc", "add", "dev", HOST_END, "clsact"])
        .unwrap();
    member
        .host
        .exec(
            "tc",
            &[
                "filter", "add", "dev", HOST_END, "ingress", "prio", "2", "protocol", "all",
                "basic", "action", "pass",
            ],
        )
        .unwrap();

    let error = member
        .apply(&allow(vec![CanMatch::standard(0x5, 0x7ff)]))
        .unwrap_err();

    assert!(
        matches!(&error, AccessError::Kernel { operation, .. } if operation.contains("FD")),
        "{error}"
    );
    let shown = member.tc_filters("ingress");
    assert!(
        !shown.contains("pref 1 "),
        "classic allow-list undone: {shown}"
    );
    assert!(!shown.contains("pref 3 "), "no drop-all left: {shown}");
    assert!(shown.contains("pref 2 "), "the other filter stays: {shown}");
    assert_eq!(member.transmit(&["006#01"]).len(), 1, "frames still flow");
}

#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn installed_lists_read_like_the_same_lists_built_by_tc() {
    let mut member = Member::new();
    member
        .apply(&allow(vec![
            CanMatch::standard(0x123, 0x7ff),
            CanMatch::extended(0x18fe_0000, 0x1fff_0000),
            CanMatch::standard(0x100, 0x700).inverted(),
        ]))
        .unwrap();
    // The same list built by iproute2 at a spare priority (after the drop-all, so inert).
    member
        .host
        .exec(
            "tc",
            &[
                "filter",
                "add",
                "dev",
                HOST_END,
                "ingress",
                "prio",
                "9",
                "protocol",
                "can",
                "basic",
                "match",
                "canid(sff 0x123 eff 0x18fe0000:0x1fff0000)",
                "or",
                "not",
                "canid(sff 0x100:0x700)",
                "action",
                "drop",
            ],
        )
        .unwrap();

    let shown = member.tc_filters("ingress");
    let ematch_lines = |pref: &str| -> Vec<String> {
        shown
            .split("filter protocol")
            .filter(|block| block.contains(&format!("pref {pref} ")) && block.contains("handle"))
            .flat_map(|block| {
                block
                    .lines()
                    .filter(|line| line.contains("canid("))
                    .map(|line| line.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let ours = ematch_lines("1");
    assert_eq!(
        ours,
        vec![
            "canid(eff 0x18FE0000:0x1FFF0000 sff 0x123)".to_string(),
            "OR NOT canid(sff 0x100:0x700)".to_string()
        ],
        "{shown}"
    );
    assert_eq!(ours, ematch_lines("9"), "{shown}");
    // A filter of someone else does not disturb reading ours back.
    assert!(matches!(member.read().transmit, TxPolicy::Allow(ref entries) if entries.len() == 3));
}

/// Sends `count` frames with id `id` (cangen syntax) from the pod as fast as possible; returns
/// frames per second.
fn blast(member: &Member, id: &str, extended: bool, count: u32) -> f64 {
    let count_text = count.to_string();
    let mut args = vec![
        POD_END,
        "-g",
        "0",
        "-I",
        id,
        "-L",
        "8",
        "-D",
        "i",
        "-n",
        &count_text,
    ];
    if extended {
        args.push("-e");
    }
    let mut command = member.pod.command("cangen");
    command.args(&args);
    let started = Instant::now();
    can_dra_testkit::run(&mut command).unwrap();
    f64::from(count) / started.elapsed().as_secs_f64()
}

/// Frames `member`'s bus has carried so far (vcan counts every frame can-gw sent to it).
fn bus_frames(member: &Member) -> u64 {
    let path = format!("/sys/class/net/{BUS}/statistics/tx_packets");
    member
        .host
        .exec("cat", &[&path])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The ways of restricting a pod to 32 identifiers that are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    NoFilter,
    TcStandard,
    TcExtended,
    /// Not 32 but the kernel's maximum, to show how the linear scan scales.
    TcExtended500,
    CanGwRules,
}

/// Not a timed assertion: prints the per-frame cost of a 32-entry allow-list against no filter
/// and against the can-gw-filter alternative (32 filtered rules instead of one). The variants
/// take turns over several rounds and the median is reported, because the machine is shared.
#[test]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
fn measure_the_cost_of_a_32_entry_allow_list() {
    const FRAMES: u32 = 20_000;
    const ROUNDS: usize = 7;
    let mut filtered = Member::new();
    // The can-gw alternative: one rule per entry from the host end to the bus, replacing the
    // single unfiltered Classic rule (every rule's filter is evaluated for every frame).
    let gateway = Member::new();
    gateway
        .host
        .exec("cangw", &["-D", "-s", HOST_END, "-d", BUS, "-e"])
        .unwrap();
    for i in 0..32u32 {
        let filter = format!("{:X}:7FF", 0x700 + i);
        gateway
            .host
            .exec(
                "cangw",
                &["-A", "-s", HOST_END, "-d", BUS, "-e", "-f", &filter],
            )
            .unwrap();
    }
    // 32 standard entries (a bitmap lookup) and 32 extended ones (a linear scan, the frame
    // matching the last entry): the frames sent are allowed, the hot path.
    let standard = allow(
        (0..32)
            .map(|i| CanMatch::standard(0x700 + i, 0x7ff))
            .collect(),
    );
    let extended = allow(
        (0..32)
            .map(|i| CanMatch::extended(0x1000_0000 + i, 0x1fff_ffff))
            .collect(),
    );
    let extended_max = allow(
        (0..MAX_ENTRIES as u32)
            .map(|i| CanMatch::extended(0x1000_0000 + i, 0x1fff_ffff))
            .collect(),
    );
    // Warm up caches and the binaries.
    blast(&filtered, "71F", false, 1_000);
    blast(&gateway, "71F", false, 1_000);

    let variants = [
        Variant::NoFilter,
        Variant::TcStandard,
        Variant::TcExtended,
        Variant::TcExtended500,
        Variant::CanGwRules,
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut lost = [0u64; 5];
    let variant_index = |variant: Variant| variants.iter().position(|v| *v == variant).unwrap_or(0);
    for round in 0..ROUNDS {
        // Each round starts with another variant, so a slow phase of the shared machine does
        // not always hit the same one.
        for offset in 0..variants.len() {
            let index = (round + offset) % variants.len();
            let variant = &variants[index];
            let samples = &mut rates[index];
            let (member, id, eff) = match variant {
                Variant::NoFilter => {
                    access::clear(&mut filtered.socket, filtered.ifindex).unwrap();
                    (&filtered, "71F", false)
                }
                Variant::TcStandard => {
                    filtered.apply(&standard).unwrap();
                    (&filtered, "71F", false)
                }
                Variant::TcExtended => {
                    filtered.apply(&extended).unwrap();
                    (&filtered, "1000001F", true)
                }
                Variant::TcExtended500 => {
                    filtered.apply(&extended_max).unwrap();
                    (&filtered, "100001F3", true)
                }
                Variant::CanGwRules => (&gateway, "71F", false),
            };
            // Frames can be lost under this flood (vxcan has no flow control and the receive
            // backlog overflows), so count what reached the bus rather than what was sent.
            let before = bus_frames(member);
            let sent_per_second = blast(member, id, eff, FRAMES);
            let delivered = bus_frames(member) - before;
            assert!(delivered > 0, "{variant:?}: allowed frames reach the bus");
            let elapsed = f64::from(FRAMES) / sent_per_second;
            samples.push(delivered as f64 / elapsed);
            lost[variant_index(*variant)] += u64::from(FRAMES) - delivered;
        }
    }

    let median = |mut samples: Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2]
    };
    // Ratios are taken within a round (paired with that round's unfiltered run), then the
    // median over rounds.
    let ratios: Vec<f64> = rates
        .iter()
        .map(|samples| {
            median(
                samples
                    .iter()
                    .zip(&rates[0])
                    .map(|(rate, open)| rate / open)
                    .collect(),
            )
        })
        .collect();
    eprintln!("pod -> vxh -> can-gw -> {BUS}, {FRAMES} frames x {ROUNDS} rounds:");
    for (((variant, samples), ratio), lost) in variants.iter().zip(&rates).zip(ratios).zip(lost) {
        let rate = median(samples.clone());
        eprintln!(
            "  {:<14} median {rate:>6.0} frames/s delivered ({:>5.1} us/frame), {ratio:.2}x of \
             no filter in the same round; {lost} frames lost",
            format!("{variant:?}"),
            1e6 / rate,
        );
    }
}
