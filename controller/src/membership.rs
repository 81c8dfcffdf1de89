//! Which nodes host members of a bus, where their tunnel endpoints are, and which UDP port each
//! bus's tunnel uses: pure functions of the cluster objects the controller watches.
//!
//! A member is one allocated device of the bus's pool ([`pool_name`]) in a ResourceClaim's
//! `status.allocation`. It sits on the node of the pods in the claim's `status.reservedFor`
//! (their `spec.nodeName`); a claim no scheduled pod reserves yet sits on the node its
//! `status.allocation.nodeSelector` selects, when that selects exactly one known node. Members on
//! nodes that do not exist (any more) are not counted: a deleted node leaves every bus.
//!
//! Each external tunnel peer (`spec.externalPeers`) is served by one node's endpoint
//! ([`serving_nodes`]): the node it names, which then has an endpoint like a node with a
//! physical attachment, or else one the controller picks and keeps.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use can_dra_cluster::canbus::CanBus;
use can_dra_cluster::naming::pool_name;
use k8s_openapi::api::core::v1::{Node, NodeSelector, NodeSelectorRequirement, Pod};
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::ResourceExt;

use can_dra_cluster::canbus::ExternalPeerStatus;

/// The lowest port the controller assigns to a bus tunnel that does not set `spec.tunnelPort`.
pub const FIRST_TUNNEL_PORT: u16 = 47000;

/// Members per node: node name to the number of member devices allocated there.
pub type Members = BTreeMap<String, u32>;

/// The cluster objects membership is computed from.
#[derive(Debug, Clone, Copy)]
pub struct ClusterView<'a> {
    /// Every ResourceClaim.
    pub claims: &'a [ResourceClaim],
    /// Every Pod (only those reserving claims matter).
    pub pods: &'a [Pod],
    /// Every Node.
    pub nodes: &'a [Node],
}

fn requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| values.iter().all(|x| x != v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), Some(bound)) = (
                value.and_then(number),
                values.first().and_then(|b| number(b)),
            ) else {
                return false;
            };
            if requirement.operator == "Gt" {
                have > bound
            } else {
                have < bound
            }
        }
        _ => false,
    }
}

/// Whether `selector` selects `node` (terms are ORed, requirements within a term ANDed; fields
/// support `metadata.name`), as the scheduler evaluates it.
pub fn selects(selector: &NodeSelector, node: &Node) -> bool {
    let labels = node.labels();
    let name = node.name_any();
    selector.node_selector_terms.iter().any(|term| {
        let expressions = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        if expressions.is_empty() && fields.is_empty() {
            return false;
        }
        expressions
            .iter()
            .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
            && fields.iter().all(|r| {
                let value = (r.key == "metadata.name").then_some(name.as_str());
                requirement_matches(r, value)
            })
    })
}

/// The nodes hosting the pods that reserve `claim`.
fn reserving_nodes(claim: &ResourceClaim, pods: &[Pod]) -> BTreeSet<String> {
    let namespace = claim.namespace().unwrap_or_default();
    let reserved = claim
        .status
        .as_ref()
        .and_then(|s| s.reserved_for.as_deref())
        .unwrap_or_default();
    reserved
        .iter()
        .filter(|r| r.resource == "pods" && r.api_group.as_deref().unwrap_or_default().is_empty())
        .filter_map(|r| {
            pods.iter().find(|pod| {
                pod.name_any() == r.name
                    && pod.namespace().unwrap_or_default() == namespace
                    && pod.metadata.uid.as_deref().is_none_or(|uid| uid == r.uid)
            })
        })
        .filter_map(|pod| pod.spec.as_ref()?.node_name.clone())
        .filter(|node| !node.is_empty())
        .collect()
}

/// Members per node of bus `bus` of driver `driver` (see the module docs).
pub fn members(bus: &str, driver: &str, view: ClusterView<'_>) -> Members {
    let pool = pool_name(bus);
    let known: BTreeSet<String> = view.nodes.iter().map(|n| n.name_any()).collect();
    let mut members = Members::new();
    for claim in view.claims {
        let Some(allocation) = claim.status.as_ref().and_then(|s| s.allocation.as_ref()) else {
            continue;
        };
        let count = allocation
            .devices
            .as_ref()
            .and_then(|d| d.results.as_deref())
            .unwrap_or_default()
            .iter()
            .filter(|r| r.driver == driver && r.pool == pool)
            .count();
        let Ok(count) = u32::try_from(count) else {
            continue;
        };
        if count == 0 {
            continue;
        }
        let mut nodes = reserving_nodes(claim, view.pods);
        if nodes.is_empty()
            && let Some(selector) = &allocation.node_selector
        {
            let selected: Vec<&Node> = view.nodes.iter().filter(|n| selects(selector, n)).collect();
            if let [node] = selected.as_slice() {
                nodes.insert(node.name_any());
            }
        }
        for node in nodes.into_iter().filter(|n| known.contains(n)) {
            *members.entry(node).or_default() += count;
        }
    }
    members
}

/// The first `InternalIP` of `node`.
pub fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_deref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// What the endpoints of a bus are, and which nodes that should have one cannot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// Node to `"<InternalIP>:<port>"` (`[v6]:port` for IPv6).
    pub endpoints: BTreeMap<String, String>,
    /// Nodes with members or physical attachments that exist but have no InternalIP.
    pub unreachable: BTreeSet<String>,
}

/// The tunnel endpoints of `bus` on port `port`: every node with members, plus the existing
/// nodes named in `spec.physical` and in `spec.externalPeers[].node`.
pub fn endpoints(bus: &CanBus, members: &Members, nodes: &[Node], port: u16) -> Endpoints {
    let wanted: BTreeSet<&str> = members
        .keys()
        .map(String::as_str)
        .chain(bus.spec.physical.iter().map(|p| p.node.as_str()))
        .chain(
            bus.spec
                .external_peers
                .iter()
                .filter_map(|p| p.node.as_deref()),
        )
        .collect();
    let mut out = Endpoints::default();
    for name in wanted {
        let Some(node) = nodes.iter().find(|n| n.name_any() == name) else {
            continue;
        };
        match internal_ip(node) {
            Some(IpAddr::V4(ip)) => {
                out.endpoints
                    .insert(name.to_owned(), format!("{ip}:{port}"));
            }
            Some(IpAddr::V6(ip)) => {
                out.endpoints
                    .insert(name.to_owned(), format!("[{ip}]:{port}"));
            }
            None => {
                out.unreachable.insert(name.to_owned());
            }
        }
    }
    out
}

/// Which node serves each external peer of a bus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Serving {
    /// The peers that have a serving node, in `spec.externalPeers` order.
    pub served: Vec<ExternalPeerStatus>,
    /// The peers no node can serve: the node they name has no endpoint, or the bus has none.
    pub unserved: Vec<String>,
}

/// The node whose endpoint serves each of `bus`'s external peers, among the nodes with an
/// endpoint (`endpoints`, see [`endpoints`]):
/// - a peer that names a node is served by it (its endpoint exists because it is named), and is
///   unserved while that node has no endpoint (it does not exist or has no InternalIP);
/// - otherwise by the node the status already gives it while that node has an endpoint, so the
///   choice does not move when nodes join; when that node leaves the bus, by the first node
///   by name that has an endpoint.
pub fn serving_nodes(bus: &CanBus, endpoints: &Endpoints) -> Serving {
    let previous = |name: &str| {
        bus.status
            .as_ref()?
            .external_peers
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.node.as_str())
    };
    let has_endpoint = |node: &&str| endpoints.endpoints.contains_key(*node);
    let mut out = Serving::default();
    for peer in &bus.spec.external_peers {
        let node = match peer.node.as_deref() {
            Some(named) => Some(named).filter(has_endpoint),
            None => previous(&peer.name)
                .filter(has_endpoint)
                .or_else(|| endpoints.endpoints.keys().next().map(String::as_str)),
        };
        match node {
            Some(node) => out.served.push(ExternalPeerStatus {
                name: peer.name.clone(),
                node: node.to_owned(),
            }),
            None => out.unserved.push(peer.name.clone()),
        }
    }
    out
}

/// Two buses ask for the same tunnel port in `spec.tunnelPort`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.tunnelPort {port} is also the tunnel port of CanBus {other}")]
pub struct PortConflict {
    /// The port.
    pub port: u16,
    /// The other bus.
    pub other: String,
}

/// The tunnel port in force for `bus`, given every bus (`all`, including `bus`) and the ports
/// this controller assigned but may not see in `all` yet (`assigned`, by bus name).
///
/// `spec.tunnelPort` wins when set (a conflict with another bus's `spec.tunnelPort` is an error;
/// the bus whose name sorts first keeps it). Otherwise the bus keeps the port in its status unless
/// another bus claims it in its spec, or holds it too and sorts first; else it gets the lowest
/// port from [`FIRST_TUNNEL_PORT`] on that no other bus uses.
pub fn tunnel_port(
    bus: &CanBus,
    all: &[CanBus],
    assigned: &BTreeMap<String, u16>,
) -> Result<u16, PortConflict> {
    let name = bus.name_any();
    let others = || all.iter().filter(|b| b.name_any() != name);
    let explicit = |b: &CanBus| b.spec.tunnel_port;
    let held = |b: &CanBus| {
        assigned
            .get(&b.name_any())
            .copied()
            .or_else(|| b.status.as_ref().and_then(|s| s.tunnel_port))
    };
    if let Some(port) = explicit(bus) {
        if let Some(other) = others().find(|b| explicit(b) == Some(port) && b.name_any() < name) {
            return Err(PortConflict {
                port,
                other: other.name_any(),
            });
        }
        return Ok(port);
    }
    // The port each other bus has in force, by name.
    let in_force: BTreeMap<String, u16> = others()
        .filter_map(|b| explicit(b).or_else(|| held(b)).map(|p| (b.name_any(), p)))
        .collect();
    if let Some(port) = held(bus) {
        let taken = in_force.iter().any(|(other, p)| {
            *p == port
                && all
                    .iter()
                    .find(|b| &b.name_any() == other)
                    .is_some_and(|b| explicit(b).is_some() || *other < name)
        });
        if !taken {
            return Ok(port);
        }
    }
    let used: BTreeSet<u16> = in_force.values().copied().collect();
    Ok((FIRST_TUNNEL_PORT..=u16::MAX)
        .find(|p| !used.contains(p))
        .unwrap_or(FIRST_TUNNEL_PORT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use can_dra_cluster::canbus::{CanBusSpec, CanBusStatus, ExternalPeer, PhysicalAttachment};
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSelectorTerm, NodeStatus, PodSpec};
    use k8s_openapi::api::resource::v1::{
        AllocationResult, DeviceAllocationResult, DeviceRequestAllocationResult,
        ResourceClaimConsumerReference, ResourceClaimSpec, ResourceClaimStatus,
    };
    use kube::api::ObjectMeta;

    const DRIVER: &str = "can.dra.dev";

    fn node(name: &str, ip: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("kubernetes.io/hostname".to_owned(), name.to_owned())].into()),
                ..ObjectMeta::default()
            },
            status: ip.map(|ip| NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: name.into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.into(),
                    },
                ]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn pod(name: &str, node: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn claim(name: &str, pool: &str, devices: &[&str], pods: &[&str]) -> ResourceClaim {
        let results = devices
            .iter()
            .map(|d| DeviceRequestAllocationResult {
                driver: DRIVER.into(),
                pool: pool.into(),
                device: (*d).into(),
                request: "bus".into(),
                ..DeviceRequestAllocationResult::default()
            })
            .collect();
        ResourceClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            spec: ResourceClaimSpec::default(),
            status: Some(ResourceClaimStatus {
                allocation: Some(AllocationResult {
                    devices: Some(DeviceAllocationResult {
                        results: Some(results),
                        config: None,
                    }),
                    ..AllocationResult::default()
                }),
                reserved_for: Some(
                    pods.iter()
                        .map(|p| ResourceClaimConsumerReference {
                            resource: "pods".into(),
                            name: (*p).into(),
                            uid: format!("uid-{p}"),
                            api_group: None,
                        })
                        .collect(),
                ),
                ..ResourceClaimStatus::default()
            }),
        }
    }

    fn bus(name: &str, spec_port: Option<u16>, status_port: Option<u16>) -> CanBus {
        let mut spec = CanBusSpec::new("500k");
        spec.tunnel_port = spec_port;
        let mut bus = CanBus::new(name, spec);
        bus.status = status_port.map(|p| CanBusStatus {
            tunnel_port: Some(p),
            ..CanBusStatus::default()
        });
        bus
    }

    #[test]
    fn members_follow_the_reserving_pods_and_skip_other_pools_and_gone_nodes() {
        let nodes = [node("a", Some("10.0.0.1")), node("b", Some("10.0.0.2"))];
        let pods = [pod("p1", "a"), pod("p2", "b"), pod("p3", "gone")];
        let claims = [
            claim("c1", "canbus/body", &["m0", "m1"], &["p1"]),
            claim("c2", "canbus/body", &["m2"], &["p2"]),
            claim("c3", "canbus/other", &["m0"], &["p2"]),
            claim("c4", "canbus/body", &["m3"], &["p3"]),
            claim("c5", "node-a", &["can0-m0"], &["p1"]),
        ];
        let view = ClusterView {
            claims: &claims,
            pods: &pods,
            nodes: &nodes,
        };
        let members = members("body", DRIVER, view);
        assert_eq!(members, Members::from([("a".into(), 2), ("b".into(), 1)]));
    }

    #[test]
    fn an_unreserved_claim_sits_on_the_one_node_its_allocation_selects() {
        let nodes = [node("a", None), node("b", None)];
        let by_name = |values: Vec<String>| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".into(),
                    operator: "In".into(),
                    values: Some(values),
                }]),
                match_expressions: None,
            }],
        };
        let mut one = claim("c1", "canbus/body", &["m0"], &[]);
        let mut both = claim("c2", "canbus/body", &["m1"], &[]);
        if let Some(a) = one.status.as_mut().and_then(|s| s.allocation.as_mut()) {
            a.node_selector = Some(by_name(vec!["b".into()]));
        }
        if let Some(a) = both.status.as_mut().and_then(|s| s.allocation.as_mut()) {
            a.node_selector = Some(by_name(vec!["a".into(), "b".into()]));
        }
        let claims = [one, both];
        let view = ClusterView {
            claims: &claims,
            pods: &[],
            nodes: &nodes,
        };
        assert_eq!(
            members("body", DRIVER, view),
            Members::from([("b".into(), 1)])
        );
    }

    #[test]
    fn endpoints_cover_member_and_physical_nodes_with_their_internal_ip() {
        let mut canbus = bus("body", None, None);
        canbus.spec.physical = vec![PhysicalAttachment {
            node: "c".into(),
            interface: "can0".into(),
        }];
        let nodes = [
            node("a", Some("10.0.0.1")),
            node("b", Some("fd00::2")),
            node("c", Some("10.0.0.3")),
            node("d", None),
        ];
        let members = Members::from([("a".into(), 1), ("b".into(), 1), ("d".into(), 1)]);
        let got = endpoints(&canbus, &members, &nodes, 47000);
        assert_eq!(
            got.endpoints,
            BTreeMap::from([
                ("a".into(), "10.0.0.1:47000".into()),
                ("b".into(), "[fd00::2]:47000".into()),
                ("c".into(), "10.0.0.3:47000".into()),
            ])
        );
        assert_eq!(got.unreachable, BTreeSet::from(["d".to_owned()]));
    }

    fn external(name: &str, node: Option<&str>) -> ExternalPeer {
        ExternalPeer {
            name: name.into(),
            address: "198.51.100.7".into(),
            port: 20000,
            node: node.map(str::to_owned),
        }
    }

    fn served(pairs: &[(&str, &str)]) -> Vec<ExternalPeerStatus> {
        pairs
            .iter()
            .map(|(name, node)| ExternalPeerStatus {
                name: (*name).into(),
                node: (*node).into(),
            })
            .collect()
    }

    #[test]
    fn a_node_named_by_an_external_peer_gets_an_endpoint_and_serves_it() {
        let mut canbus = bus("body", None, None);
        canbus.spec.external_peers = vec![external("rack", Some("c")), external("esp", Some("x"))];
        let nodes = [node("a", Some("10.0.0.1")), node("c", Some("10.0.0.3"))];
        let members = Members::from([("a".into(), 1)]);
        let got = endpoints(&canbus, &members, &nodes, 47000);
        assert_eq!(
            got.endpoints.keys().collect::<Vec<_>>(),
            ["a", "c"],
            "c has no members but serves a peer"
        );
        // "x" does not exist: its peer is not served anywhere (not silently moved to a).
        let serving = serving_nodes(&canbus, &got);
        assert_eq!(serving.served, served(&[("rack", "c")]));
        assert_eq!(serving.unserved, ["esp"]);
    }

    #[test]
    fn the_controller_picks_a_serving_node_keeps_it_and_moves_it_only_when_it_leaves() {
        let nodes = [
            node("b", Some("10.0.0.2")),
            node("c", Some("10.0.0.3")),
            node("a", Some("10.0.0.1")),
        ];
        let mut canbus = bus("body", None, None);
        canbus.spec.external_peers = vec![external("rack", None), external("esp", None)];
        let spec_only = canbus.clone();
        let on = |names: &[&str]| {
            let members: Members = names.iter().map(|n| ((*n).to_owned(), 1)).collect();
            endpoints(&spec_only, &members, &nodes, 47000)
        };
        // No node in the bus yet: nobody can serve.
        let none = serving_nodes(&canbus, &on(&[]));
        assert_eq!((none.served.len(), none.unserved.len()), (0, 2));
        // The first node by name, whatever the order of the Node list.
        let first = serving_nodes(&canbus, &on(&["c", "b"]));
        assert_eq!(first.served, served(&[("rack", "b"), ("esp", "b")]));
        assert_eq!(
            serving_nodes(&canbus, &on(&["c", "b"])),
            first,
            "deterministic"
        );
        canbus.status = Some(CanBusStatus {
            external_peers: first.served,
            ..CanBusStatus::default()
        });
        // "a" joins and sorts first: the peers stay where they are.
        let joined = serving_nodes(&canbus, &on(&["a", "b", "c"]));
        assert_eq!(joined.served, served(&[("rack", "b"), ("esp", "b")]));
        // "b" leaves: they move to the first node left.
        let left = serving_nodes(&canbus, &on(&["a", "c"]));
        assert_eq!(left.served, served(&[("rack", "a"), ("esp", "a")]));
    }

    #[test]
    fn tunnel_ports_are_explicit_or_the_lowest_free_and_stay_stable() {
        let none = BTreeMap::new();
        let a = bus("a", None, None);
        let b = bus("b", Some(47000), None);
        let c = bus("c", None, Some(47005));
        let all = [a.clone(), b.clone(), c.clone()];
        assert_eq!(tunnel_port(&b, &all, &none), Ok(47000));
        assert_eq!(tunnel_port(&a, &all, &none), Ok(47001));
        assert_eq!(tunnel_port(&c, &all, &none), Ok(47005), "kept");
        // A port this controller just assigned counts before the status shows it.
        let assigned = BTreeMap::from([("a".to_owned(), 47001)]);
        let d = bus("d", None, None);
        let all = [a, b.clone(), c, d.clone()];
        assert_eq!(tunnel_port(&d, &all, &assigned), Ok(47002));
        // An explicit port takes precedence over a held one; the holder moves.
        let e = bus("e", None, Some(47000));
        assert_eq!(tunnel_port(&e, &[b.clone(), e.clone()], &none), Ok(47001));
        // Two explicit ports clash: the first name keeps it.
        let z = bus("z", Some(47000), None);
        assert_eq!(tunnel_port(&b, &[b.clone(), z.clone()], &none), Ok(47000));
        assert_eq!(
            tunnel_port(&z, &[b, z.clone()], &none),
            Err(PortConflict {
                port: 47000,
                other: "b".into()
            })
        );
    }
}
