//! The `CanBus` custom resource: a cluster-wide virtual CAN bus whose members may sit on different
//! nodes (joined by node-to-node tunnels) and which may include physical CAN controllers.
//!
//! The CRD schema (derived from these types) rejects wrong types and out-of-range member counts;
//! [`CanBusSpec::validate`] checks what a structural schema cannot: bitrate syntax and range, the
//! FD-only data bitrate, the single node-selector term a ResourceSlice allows, the physical
//! attachments and the external tunnel peers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use can_dra_api::{Bitrate, InterfaceName};
use k8s_openapi::api::core::v1::NodeSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the project's own types.
pub const GROUP: &str = "can.dra.dev";
/// The version of [`CanBus`].
pub const VERSION: &str = "v1alpha1";
/// The most members a bus may have (and so the most member slots in its pool).
pub const MAX_MEMBERS: u32 = 128;
/// The member count of a bus that does not say.
pub const DEFAULT_MAX_MEMBERS: u32 = 16;

/// The longest bus name: the name becomes the `bus` string attribute of the bus's devices, and
/// kube-apiserver refuses string attributes of more than 64 bytes
/// (`pkg/apis/resource/validation/validation.go`, `DeviceAttributeMaxValueLength`).
pub const MAX_NAME_BYTES: usize = 64;

/// The message of the CRD rule that refuses longer names (and of the controller's check).
pub const NAME_TOO_LONG: &str =
    "CanBus names are at most 64 bytes: the name becomes the `bus` attribute of its devices";

/// The lowest tunnel port a bus may ask for (below are the privileged ports).
pub const MIN_TUNNEL_PORT: u16 = 1024;

/// The most external peers a bus may list.
pub const MAX_EXTERNAL_PEERS: usize = 32;

/// The message of the CRD rule that refuses an external peer address that is not an IP address.
pub const EXTERNAL_ADDRESS_NOT_IP: &str =
    "externalPeers[].address must be an IPv4 or IPv6 address (host names are not resolved)";

/// The slowest nominal bitrate accepted, 1 kbit/s.
const MIN_NOMINAL_BPS: u32 = 1_000;
/// The fastest classic (nominal) CAN bitrate, 1 Mbit/s.
const MAX_NOMINAL_BPS: u32 = 1_000_000;
/// The fastest CAN FD data-phase bitrate accepted, 16 Mbit/s.
const MAX_DATA_BPS: u32 = 16_000_000;

/// A virtual CAN bus that pods on any matching node can join through a ResourceClaim.
// The doc line above becomes the CRD's description of `spec`, hence no example here (see
// [`CanBusSpec::new`]).
// The root rule: names are DNS subdomains (ASCII), so CEL's `size` (code points) counts bytes.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[kube(
    validation = kube::core::Rule::new("size(self.metadata.name) <= 64").message(NAME_TOO_LONG),
    group = "can.dra.dev",
    version = "v1alpha1",
    kind = "CanBus",
    plural = "canbuses",
    shortname = "cb",
    status = "CanBusStatus",
    derive = "PartialEq",
    doc = "A virtual CAN bus spanning nodes, published as DRA member slots.",
    printcolumn(name = "Bitrate", type_ = "string", json_path = ".spec.bitrate"),
    printcolumn(name = "FD", type_ = "boolean", json_path = ".spec.fd"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxMembers")
)]
#[serde(rename_all = "camelCase")]
pub struct CanBusSpec {
    /// Nominal bitrate of the bus, such as `500k`, `1M` or `125000`.
    #[schemars(length(min = 1, max = 32))]
    pub bitrate: String,
    /// Whether the bus carries CAN FD frames.
    #[serde(default)]
    pub fd: bool,
    /// FD data-phase bitrate (only with `fd`); the nominal bitrate when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub data_bitrate: Option<String>,
    /// How many pods may join the bus at once (member slots published).
    #[serde(default = "default_max_members")]
    #[schemars(range(min = 1, max = 128))]
    pub max_members: u32,
    /// The nodes the bus is offered on (exactly one term); all nodes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
    /// Physical CAN controllers that are part of the bus.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub physical: Vec<PhysicalAttachment>,
    /// The UDP port of the bus's node-to-node tunnel (1024-65535); the controller assigns one
    /// from 47000 on when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub tunnel_port: Option<u16>,
    /// Tunnel peers that are not can-dra nodes, such as a cannelloni on a HIL rack. One node's
    /// endpoint serves each and relays between it and the rest of the bus.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub external_peers: Vec<ExternalPeer>,
}

/// A tunnel peer outside the cluster that speaks cannelloni's UDP format.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPeer {
    /// A name for the peer, unique in the list (a DNS label).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The peer's IPv4 or IPv6 address (not a host name).
    #[schemars(length(min = 2, max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message(EXTERNAL_ADDRESS_NOT_IP))]
    pub address: String,
    /// The UDP port the peer listens on (cannelloni's `-l`, 20000 by default).
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// The node whose tunnel endpoint serves the peer (the address the peer sends to); the
    /// controller picks one of the bus's nodes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node: Option<String>,
}

/// Which node's endpoint serves an external peer, as the controller decided.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPeerStatus {
    /// The peer's name in `spec.externalPeers`.
    pub name: String,
    /// The node serving it; point the peer at this node's address and `status.tunnelPort`.
    pub node: String,
}

fn default_max_members() -> u32 {
    DEFAULT_MAX_MEMBERS
}

/// A physical CAN controller bridged into the bus.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhysicalAttachment {
    /// The node the controller is plugged into.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    /// The controller's interface name on that node, such as `can0`.
    #[schemars(length(min = 1, max = 15))]
    pub interface: String,
}

/// What the controller observed about a bus.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanBusStatus {
    /// Members per node: node name to the number of member devices allocated there (claims
    /// reserved by pods on that node, or whose allocation selects it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, u32>,
    /// Tunnel endpoint per node (`host:port`), where the other nodes send the bus's frames.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, String>,
    /// The UDP port of the bus's tunnel in force: `spec.tunnelPort`, or the one assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u16>,
    /// The node serving each external peer that has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_peers: Vec<ExternalPeerStatus>,
    /// Conditions such as `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A `CanBus` spec that the schema accepted but the driver cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {reason}")]
pub struct SpecError {
    /// The offending field, as a JSON path below `spec` (e.g. `physical[1].interface`).
    pub field: String,
    /// Why it is refused.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn parse_rate(field: &str, input: &str, max_bps: u32) -> Result<Bitrate, SpecError> {
    let rate: Bitrate = input
        .parse()
        .map_err(|e: can_dra_api::ValueError| invalid(field, e.to_string()))?;
    let bps = rate.bits_per_second();
    if !(MIN_NOMINAL_BPS..=max_bps).contains(&bps) {
        let limit =
            |b: u32| Bitrate::from_bits_per_second(b).map_or(String::new(), |r| r.to_string());
        return Err(invalid(
            field,
            format!(
                "{rate} is outside {}..={}",
                limit(MIN_NOMINAL_BPS),
                limit(max_bps)
            ),
        ));
    }
    Ok(rate)
}

impl CanBusSpec {
    /// A classic CAN bus at `bitrate` on all nodes, with the default member count.
    ///
    /// ```
    /// use can_dra_cluster::canbus::{CanBus, CanBusSpec};
    /// let bus = CanBus::new("powertrain", CanBusSpec::new("500k"));
    /// assert!(bus.spec.validate().is_ok());
    /// assert_eq!(bus.spec.max_members, 16);
    /// ```
    pub fn new(bitrate: impl Into<String>) -> Self {
        Self {
            bitrate: bitrate.into(),
            fd: false,
            data_bitrate: None,
            max_members: DEFAULT_MAX_MEMBERS,
            node_selector: None,
            physical: Vec::new(),
            tunnel_port: None,
            external_peers: Vec::new(),
        }
    }

    /// Checks what the CRD schema cannot; the error names the field.
    ///
    /// ```
    /// use can_dra_cluster::canbus::CanBusSpec;
    /// let mut spec = CanBusSpec::new("500k");
    /// spec.data_bitrate = Some("2M".into());
    /// let error = spec.validate().unwrap_err();
    /// assert_eq!(error.field, "dataBitrate");
    /// ```
    pub fn validate(&self) -> Result<(), SpecError> {
        self.bitrate()?;
        self.data_bitrate()?;
        if !(1..=MAX_MEMBERS).contains(&self.max_members) {
            return Err(invalid(
                "maxMembers",
                format!("{} is outside 1..={MAX_MEMBERS}", self.max_members),
            ));
        }
        if let Some(selector) = &self.node_selector {
            // A ResourceSlice's nodeSelector must have exactly one term.
            match selector.node_selector_terms.as_slice() {
                [term] => {
                    let empty = term.match_expressions.as_ref().is_none_or(Vec::is_empty)
                        && term.match_fields.as_ref().is_none_or(Vec::is_empty);
                    if empty {
                        return Err(invalid(
                            "nodeSelector.nodeSelectorTerms[0]",
                            "an empty term selects no node; omit nodeSelector for all nodes",
                        ));
                    }
                }
                terms => {
                    return Err(invalid(
                        "nodeSelector.nodeSelectorTerms",
                        format!(
                            "exactly one term is supported (ResourceSlices allow one), got {}",
                            terms.len()
                        ),
                    ));
                }
            }
        }
        if let Some(port) = self.tunnel_port
            && port < MIN_TUNNEL_PORT
        {
            return Err(invalid(
                "tunnelPort",
                format!("{port} is outside {MIN_TUNNEL_PORT}..=65535"),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, attachment) in self.physical.iter().enumerate() {
            if attachment.node.is_empty() {
                return Err(invalid(format!("physical[{i}].node"), "must not be empty"));
            }
            attachment
                .interface
                .parse::<InterfaceName>()
                .map_err(|e| invalid(format!("physical[{i}].interface"), e.to_string()))?;
            if !seen.insert((&attachment.node, &attachment.interface)) {
                return Err(invalid(
                    format!("physical[{i}]"),
                    format!(
                        "{} on node {} is listed twice",
                        attachment.interface, attachment.node
                    ),
                ));
            }
        }
        self.validate_external_peers()
    }

    fn validate_external_peers(&self) -> Result<(), SpecError> {
        if self.external_peers.len() > MAX_EXTERNAL_PEERS {
            return Err(invalid(
                "externalPeers",
                format!(
                    "{} peers listed; at most {MAX_EXTERNAL_PEERS}",
                    self.external_peers.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, peer) in self.external_peers.iter().enumerate() {
            let field = |name: &str| format!("externalPeers[{i}].{name}");
            if !is_dns_label(&peer.name) {
                return Err(invalid(
                    field("name"),
                    format!(
                        "{:?} is not a DNS label (1-63 of a-z, 0-9 and '-', \
                         starting and ending with a letter or digit)",
                        peer.name
                    ),
                ));
            }
            if !names.insert(peer.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    format!("{} is listed twice", peer.name),
                ));
            }
            peer.ip()
                .map_err(|reason| invalid(field("address"), reason))?;
            if peer.port == 0 {
                return Err(invalid(field("port"), "0 is outside 1..=65535"));
            }
            if peer.node.as_deref() == Some("") {
                return Err(invalid(field("node"), "must not be empty; omit it instead"));
            }
        }
        Ok(())
    }

    /// The nominal bitrate, parsed and range-checked.
    pub fn bitrate(&self) -> Result<Bitrate, SpecError> {
        parse_rate("bitrate", &self.bitrate, MAX_NOMINAL_BPS)
    }

    /// The FD data-phase bitrate: `None` on a classic bus, the nominal bitrate when an FD bus
    /// gives none.
    pub fn data_bitrate(&self) -> Result<Option<Bitrate>, SpecError> {
        match (&self.data_bitrate, self.fd) {
            (Some(_), false) => Err(invalid("dataBitrate", "only allowed when fd is true")),
            (None, false) => Ok(None),
            (None, true) => self.bitrate().map(Some),
            (Some(input), true) => {
                let data = parse_rate("dataBitrate", input, MAX_DATA_BPS)?;
                let nominal = self.bitrate()?;
                if data < nominal {
                    return Err(invalid(
                        "dataBitrate",
                        format!("{data} is below the nominal bitrate {nominal}"),
                    ));
                }
                Ok(Some(data))
            }
        }
    }
}

fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(inner)
        && bytes.last().is_some_and(inner)
        && bytes.iter().all(|b| inner(b) || *b == b'-')
}

impl ExternalPeer {
    /// The peer's address, parsed: an IPv4 or IPv6 literal that can be sent to (not a host name,
    /// not unspecified, multicast or broadcast, and IPv4 written as IPv4).
    pub fn ip(&self) -> Result<IpAddr, String> {
        let ip: IpAddr = self.address.parse().map_err(|_| {
            format!(
                "{:?} is not an IPv4 or IPv6 address (host names are not resolved)",
                self.address
            )
        })?;
        let refused = match ip {
            _ if ip.is_unspecified() => Some("unspecified"),
            _ if ip.is_multicast() => Some("multicast"),
            IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                Some("IPv4-mapped; write the IPv4 address")
            }
            _ => None,
        };
        match refused {
            Some(what) => Err(format!("{} is {what}", self.address)),
            None => Ok(ip),
        }
    }
}

/// The `CanBus` CustomResourceDefinition as YAML, as installed by the Helm chart.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&CanBus::crd())?;
    Ok(format!(
        "# The CanBus CustomResourceDefinition, generated by `can-dra-controller crd`; do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm};

    fn spec(bitrate: &str) -> CanBusSpec {
        CanBusSpec::new(bitrate)
    }

    fn field(spec: &CanBusSpec) -> String {
        spec.validate().unwrap_err().field
    }

    #[test]
    fn defaults_fill_in_from_json() {
        let bus: CanBus = serde_json::from_value(serde_json::json!({
            "apiVersion": "can.dra.dev/v1alpha1",
            "kind": "CanBus",
            "metadata": {"name": "body"},
            "spec": {"bitrate": "250k"}
        }))
        .unwrap();
        assert_eq!(bus.spec.max_members, DEFAULT_MAX_MEMBERS);
        assert!(!bus.spec.fd);
        assert!(bus.spec.node_selector.is_none());
        assert_eq!(bus.spec.bitrate().unwrap().bits_per_second(), 250_000);
    }

    #[test]
    fn bad_bitrates_name_their_field() {
        assert_eq!(field(&spec("fast")), "bitrate");
        assert_eq!(field(&spec("2M")), "bitrate");
        assert_eq!(field(&spec("500")), "bitrate");
        let mut fd = spec("500k");
        fd.fd = true;
        fd.data_bitrate = Some("32M".into());
        assert_eq!(field(&fd), "dataBitrate");
        fd.data_bitrate = Some("250k".into());
        let error = fd.validate().unwrap_err();
        assert_eq!(error.field, "dataBitrate");
        assert!(error.reason.contains("below"), "{error}");
        fd.data_bitrate = Some("2M".into());
        assert_eq!(
            fd.data_bitrate().unwrap().map(Bitrate::bits_per_second),
            Some(2_000_000)
        );
    }

    #[test]
    fn fd_bus_without_data_bitrate_uses_the_nominal_one() {
        let mut fd = spec("1M");
        fd.fd = true;
        assert_eq!(
            fd.data_bitrate().unwrap().map(Bitrate::bits_per_second),
            Some(1_000_000)
        );
        assert_eq!(spec("1M").data_bitrate().unwrap(), None);
    }

    #[test]
    fn member_count_is_bounded() {
        let mut s = spec("500k");
        s.max_members = 0;
        assert_eq!(field(&s), "maxMembers");
        s.max_members = 129;
        assert_eq!(field(&s), "maxMembers");
        s.max_members = 128;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn node_selector_needs_exactly_one_nonempty_term() {
        let term = NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: "can.dra.dev/rack".into(),
                operator: "In".into(),
                values: Some(vec!["hil-1".into()]),
            }]),
            match_fields: None,
        };
        let mut s = spec("500k");
        s.node_selector = Some(NodeSelector {
            node_selector_terms: vec![term.clone(), term.clone()],
        });
        assert_eq!(field(&s), "nodeSelector.nodeSelectorTerms");
        s.node_selector = Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm::default()],
        });
        assert_eq!(field(&s), "nodeSelector.nodeSelectorTerms[0]");
        s.node_selector = Some(NodeSelector {
            node_selector_terms: vec![term],
        });
        assert!(s.validate().is_ok());
    }

    #[test]
    fn tunnel_ports_below_1024_are_refused() {
        let mut bus = spec("500k");
        bus.tunnel_port = Some(1023);
        assert_eq!(field(&bus), "tunnelPort");
        bus.tunnel_port = Some(1024);
        assert!(bus.validate().is_ok());
    }

    #[test]
    fn physical_attachments_are_checked() {
        let mut s = spec("500k");
        let at = |node: &str, interface: &str| PhysicalAttachment {
            node: node.into(),
            interface: interface.into(),
        };
        s.physical = vec![at("node-a", "can0"), at("node-b", "a-name-far-too-long")];
        assert_eq!(field(&s), "physical[1].interface");
        s.physical = vec![at("node-a", "can0"), at("node-a", "can0")];
        assert_eq!(field(&s), "physical[1]");
        s.physical = vec![at("", "can0")];
        assert_eq!(field(&s), "physical[0].node");
        s.physical = vec![at("node-a", "can0"), at("node-b", "can0")];
        assert!(s.validate().is_ok());
    }

    fn peer(name: &str, address: &str, port: u16) -> ExternalPeer {
        ExternalPeer {
            name: name.into(),
            address: address.into(),
            port,
            node: None,
        }
    }

    #[test]
    fn external_peers_are_checked_and_the_error_names_the_peer_and_field() {
        let mut s = spec("500k");
        s.external_peers = vec![
            peer("rack-1", "198.51.100.7", 20000),
            peer("esp", "2001:db8::7", 1),
        ];
        assert!(s.validate().is_ok());

        let cases: [(ExternalPeer, &str, &str); 9] = [
            (
                peer("rack-1", "198.51.100.8", 20000),
                "externalPeers[2].name",
                "twice",
            ),
            (
                peer("Rack", "198.51.100.8", 20000),
                "externalPeers[2].name",
                "DNS label",
            ),
            (
                peer("-rack", "198.51.100.8", 20000),
                "externalPeers[2].name",
                "DNS label",
            ),
            (
                peer("x", "rack.example.com", 20000),
                "externalPeers[2].address",
                "host names",
            ),
            (
                peer("x", "0.0.0.0", 20000),
                "externalPeers[2].address",
                "unspecified",
            ),
            (
                peer("x", "239.1.1.1", 20000),
                "externalPeers[2].address",
                "multicast",
            ),
            (
                peer("x", "255.255.255.255", 20000),
                "externalPeers[2].address",
                "broadcast",
            ),
            (
                peer("x", "::ffff:192.0.2.1", 20000),
                "externalPeers[2].address",
                "IPv4-mapped",
            ),
            (
                peer("x", "198.51.100.8", 0),
                "externalPeers[2].port",
                "1..=65535",
            ),
        ];
        for (bad, field, reason) in cases {
            let mut s = s.clone();
            s.external_peers.push(bad.clone());
            let error = s.validate().unwrap_err();
            assert_eq!(error.field, field, "{bad:?}");
            assert!(error.to_string().contains(reason), "{bad:?}: {error}");
        }
        let mut named = s.clone();
        named.external_peers[0].node = Some(String::new());
        assert_eq!(field(&named), "externalPeers[0].node");
        let mut many = spec("500k");
        many.external_peers = (0..=MAX_EXTERNAL_PEERS)
            .map(|i| peer(&format!("p{i}"), "198.51.100.7", 20000))
            .collect();
        assert_eq!(field(&many), "externalPeers");
    }

    #[test]
    fn the_crd_keys_external_peers_by_name_and_checks_their_fields() {
        let crd = serde_json::to_value(CanBus::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let peers = &spec["properties"]["externalPeers"];
        assert_eq!(peers["x-kubernetes-list-type"], "map");
        assert_eq!(
            peers["x-kubernetes-list-map-keys"],
            serde_json::json!(["name"])
        );
        assert_eq!(peers["maxItems"], 32);
        let item = &peers["items"]["properties"];
        assert_eq!(item["port"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(item["port"]["maximum"].as_f64(), Some(65535.0));
        assert_eq!(item["name"]["maxLength"], 63);
        assert!(item["name"]["pattern"].is_string());
        let rules = &item["address"]["x-kubernetes-validations"];
        assert_eq!(rules[0]["rule"], "isIP(self)");
        assert_eq!(rules[0]["message"], EXTERNAL_ADDRESS_NOT_IP);
        let mut required: Vec<&str> = peers["items"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        required.sort_unstable();
        assert_eq!(required, ["address", "name", "port"]);
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_bounds() {
        let crd = CanBus::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("canbuses.can.dra.dev"));
        assert_eq!(crd.spec.scope, "Cluster");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let schema = serde_json::to_value(&version.schema).unwrap();
        let members = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["maxMembers"];
        assert_eq!(members["minimum"].as_f64(), Some(1.0));
        assert_eq!(members["maximum"].as_f64(), Some(128.0));
        assert_eq!(members["default"], 16);
        let required = &schema["openAPIV3Schema"]["properties"]["spec"]["required"];
        assert_eq!(required, &serde_json::json!(["bitrate"]));
    }
}
