//! The `CanBus` custom resource: a cluster-wide virtual CAN bus whose members may sit on different
//! nodes (joined by node-to-node tunnels) and which may include physical CAN controllers.
//!
//! The CRD schema (derived from these types) rejects wrong types and out-of-range member counts;
//! [`CanBusSpec::validate`] checks what a structural schema cannot: bitrate syntax and range, the
//! FD-only data bitrate, the single node-selector term a ResourceSlice allows, and the physical
//! attachments.

use std::collections::{BTreeMap, BTreeSet};

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
