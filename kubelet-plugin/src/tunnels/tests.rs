//! Unit tests of the tunnel plan and manager, with the operating system replaced by a double
//! that records links, mesh membership and endpoints.

use std::sync::{Arc, Mutex};

use can_dra_cluster::canbus::{CanBusSpec, PhysicalAttachment};

use can_dra_dataplane::bus::naming::{MESH_PREFIX, TUNNEL_PREFIX};

use super::*;

const NODE: &str = "n1";

fn address() -> IpAddr {
    "192.0.2.1".parse().unwrap()
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn bus(name: &str, port: Option<u16>, endpoints: &[(&str, &str)]) -> SharedBus {
    SharedBus {
        name: name.into(),
        spec: CanBusSpec::new("500k"),
        tunnel_port: port,
        endpoints: endpoints
            .iter()
            .map(|(n, e)| ((*n).to_owned(), (*e).to_owned()))
            .collect(),
        external_peers: Vec::new(),
    }
}

fn three_nodes() -> SharedBus {
    bus(
        "body",
        Some(47000),
        &[
            ("n1", "192.0.2.1:47000"),
            ("n2", "192.0.2.2:47000"),
            ("n3", "192.0.2.3:47000"),
        ],
    )
}

fn plan_of(buses: &[SharedBus]) -> BTreeMap<String, TunnelPlan> {
    let (plans, problems) = plan(NODE, address(), buses, &BTreeSet::new());
    assert!(problems.is_empty(), "{problems:?}");
    plans
}

#[test]
fn a_node_in_the_status_listens_on_its_address_and_peers_with_the_others() {
    let plans = plan_of(&[
        three_nodes(),
        bus("other", Some(47001), &[("n2", "192.0.2.2:47001")]),
    ]);
    assert_eq!(plans.keys().collect::<Vec<_>>(), ["body"]);
    let body = &plans["body"];
    assert_eq!(body.listen, addr("192.0.2.1:47000"));
    assert_eq!(
        body.peers,
        [addr("192.0.2.2:47000"), addr("192.0.2.3:47000")]
    );
    assert_eq!(body.mesh, "canbus/body");
    assert_eq!(
        (body.mesh_link.as_str(), body.tunnel_link.as_str()),
        ("vxtm-body", "vxtt-body")
    );
    assert!(!body.fd);
    assert_eq!(body.physical, None);
}

#[test]
fn local_members_or_a_physical_attachment_make_the_node_take_part() {
    let lonely = bus("lonely", Some(47002), &[("n2", "192.0.2.2:47002")]);
    let local = BTreeSet::from(["canbus/lonely".to_string()]);
    let (plans, _) = plan(NODE, address(), std::slice::from_ref(&lonely), &local);
    assert_eq!(plans["lonely"].peers, [addr("192.0.2.2:47002")]);

    let mut wired = bus("wired", Some(47003), &[]);
    wired.spec.fd = true;
    wired.spec.physical = vec![
        PhysicalAttachment {
            node: "n1".into(),
            interface: "can0".into(),
        },
        PhysicalAttachment {
            node: "n1".into(),
            interface: "can1".into(),
        },
    ];
    let (plans, problems) = plan(NODE, address(), &[wired], &BTreeSet::new());
    assert_eq!(plans["wired"].physical.as_deref(), Some("can0"));
    assert!(plans["wired"].fd);
    assert!(plans["wired"].peers.is_empty());
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("can1"), "{problems:?}");
}

#[test]
fn problems_name_the_bus_and_leave_the_rest_of_the_plan() {
    let no_port = bus("early", None, &[("n1", "192.0.2.1:1")]);
    let bad_peer = bus(
        "typo",
        Some(47004),
        &[
            ("n1", "192.0.2.1:47004"),
            ("n2", "not-an-address"),
            ("n3", "192.0.2.3:47004"),
        ],
    );
    let (plans, problems) = plan(NODE, address(), &[no_port, bad_peer], &BTreeSet::new());
    assert_eq!(plans.keys().collect::<Vec<_>>(), ["typo"]);
    assert_eq!(plans["typo"].peers, [addr("192.0.2.3:47004")]);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("early") && problems[0].contains("tunnelPort"));
    assert!(problems[1].contains("typo") && problems[1].contains("n2"));
}

#[test]
fn long_bus_names_are_hashed_into_fifteen_bytes_and_stay_distinct() {
    let (a, ta) = tunnel_link_names("powertrain-front-left");
    let (b, _) = tunnel_link_names("powertrain-front-right");
    assert_eq!(a.len(), 15);
    assert_eq!(ta.len(), 15);
    assert_ne!(a, b);
    assert_eq!(tunnel_link_names("powertrain-front-left").0, a);
    assert!(is_tunnel_link(&a) && is_tunnel_link(&ta));
    assert!(!is_tunnel_link("cdra0123456789a"));
    assert_eq!(tunnel_link_names("ten-chars!").0, "vxtm-ten-chars!");
}

/// What the double observed.
#[derive(Debug, Default)]
struct HostLog {
    links: BTreeSet<String>,
    /// mesh name -> tunnel link joined to it
    meshes: BTreeMap<String, String>,
    events: Vec<String>,
    fail_attach: BTreeSet<String>,
}

#[derive(Debug, Clone, Default)]
struct HostDouble(Arc<Mutex<HostLog>>);

#[derive(Debug, Clone)]
struct EndpointDouble {
    bus: String,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    external: Arc<Mutex<Vec<SocketAddr>>>,
    log: Arc<Mutex<HostLog>>,
}

impl TunnelEndpoint for EndpointDouble {
    fn set_peers(&self, peers: &[(SocketAddr, PeerClass)]) {
        let of = |class| {
            peers
                .iter()
                .filter(|(_, c)| *c == class)
                .map(|(addr, _)| *addr)
                .collect()
        };
        *self.peers.lock().unwrap() = of(PeerClass::Node);
        *self.external.lock().unwrap() = of(PeerClass::External);
    }

    fn counters(&self) -> CountersSnapshot {
        CountersSnapshot::default()
    }

    async fn shutdown(self) -> Result<(), String> {
        self.log
            .lock()
            .unwrap()
            .events
            .push(format!("stop {}", self.bus));
        Ok(())
    }
}

impl HostDouble {
    fn log(&self) -> std::sync::MutexGuard<'_, HostLog> {
        self.0.lock().unwrap()
    }
}

impl TunnelHost for HostDouble {
    type Endpoint = EndpointDouble;

    async fn links(&mut self) -> Result<Vec<String>, String> {
        Ok(self.log().links.iter().cloned().collect())
    }

    async fn delete_link(&mut self, name: &str) -> Result<(), String> {
        let mut log = self.log();
        // A pair goes as a whole.
        let other = name
            .strip_prefix(MESH_PREFIX)
            .map(|rest| format!("{TUNNEL_PREFIX}{rest}"))
            .or_else(|| {
                name.strip_prefix(TUNNEL_PREFIX)
                    .map(|r| format!("{MESH_PREFIX}{r}"))
            });
        log.links.remove(name);
        if let Some(other) = other {
            log.links.remove(&other);
        }
        log.events.push(format!("delete {name}"));
        Ok(())
    }

    async fn attach(&mut self, plan: &TunnelPlan) -> Result<(), String> {
        let mut log = self.log();
        log.links.insert(plan.mesh_link.clone());
        log.links.insert(plan.tunnel_link.clone());
        if log.fail_attach.contains(&plan.bus) {
            return Err(format!("{}: no such interface", plan.bus));
        }
        log.meshes.insert(plan.mesh.clone(), plan.mesh_link.clone());
        log.events.push(format!("attach {}", plan.bus));
        Ok(())
    }

    async fn detach(&mut self, plan: &TunnelPlan) -> Result<(), String> {
        let mut log = self.log();
        log.meshes.remove(&plan.mesh);
        log.links.remove(&plan.mesh_link);
        log.links.remove(&plan.tunnel_link);
        log.events.push(format!("detach {}", plan.bus));
        Ok(())
    }

    async fn start(&mut self, plan: &TunnelPlan) -> Result<EndpointDouble, String> {
        self.log()
            .events
            .push(format!("start {} on {}", plan.bus, plan.listen));
        Ok(EndpointDouble {
            bus: plan.bus.clone(),
            peers: Arc::default(),
            external: Arc::default(),
            log: Arc::clone(&self.0),
        })
    }
}

fn peers_of(tunnels: &Tunnels<HostDouble>, bus: &str) -> Vec<SocketAddr> {
    tunnels.running[bus].endpoint.peers.lock().unwrap().clone()
}

#[tokio::test]
async fn endpoints_start_follow_peer_changes_and_stop_when_the_node_leaves() {
    let host = HostDouble::default();
    let mut tunnels = Tunnels::new(host.clone());

    let report = tunnels.apply(&plan_of(&[three_nodes()])).await;
    assert_eq!(report.started, ["body"]);
    assert_eq!(
        peers_of(&tunnels, "body"),
        [addr("192.0.2.2:47000"), addr("192.0.2.3:47000")]
    );
    assert_eq!(host.log().meshes["canbus/body"], "vxtm-body");

    // Same status again: nothing happens.
    assert!(tunnels.apply(&plan_of(&[three_nodes()])).await.is_quiet());

    // n3 leaves: only the peer set changes, the endpoint keeps running.
    let two = bus(
        "body",
        Some(47000),
        &[("n1", "192.0.2.1:47000"), ("n2", "192.0.2.2:47000")],
    );
    let report = tunnels.apply(&plan_of(&[two])).await;
    assert_eq!(report.repeered, ["body"]);
    assert!(report.started.is_empty() && report.stopped.is_empty());
    assert_eq!(peers_of(&tunnels, "body"), [addr("192.0.2.2:47000")]);

    // This node leaves: endpoint stopped, links and mesh membership gone.
    let gone = bus("body", Some(47000), &[("n2", "192.0.2.2:47000")]);
    let report = tunnels.apply(&plan_of(&[gone])).await;
    assert_eq!(report.stopped, ["body"]);
    assert!(tunnels.running().is_empty());
    let log = host.log();
    assert!(log.links.is_empty(), "{:?}", log.links);
    assert!(log.meshes.is_empty());
    assert_eq!(
        log.events,
        [
            "attach body",
            "start body on 192.0.2.1:47000",
            "stop body",
            "detach body"
        ]
    );
}

#[tokio::test]
async fn a_new_port_restarts_the_endpoint() {
    let host = HostDouble::default();
    let mut tunnels = Tunnels::new(host.clone());
    tunnels.apply(&plan_of(&[three_nodes()])).await;
    let mut moved = three_nodes();
    moved.tunnel_port = Some(47100);
    let report = tunnels.apply(&plan_of(&[moved])).await;
    assert_eq!(report.stopped, ["body"]);
    assert_eq!(report.started, ["body"]);
    assert_eq!(
        tunnels.plan_of("body").map(|p| p.listen.port()),
        Some(47100)
    );
    assert!(
        host.log()
            .events
            .contains(&"start body on 192.0.2.1:47100".to_string())
    );
}

#[tokio::test]
async fn leftovers_of_a_crash_are_deleted_and_wanted_links_kept() {
    let host = HostDouble::default();
    {
        let mut log = host.log();
        for link in ["vxtm-old", "vxtt-old", "vxtm-body", "vxtt-body", "eth0"] {
            log.links.insert(link.into());
        }
    }
    let mut tunnels = Tunnels::new(host.clone());
    let report = tunnels.apply(&plan_of(&[three_nodes()])).await;
    assert_eq!(report.started, ["body"]);
    assert!(report.links_deleted.contains(&"vxtm-old".to_string()));
    let log = host.log();
    assert!(!log.links.contains("vxtm-old") && !log.links.contains("vxtt-old"));
    assert!(log.links.contains("vxtm-body") && log.links.contains("vxtt-body"));
    assert!(
        log.links.contains("eth0"),
        "a link that is not a tunnel link was deleted"
    );
    assert!(
        !report
            .links_deleted
            .iter()
            .any(|l| l == "vxtm-body" || l == "vxtt-body")
    );
}

#[tokio::test]
async fn a_bus_that_fails_is_cleaned_up_and_retried_while_others_run() {
    let host = HostDouble::default();
    host.log().fail_attach.insert("body".into());
    let mut tunnels = Tunnels::new(host.clone());
    let other = bus("chassis", Some(47001), &[("n1", "192.0.2.1:47001")]);
    let wanted = plan_of(&[three_nodes(), other]);
    let report = tunnels.apply(&wanted).await;
    assert_eq!(report.started, ["chassis"]);
    assert_eq!(report.failed.len(), 1);
    assert!(report.failed[0].1.contains("body"), "{:?}", report.failed);
    assert!(
        !host.log().links.contains("vxtm-body"),
        "half-built pair left"
    );

    host.log().fail_attach.clear();
    let report = tunnels.apply(&wanted).await;
    assert_eq!(report.started, ["body"]);
    assert_eq!(tunnels.running(), ["body", "chassis"]);
}

#[tokio::test]
async fn stopping_endpoints_keeps_links_for_the_next_daemon() {
    let host = HostDouble::default();
    let mut tunnels = Tunnels::new(host.clone());
    tunnels.apply(&plan_of(&[three_nodes()])).await;
    tunnels.stop_endpoints().await;
    assert!(tunnels.running().is_empty());
    let log = host.log();
    assert!(log.links.contains("vxtm-body"));
    assert_eq!(log.events.last().map(String::as_str), Some("stop body"));
}

/// `three_nodes` with an external peer `rack`, served by `serving`.
fn with_rack(serving: &str) -> SharedBus {
    let mut bus = three_nodes();
    bus.spec.external_peers = vec![can_dra_cluster::canbus::ExternalPeer {
        name: "rack".into(),
        address: "198.51.100.7".into(),
        port: 20000,
        node: None,
    }];
    bus.external_peers = vec![can_dra_cluster::canbus::ExternalPeerStatus {
        name: "rack".into(),
        node: serving.into(),
    }];
    bus
}

#[tokio::test]
async fn the_serving_node_adds_the_external_peer_and_follows_it_without_a_restart() {
    let rack = addr("198.51.100.7:20000");
    // Another node serves it: this one does not talk to it at all.
    assert!(plan_of(&[with_rack("n2")])["body"].external.is_empty());

    let host = HostDouble::default();
    let mut tunnels = Tunnels::new(host.clone());
    let report = tunnels.apply(&plan_of(&[with_rack(NODE)])).await;
    assert_eq!(report.started, ["body"]);
    let running = &tunnels.running["body"].endpoint;
    assert_eq!(*running.external.lock().unwrap(), [rack]);
    assert_eq!(
        peers_of(&tunnels, "body"),
        [addr("192.0.2.2:47000"), addr("192.0.2.3:47000")]
    );

    // The peer moves to n2: the endpoint keeps running with only its node peers.
    let report = tunnels.apply(&plan_of(&[with_rack("n2")])).await;
    assert_eq!(
        (report.repeered, report.started),
        (vec!["body".to_owned()], vec![])
    );
    assert!(
        tunnels.running["body"]
            .endpoint
            .external
            .lock()
            .unwrap()
            .is_empty()
    );
    assert!(!host.log().events.iter().any(|e| e == "stop body"));
}

#[test]
fn a_node_that_only_serves_an_external_peer_takes_part() {
    let mut bus = with_rack(NODE);
    bus.endpoints.remove(NODE);
    let plans = plan_of(&[bus]);
    assert_eq!(plans["body"].external, [addr("198.51.100.7:20000")]);
    assert_eq!(plans["body"].classified_peers().len(), 3);
}
