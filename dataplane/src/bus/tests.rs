//! Unit tests of the bus logic against the in-memory kernel.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::fake::FakeKernel;
use super::kernel::{FLAG_ECHO, FLAG_FD, FLAG_IIF_TX_OK, LinkKind};
use super::model::{Access, BusSpec, CanFilter, DesiredState, MemberShaping, MemberSpec, NetnsRef};
use super::naming::host_name;
use super::{BusError, Buses};

fn ns(name: &str) -> NetnsRef {
    NetnsRef::Path(PathBuf::from(format!("/run/netns/{name}")))
}

fn member(id: &str) -> MemberSpec {
    MemberSpec::new(id, ns(id), "can0")
}

/// A kernel with one namespace per member id.
fn kernel_with(ids: &[&str]) -> FakeKernel {
    let mut kernel = FakeKernel::new();
    for id in ids {
        kernel.add_namespace(ns(id));
    }
    kernel
}

/// The rules of a full classic mesh among `names`.
fn classic_mesh(names: &[String]) -> BTreeSet<(String, String, u16)> {
    let mut rules = BTreeSet::new();
    for a in names {
        for b in names {
            if a != b {
                rules.insert((a.clone(), b.clone(), FLAG_IIF_TX_OK));
            }
        }
    }
    rules
}

fn rule_set(kernel: &FakeKernel) -> BTreeSet<(String, String, u16)> {
    kernel.named_rules().into_iter().collect()
}

fn hosts(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|id| host_name(id)).collect()
}

#[test]
fn joining_members_builds_a_full_mesh_without_duplicates() {
    let ids = ["a", "b", "c"];
    let mut buses = Buses::new(kernel_with(&ids));
    buses.add_bus(BusSpec::new("body")).unwrap();
    for id in ids {
        buses.join("body", member(id)).unwrap();
    }
    let kernel = buses.kernel_mut();
    assert_eq!(kernel.rules.len(), 6, "{:?}", kernel.named_rules());
    assert_eq!(rule_set(kernel), classic_mesh(&hosts(&ids)));
    // Each member's interface sits in its own namespace, paired with its host end, MTU 16.
    for id in ids {
        let pod = kernel
            .pods
            .iter()
            .find(|((_, name), pod)| {
                name == "can0" && pod.peer_ifindex == Some(kernel.ifindex(&host_name(id)))
            })
            .map(|(_, pod)| pod.clone())
            .unwrap();
        assert_eq!(pod.mtu, 16);
    }
}

#[test]
fn physical_vcan_gets_echo_and_fd_rules_only_between_fd_endpoints() {
    let mut kernel = kernel_with(&["fd", "classic"]);
    kernel.add_host_link("vcan0", LinkKind::Vcan, 72);
    let mut buses = Buses::new(kernel);
    let mut bus = BusSpec::new("chassis");
    bus.fd = true;
    bus.physical = Some("vcan0".into());
    buses.add_bus(bus).unwrap();
    let mut fd = member("fd");
    fd.fd = true;
    buses.join("chassis", fd).unwrap();
    buses.join("chassis", member("classic")).unwrap();

    let [fd, classic] = [host_name("fd"), host_name("classic")];
    let rules = rule_set(buses.kernel_mut());
    let expected: BTreeSet<_> = [
        (fd.clone(), classic.clone(), FLAG_IIF_TX_OK),
        (classic.clone(), fd.clone(), FLAG_IIF_TX_OK),
        (fd.clone(), "vcan0".into(), FLAG_IIF_TX_OK | FLAG_ECHO),
        (
            fd.clone(),
            "vcan0".into(),
            FLAG_IIF_TX_OK | FLAG_ECHO | FLAG_FD,
        ),
        ("vcan0".into(), fd.clone(), FLAG_IIF_TX_OK),
        ("vcan0".into(), fd.clone(), FLAG_IIF_TX_OK | FLAG_FD),
        (classic.clone(), "vcan0".into(), FLAG_IIF_TX_OK | FLAG_ECHO),
        ("vcan0".into(), classic.clone(), FLAG_IIF_TX_OK),
    ]
    .into_iter()
    .collect();
    assert_eq!(rules, expected);
}

#[test]
fn physical_and_tunnel_are_meshed_with_each_other_and_removed_with_the_bus() {
    let mut kernel = FakeKernel::new();
    kernel.add_host_link("can0", LinkKind::Can, 16);
    kernel.add_host_link("tun0", LinkKind::Vcan, 16);
    let mut buses = Buses::new(kernel);
    let mut bus = BusSpec::new("b");
    bus.physical = Some("can0".into());
    bus.tunnel = Some("tun0".into());
    buses.add_bus(bus).unwrap();
    let expected: BTreeSet<_> = [
        (
            "can0".to_string(),
            "tun0".to_string(),
            FLAG_IIF_TX_OK | FLAG_ECHO,
        ),
        ("tun0".to_string(), "can0".to_string(), FLAG_IIF_TX_OK),
    ]
    .into_iter()
    .collect();
    assert_eq!(rule_set(buses.kernel_mut()), expected);
    buses.remove_bus("b").unwrap();
    assert!(buses.kernel_mut().rules.is_empty());
    assert!(buses.state().buses.is_empty());
}

#[test]
fn externals_set_at_run_time_join_the_members_mesh_once_and_leave_it_again() {
    let ids = ["a", "b"];
    let mut kernel = kernel_with(&ids);
    kernel.add_host_link("can0", LinkKind::Can, 16);
    kernel.add_host_link("vxtm-b", LinkKind::Vxcan, 16);
    let mut buses = Buses::new(kernel);
    buses.add_bus(BusSpec::new("b")).unwrap();
    for id in ids {
        buses.join("b", member(id)).unwrap();
    }
    let members_only = classic_mesh(&hosts(&ids));
    let mut all = hosts(&ids);
    all.push("can0".into());
    all.push("vxtm-b".into());
    let full = classic_mesh(&all);

    buses
        .set_externals("b", Some("can0".into()), Some("vxtm-b".into()))
        .unwrap();
    assert_eq!(rule_set(buses.kernel_mut()), full);
    // Again (as after a restart): nothing is duplicated.
    buses
        .set_externals("b", Some("can0".into()), Some("vxtm-b".into()))
        .unwrap();
    assert_eq!(buses.kernel_mut().rules.len(), full.len());
    // A copy a crash left behind is removed.
    let (src, dst) = (
        buses.kernel_mut().ifindex("vxtm-b"),
        buses.kernel_mut().ifindex(&host_name("a")),
    );
    buses
        .kernel_mut()
        .push_rule(src, dst, FLAG_IIF_TX_OK, false);
    buses
        .set_externals("b", Some("can0".into()), Some("vxtm-b".into()))
        .unwrap();
    assert_eq!(buses.kernel_mut().rules.len(), full.len());
    // A later member is meshed with the externals too.
    assert_eq!(
        buses.state().bus("b").and_then(|b| b.tunnel.clone()),
        Some("vxtm-b".to_string())
    );

    buses.set_externals("b", None, None).unwrap();
    assert_eq!(rule_set(buses.kernel_mut()), members_only);
    assert_eq!(buses.kernel_mut().rules.len(), members_only.len());
}

#[test]
fn externals_that_do_not_exist_change_nothing() {
    let mut buses = Buses::new(kernel_with(&["a"]));
    buses.add_bus(BusSpec::new("b")).unwrap();
    buses.join("b", member("a")).unwrap();
    let error = buses
        .set_externals("b", None, Some("vxtm-gone".into()))
        .unwrap_err();
    assert!(
        matches!(error, BusError::UnknownInterface { .. }),
        "{error}"
    );
    assert_eq!(buses.state().bus("b").and_then(|b| b.tunnel.clone()), None);
    assert!(matches!(
        buses.set_externals("nope", None, None),
        Err(BusError::UnknownBus { .. })
    ));
}

#[test]
fn leaving_removes_only_that_members_link_and_rules() {
    let ids = ["a", "b", "c", "d"];
    let mut buses = Buses::new(kernel_with(&ids));
    buses.add_bus(BusSpec::new("b")).unwrap();
    for id in ids {
        buses.join("b", member(id)).unwrap();
    }
    let c = host_name("c");
    let untouched: Vec<_> = buses
        .kernel_mut()
        .named_rules()
        .into_iter()
        .filter(|(src, dst, _)| *src != c && *dst != c)
        .collect();
    assert_eq!(untouched.len(), 6);
    buses.leave("b", "c").unwrap();
    let kernel = buses.kernel_mut();
    assert_eq!(
        kernel.named_rules(),
        untouched,
        "the others' rules, in the same order"
    );
    assert_eq!(rule_set(kernel), classic_mesh(&hosts(&["a", "b", "d"])));
    assert_eq!(kernel.ifindex(&c), 0, "host end gone");
    assert_eq!(buses.state().bus("b").unwrap().members.len(), 3);
}

#[test]
fn a_failed_join_leaves_nothing_behind() {
    let ids = ["a", "b", "c"];
    let mut buses = Buses::new(kernel_with(&ids));
    buses.add_bus(BusSpec::new("b")).unwrap();
    buses.join("b", member("a")).unwrap();
    buses.join("b", member("b")).unwrap();
    let rules_before = rule_set(buses.kernel_mut());
    let links_before = buses.kernel_mut().host.clone();
    // Joining c: create the pair (1), then rules c->a (2), a->c (3): fail the third.
    let start = buses.kernel_mut().mutations;
    buses.kernel_mut().fail_at = Some(start + 3);
    let error = buses.join("b", member("c")).unwrap_err();
    assert!(error.to_string().contains("injected"), "{error}");
    let kernel = buses.kernel_mut();
    kernel.fail_at = None;
    assert_eq!(rule_set(kernel), rules_before);
    assert_eq!(kernel.host, links_before);
    assert!(kernel.pods.len() == 2, "the pod end went with the pair");
    assert_eq!(buses.state().bus("b").unwrap().members.len(), 2);
}

#[test]
fn bad_input_is_refused_before_anything_is_created() {
    let mut kernel = kernel_with(&["a"]);
    kernel.alias_namespace(&ns("a"), NetnsRef::Pid(77));
    let mut buses = Buses::new(kernel);
    buses.add_bus(BusSpec::new("b")).unwrap();
    buses.join("b", member("a")).unwrap();
    let mutations = buses.kernel_mut().mutations;

    // The same namespace by another name, same interface name.
    let error = buses
        .join("b", MemberSpec::new("a2", NetnsRef::Pid(77), "can0"))
        .unwrap_err();
    assert!(
        matches!(error, BusError::InterfaceTaken { ref other, .. } if other.as_deref() == Some("a")),
        "{error}"
    );
    // A namespace that is gone.
    let error = buses.join("b", member("ghost")).unwrap_err();
    assert!(matches!(error, BusError::NamespaceGone { .. }), "{error}");
    assert!(error.to_string().contains("/run/netns/ghost"), "{error}");
    // A duplicate member id.
    let error = buses.join("b", member("a")).unwrap_err();
    assert!(matches!(error, BusError::DuplicateMember { .. }), "{error}");
    // A name too long.
    let error = buses
        .join("b", MemberSpec::new("x", ns("a"), "can-interface-0"))
        .map(|_| ())
        .and_then(|_| buses.join("b", MemberSpec::new("y", ns("a"), "can-interface-01")))
        .unwrap_err();
    assert!(
        matches!(error, BusError::InvalidInterfaceName { .. }),
        "{error}"
    );
    // A numbering template, which the kernel would expand instead of using: refused by the plan
    // with the link module's reason, before any link is created.
    let error = buses
        .join("b", MemberSpec::new("t", ns("a"), "can%d"))
        .unwrap_err();
    assert!(error.to_string().contains("contains '%'"), "{error}");
    // An unknown bus, and an unknown physical interface.
    assert!(matches!(
        buses.join("nope", member("z")),
        Err(BusError::UnknownBus { .. })
    ));
    let mut bus = BusSpec::new("c");
    bus.physical = Some("can7".into());
    let error = buses.add_bus(bus).unwrap_err();
    assert!(error.to_string().contains("can7"), "{error}");
    // Only the valid "x" join above changed the kernel: one pair plus its two rules.
    assert_eq!(buses.kernel_mut().mutations, mutations + 3);
}

#[test]
fn an_interface_already_in_the_pod_is_refused_and_untouched() {
    let mut kernel = kernel_with(&["a"]);
    kernel.add_pod_link(&ns("a"), "can0");
    let mut buses = Buses::new(kernel);
    buses.add_bus(BusSpec::new("b")).unwrap();
    let error = buses.join("b", member("a")).unwrap_err();
    assert!(
        matches!(error, BusError::InterfaceTaken { other: None, .. }),
        "{error}"
    );
    assert_eq!(buses.kernel_mut().pods.len(), 1);
    assert_eq!(buses.kernel_mut().host.len(), 1, "only lo");
}

#[test]
fn a_missing_can_gw_module_is_named_and_undone() {
    let mut kernel = kernel_with(&["a", "b"]);
    kernel.gateway_missing = true;
    let mut buses = Buses::new(kernel);
    buses.add_bus(BusSpec::new("b")).unwrap();
    buses.join("b", member("a")).unwrap();
    let error = buses.join("b", member("b")).unwrap_err();
    assert!(
        matches!(
            error,
            BusError::ModuleMissing {
                module: "can-gw",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("modprobe can-gw"), "{error}");
    assert_eq!(buses.kernel_mut().ifindex(&host_name("b")), 0);
}

#[test]
fn listen_only_members_send_nothing_and_get_the_access_policy() {
    let ids = ["talker", "listener", "filtered"];
    let mut buses = Buses::new(kernel_with(&ids));
    buses.add_bus(BusSpec::new("b")).unwrap();
    buses.join("b", member("talker")).unwrap();
    let mut listener = member("listener");
    listener.access = Access::ListenOnly;
    buses.join("b", listener).unwrap();
    let mut filtered = member("filtered");
    let filter = CanFilter {
        id: 0x100,
        mask: 0x700,
        extended: false,
        invert: false,
    };
    filtered.transmit_allow.push(filter);
    filtered.receive_filters.push(filter);
    buses.join("b", filtered).unwrap();

    let kernel = buses.kernel_mut();
    let listener = host_name("listener");
    assert!(
        kernel
            .named_rules()
            .iter()
            .all(|(src, _, _)| *src != listener)
    );
    // talker <-> filtered (2), talker -> listener, filtered -> listener.
    assert_eq!(kernel.rules.len(), 4);
    assert!(kernel.access[&listener].listen_only);
    let policy = &kernel.access[&host_name("filtered")];
    assert_eq!(policy.transmit_allow, vec![filter]);
    assert_eq!(policy.receive_filters, vec![filter]);
    assert!(!kernel.access.contains_key(&host_name("talker")));
}

#[test]
fn shaping_goes_on_the_host_end_for_rx_and_the_pod_end_for_tx() {
    let mut buses = Buses::new(kernel_with(&["a"]));
    buses.add_bus(BusSpec::new("b")).unwrap();
    let mut a = member("a");
    let rx = MemberShaping {
        bitrate: Some(125_000),
        ..MemberShaping::default()
    };
    let tx = MemberShaping {
        delay_us: 2000,
        ..MemberShaping::default()
    };
    a.rx_shaping = Some(rx);
    a.tx_shaping = Some(tx);
    buses.join("b", a).unwrap();
    let kernel = buses.kernel_mut();
    assert_eq!(kernel.shaping[&format!("host:{}", host_name("a"))], rx);
    assert_eq!(
        kernel
            .shaping
            .iter()
            .filter(|(key, _)| key.starts_with("pod:"))
            .map(|(_, shaping)| *shaping)
            .collect::<Vec<_>>(),
        vec![tx]
    );
}

fn desired(ids: &[&str], physical: Option<&str>) -> DesiredState {
    let mut bus = BusSpec::new("body");
    bus.physical = physical.map(str::to_string);
    bus.members = ids.iter().map(|id| member(id)).collect();
    DesiredState { buses: vec![bus] }
}

#[test]
fn reconcile_builds_everything_and_a_second_run_changes_nothing() {
    let ids = ["a", "b", "c"];
    let mut kernel = kernel_with(&ids);
    kernel.add_host_link("can0", LinkKind::Can, 16);
    let mut buses = Buses::new(kernel);
    let report = buses.reconcile(desired(&ids, Some("can0"))).unwrap();
    assert_eq!(report.links_created.len(), 3);
    assert_eq!(report.rules_added, 12, "4 endpoints, 4 * 3 classic rules");
    let mutations = buses.kernel_mut().mutations;
    let rules = buses.kernel_mut().rules.clone();

    let again = buses.reconcile(desired(&ids, Some("can0"))).unwrap();
    assert!(again.is_noop(), "{again:?}");
    assert_eq!(buses.kernel_mut().mutations, mutations);
    assert_eq!(buses.kernel_mut().rules, rules);
}

#[test]
fn reconcile_after_a_crash_repairs_and_never_doubles() {
    let ids = ["a", "b", "c"];
    let mut buses = Buses::new(kernel_with(&ids));
    buses.reconcile(desired(&ids, None)).unwrap();
    let expected = rule_set(buses.kernel_mut());
    // The process dies: keep the kernel, drop the manager.
    let mut kernel = std::mem::replace(buses.kernel_mut(), FakeKernel::new());
    drop(buses);
    let [a, b, c] = [host_name("a"), host_name("b"), host_name("c")].map(|n| kernel.ifindex(&n));
    // By hand: one rule deleted, one duplicated, an orphan rule with a filter, a stray rule
    // with stale flags, and an orphan link with our prefix.
    let position = kernel
        .rules
        .iter()
        .position(|rule| rule.src == a && rule.dst == b)
        .unwrap();
    kernel.rules.remove(position);
    kernel.push_rule(b, c, FLAG_IIF_TX_OK, false);
    kernel.push_rule(c, a, FLAG_IIF_TX_OK, true);
    kernel.push_rule(c, b, 0, false);
    let orphan = kernel.add_host_link(&host_name("gone"), LinkKind::Vxcan, 16);
    kernel.push_rule(orphan, a, FLAG_IIF_TX_OK, false);
    // A foreign rule between foreign interfaces stays.
    let x = kernel.add_host_link("vcanx", LinkKind::Vcan, 16);
    let y = kernel.add_host_link("vcany", LinkKind::Vcan, 16);
    kernel.push_rule(x, y, 0, false);

    let mut restarted = Buses::new(kernel);
    let report = restarted.reconcile(desired(&ids, None)).unwrap();
    assert_eq!(report.rules_added, 1, "{report:?}");
    assert_eq!(report.links_deleted, vec![host_name("gone")]);
    // Duplicate, filtered and stale-flag rules; the orphan's rule went with its link.
    assert_eq!(report.rules_deleted, 3, "{report:?}");
    let kernel = restarted.kernel_mut();
    let mut with_foreign = expected.clone();
    with_foreign.insert(("vcanx".into(), "vcany".into(), 0));
    assert_eq!(rule_set(kernel), with_foreign);
    assert_eq!(kernel.rules.len(), 7, "no rule twice");
    assert!(restarted.reconcile(desired(&ids, None)).unwrap().is_noop());
}

#[test]
fn reconcile_skips_members_whose_namespace_is_gone_and_removes_their_links() {
    let ids = ["a", "b", "c"];
    let mut buses = Buses::new(kernel_with(&ids));
    buses.reconcile(desired(&ids, None)).unwrap();
    // The namespace of c dies while the driver is down... and a new a-namespace link broke.
    let kernel = buses.kernel_mut();
    kernel.remove_namespace(&ns("c"));
    assert_eq!(
        kernel.rules.len(),
        2,
        "the kernel dropped c's rules with its link"
    );
    let report = buses.reconcile(desired(&ids, None)).unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].member, "c");
    assert!(report.is_noop(), "{report:?}");
    assert_eq!(
        rule_set(buses.kernel_mut()),
        classic_mesh(&hosts(&["a", "b"]))
    );
}

#[test]
fn reconcile_recreates_a_pair_whose_pod_end_no_longer_matches() {
    let ids = ["a", "b"];
    let mut buses = Buses::new(kernel_with(&ids));
    buses.reconcile(desired(&ids, None)).unwrap();
    let kernel = buses.kernel_mut();
    for pod in kernel.pods.values_mut() {
        if pod.peer_ifindex == Some(kernel.host[1].ifindex) {
            pod.mtu = 72;
        }
    }
    let report = buses.reconcile(desired(&ids, None)).unwrap();
    assert_eq!(report.links_deleted.len(), 1, "{report:?}");
    assert_eq!(report.links_created, report.links_deleted);
    assert_eq!(rule_set(buses.kernel_mut()), classic_mesh(&hosts(&ids)));
    assert!(buses.kernel_mut().pods.values().all(|pod| pod.mtu == 16));
}

#[test]
fn reconcile_applies_changed_shaping_and_access_and_clears_removed_ones() {
    let ids = ["a", "b"];
    let mut buses = Buses::new(kernel_with(&ids));
    let mut state = desired(&ids, None);
    state.buses[0].members[0].rx_shaping = Some(MemberShaping {
        loss_ppm: 10_000,
        ..MemberShaping::default()
    });
    buses.reconcile(state.clone()).unwrap();
    assert_eq!(buses.kernel_mut().shaping.len(), 1);

    state.buses[0].members[0].rx_shaping = None;
    state.buses[0].members[1].access = Access::ListenOnly;
    let report = buses.reconcile(state.clone()).unwrap();
    assert_eq!(
        report.members_configured,
        vec!["a".to_string(), "b".to_string()]
    );
    // b is listen-only now: its rule to a was removed.
    assert_eq!(report.rules_deleted, 1);
    let kernel = buses.kernel_mut();
    assert!(kernel.shaping.is_empty());
    assert!(kernel.access[&host_name("b")].listen_only);
    assert!(buses.reconcile(state).unwrap().is_noop());
}

#[test]
fn reconcile_with_bad_input_changes_nothing() {
    let mut kernel = kernel_with(&["a", "b"]);
    kernel.alias_namespace(&ns("a"), NetnsRef::Pid(9));
    let mut buses = Buses::new(kernel);
    let mut state = desired(&["a"], None);
    state.buses[0]
        .members
        .push(MemberSpec::new("b", NetnsRef::Pid(9), "can0"));
    let error = buses.reconcile(state).unwrap_err();
    assert!(matches!(error, BusError::InterfaceTaken { .. }), "{error}");
    let error = buses.reconcile(desired(&["a"], Some("can9"))).unwrap_err();
    assert!(
        matches!(error, BusError::UnknownInterface { .. }),
        "{error}"
    );
    assert_eq!(buses.kernel_mut().mutations, 0);
}

#[test]
fn removing_a_bus_leaves_the_kernel_as_it_was() {
    let ids = ["a", "b", "c"];
    let mut kernel = kernel_with(&ids);
    kernel.add_host_link("vcan0", LinkKind::Vcan, 16);
    let links_before = kernel.host.clone();
    let mut buses = Buses::new(kernel);
    let mut bus = BusSpec::new("b");
    bus.physical = Some("vcan0".into());
    bus.members = ids.iter().map(|id| member(id)).collect();
    bus.members[0].access = Access::ListenOnly;
    bus.members[1].rx_shaping = Some(MemberShaping {
        delay_us: 5,
        ..MemberShaping::default()
    });
    buses.add_bus(bus).unwrap();
    assert_eq!(buses.kernel_mut().rules.len(), 9);
    buses.remove_bus("b").unwrap();
    let kernel = buses.kernel_mut();
    assert_eq!(kernel.host, links_before);
    assert!(kernel.rules.is_empty());
    assert!(kernel.pods.is_empty());
    assert!(kernel.shaping.is_empty());
    assert!(kernel.access.is_empty());
}

#[test]
fn counters_sum_the_members_rules() {
    let ids = ["a", "b", "c"];
    let mut buses = Buses::new(kernel_with(&ids));
    buses.reconcile(desired(&ids, None)).unwrap();
    let kernel = buses.kernel_mut();
    let a = kernel.ifindex(&host_name("a"));
    for rule in &mut kernel.rules {
        if rule.src == a {
            rule.handled = 10;
        } else if rule.dst == a {
            rule.handled = 3;
            rule.dropped = 1;
        } else {
            rule.handled = 1000;
        }
    }
    let counters = buses.counters("body", "a").unwrap();
    assert_eq!(counters.forwarded_from, 20);
    assert_eq!(counters.forwarded_to, 6);
    assert_eq!(counters.gateway_dropped, 2);
    assert!(matches!(
        buses.counters("body", "zz"),
        Err(BusError::UnknownMember { .. })
    ));
}
