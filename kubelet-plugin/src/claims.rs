//! ResourceClaims as NodePrepareResources needs them: fetched from the API server, checked
//! (same UID, allocated), and turned into one resolved member per device allocated to this driver.
//!
//! Opaque configs are merged the way DRA drivers do: entries from the DeviceClass (`FromClass`)
//! first, then those from the claim (`FromClaim`), each group in its listed order, a later entry
//! winning field by field ([`MemberConfig::overlay`]). An entry applies to a result when its
//! `requests` is empty, names the result's request, or names the main request of a `req/sub`
//! result. Each device then resolves with its position among this driver's results, which picks the
//! default interface name `can<N>`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use can_dra_api::{ConfigError, MemberConfig, ResolvedMember};
use k8s_openapi::api::resource::v1::{DeviceAllocationConfiguration, ResourceClaim};
use kube::{Api, Client};

pub use dra_kubeletplugin::driver::ClaimRef;

/// `namespace/name`, the way every message of this module names a claim.
pub(crate) fn label(claim: &ClaimRef) -> String {
    format!("{}/{}", claim.namespace, claim.name)
}

/// One device allocated to this driver in a claim, with its member configuration resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedMember {
    /// The request the device serves, as in the allocation (`req` or `req/sub`).
    pub request: String,
    /// The pool.
    pub pool: String,
    /// The device name in the pool.
    pub device: String,
    /// The share ID, for devices allocated more than once (consumable capacity).
    pub share_id: Option<String>,
    /// The member's settings with every default applied.
    pub member: ResolvedMember,
}

/// A fetched, checked claim and its members for this driver.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocatedClaim {
    /// The claim as read from the API server.
    pub claim: ResourceClaim,
    /// The devices allocated to this driver, in allocation order.
    pub members: Vec<AllocatedMember>,
}

/// The devices this node serves, by pool and device name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownDevices {
    devices: BTreeSet<(String, String)>,
    // Devices of cluster-wide buses are checked against their CanBus by the node driver.
    shared_pools: bool,
}

impl KnownDevices {
    /// The devices `names` of one pool.
    ///
    /// ```
    /// use can_dra_kubelet_plugin::claims::KnownDevices;
    /// let known = KnownDevices::from_pool("node-a", ["can0-m0", "can0-m1"]);
    /// assert!(known.contains("node-a", "can0-m1"));
    /// assert!(!known.contains("node-b", "can0-m1"));
    /// ```
    pub fn from_pool<I, S>(pool: &str, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut known = Self::default();
        for name in names {
            known.insert(pool, name);
        }
        known
    }

    /// Adds a device.
    pub fn insert(&mut self, pool: &str, device: impl Into<String>) {
        self.devices.insert((pool.to_owned(), device.into()));
    }

    /// Also lets through every device of a cluster-wide bus pool (`canbus/<bus>`); whether
    /// the device exists is then checked against the CanBus.
    pub fn accept_shared_pools(&mut self) {
        self.shared_pools = true;
    }

    /// Whether the node serves this device.
    pub fn contains(&self, pool: &str, device: &str) -> bool {
        (self.shared_pools && can_dra_cluster::naming::is_bus_pool(pool))
            || self.devices.contains(&(pool.to_owned(), device.to_owned()))
    }
}

/// A claim cannot be prepared. Every message names the claim; request-level ones the request and
/// field too. A bad claim fails on its own: other claims of the same call are unaffected.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The API server did not answer the GET.
    #[error("claim {claim}: cannot read it from the API server: {source}")]
    Api {
        /// `namespace/name`.
        claim: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The claim does not exist (any more).
    #[error("claim {claim} not found")]
    NotFound {
        /// `namespace/name`.
        claim: String,
    },
    /// A claim of the same name with a different UID exists.
    #[error("claim {claim} was replaced: uid {actual}, expected {expected}")]
    Replaced {
        /// `namespace/name`.
        claim: String,
        /// The UID found.
        actual: String,
        /// The UID the kubelet asked for.
        expected: String,
    },
    /// The claim has no `status.allocation`.
    #[error("claim {claim} is not allocated")]
    NotAllocated {
        /// `namespace/name`.
        claim: String,
    },
    /// The allocation itself is malformed (say an unknown config `source`).
    #[error("claim {claim}: {field}: {message}")]
    Allocation {
        /// `namespace/name`.
        claim: String,
        /// The field path in the claim.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// An opaque config for this driver is invalid, alone or once merged.
    #[error("claim {claim}, request {request:?}: {field}: {message}")]
    Config {
        /// `namespace/name`.
        claim: String,
        /// The request whose device uses the config.
        request: String,
        /// The field path, from the claim down into the parameters.
        field: String,
        /// The broken rule.
        message: String,
    },
    /// A device allocated to this driver is not one this node serves.
    #[error(
        "claim {claim}, request {request:?}: device {pool}/{device} is not published by this node"
    )]
    UnknownDevice {
        /// `namespace/name`.
        claim: String,
        /// The request.
        request: String,
        /// The pool.
        pool: String,
        /// The device.
        device: String,
    },
    /// Two devices of the claim would get the same interface name inside the pod.
    #[error(
        "claim {claim}: requests {first:?} and {second:?} both use interface name {interface:?} in the pod"
    )]
    DuplicateInterface {
        /// `namespace/name`.
        claim: String,
        /// The first request.
        first: String,
        /// The second request.
        second: String,
        /// The interface name.
        interface: String,
    },
}

/// Reads claims for one driver.
#[derive(Clone)]
pub struct ClaimReader {
    client: Client,
    driver: String,
}

impl fmt::Debug for ClaimReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimReader")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

impl ClaimReader {
    /// A reader for `driver` (the DRA driver name, e.g. `can.dra.dev`).
    pub fn new(client: Client, driver: impl Into<String>) -> Self {
        Self {
            client,
            driver: driver.into(),
        }
    }

    /// GETs the claim and checks that it is the one the kubelet means (same UID) and allocated.
    pub async fn fetch(&self, claim: &ClaimRef) -> Result<ResourceClaim, ClaimError> {
        let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), &claim.namespace);
        let found = api
            .get_opt(&claim.name)
            .await
            .map_err(|source| ClaimError::Api {
                claim: label(claim),
                source,
            })?
            .ok_or_else(|| ClaimError::NotFound {
                claim: label(claim),
            })?;
        check(claim, &found)?;
        Ok(found)
    }

    /// Fetches the claim and resolves its members for this driver (see [`resolve_members`]).
    pub async fn allocated(
        &self,
        claim: &ClaimRef,
        known: &KnownDevices,
    ) -> Result<AllocatedClaim, ClaimError> {
        let found = self.fetch(claim).await?;
        let members = resolve_members(claim, &found, &self.driver, known)?;
        tracing::debug!(claim = %claim, members = members.len(), "claim resolved");
        Ok(AllocatedClaim {
            claim: found,
            members,
        })
    }
}

/// Checks the UID and that the claim is allocated.
pub fn check(claim: &ClaimRef, found: &ResourceClaim) -> Result<(), ClaimError> {
    let actual = found.metadata.uid.as_deref().unwrap_or_default();
    if actual != claim.uid {
        return Err(ClaimError::Replaced {
            claim: label(claim),
            actual: actual.to_owned(),
            expected: claim.uid.clone(),
        });
    }
    if found
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .is_none()
    {
        return Err(ClaimError::NotAllocated {
            claim: label(claim),
        });
    }
    Ok(())
}

/// Where a config entry came from; class entries apply before claim entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Class,
    Claim,
}

/// A config entry for this driver, with its position in `status.allocation.devices.config`.
struct Entry<'a> {
    index: usize,
    source: Source,
    entry: &'a DeviceAllocationConfiguration,
    parsed: Option<Result<MemberConfig, ConfigError>>,
}

impl Entry<'_> {
    fn applies_to(&self, request: &str) -> bool {
        let requests = self.entry.requests.as_deref().unwrap_or_default();
        let main = request.split('/').next().unwrap_or(request);
        requests.is_empty() || requests.iter().any(|r| r == request || r == main)
    }

    fn field(&self) -> String {
        format!(
            "status.allocation.devices.config[{}].opaque.parameters",
            self.index
        )
    }
}

/// Resolves the devices `found` allocates to `driver` (a pure function of the claim):
/// results of other drivers are ignored; each of ours must be in `known`; its member config is
/// the merge of the applicable opaque configs, resolved with the device's index among our results.
pub fn resolve_members(
    claim: &ClaimRef,
    found: &ResourceClaim,
    driver: &str,
    known: &KnownDevices,
) -> Result<Vec<AllocatedMember>, ClaimError> {
    let name = label(claim);
    let Some(devices) = found
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .map(|a| a.devices.clone().unwrap_or_default())
    else {
        return Err(ClaimError::NotAllocated { claim: name });
    };
    let mut entries = Vec::new();
    for (index, entry) in devices.config.iter().flatten().enumerate() {
        let Some(opaque) = &entry.opaque else {
            continue;
        };
        if opaque.driver != driver {
            continue;
        }
        let source = match entry.source.as_str() {
            "FromClass" => Source::Class,
            "FromClaim" => Source::Claim,
            other => {
                return Err(ClaimError::Allocation {
                    claim: name,
                    field: format!("status.allocation.devices.config[{index}].source"),
                    message: format!("{other:?} is neither FromClass nor FromClaim"),
                });
            }
        };
        entries.push(Entry {
            index,
            source,
            entry,
            parsed: None,
        });
    }
    // Stable: keeps the listed order within each source.
    entries.sort_by_key(|e| e.source);

    let ours = devices
        .results
        .iter()
        .flatten()
        .filter(|r| r.driver == driver);
    let mut members = Vec::new();
    let mut interfaces: BTreeMap<String, String> = BTreeMap::new();
    for (position, result) in ours.enumerate() {
        let config_error = |field: String, error: &ConfigError| ClaimError::Config {
            claim: name.clone(),
            request: result.request.clone(),
            field: if error.field().is_empty() {
                field
            } else {
                format!("{field}.{}", error.field())
            },
            message: error.message().to_owned(),
        };
        if !known.contains(&result.pool, &result.device) {
            return Err(ClaimError::UnknownDevice {
                claim: name,
                request: result.request.clone(),
                pool: result.pool.clone(),
                device: result.device.clone(),
            });
        }
        let mut merged = MemberConfig::default();
        let mut used = Vec::new();
        for entry in entries.iter_mut().filter(|e| e.applies_to(&result.request)) {
            let field = entry.field();
            let parsed = entry.parsed.get_or_insert_with(|| {
                let raw = entry
                    .entry
                    .opaque
                    .as_ref()
                    .map(|o| o.parameters.0.clone())
                    .unwrap_or_default();
                MemberConfig::from_json_value(&raw)
            });
            match parsed {
                Ok(config) => merged = merged.overlay(config),
                Err(error) => return Err(config_error(field, error)),
            }
            used.push(entry.index.to_string());
        }
        let member = merged.resolve(position).map_err(|error| {
            let field = if used.is_empty() {
                "defaults".to_owned()
            } else {
                format!(
                    "status.allocation.devices.config[{}] merged",
                    used.join(",")
                )
            };
            config_error(field, &error)
        })?;
        let interface = member.interface_name.as_str().to_owned();
        if let Some(first) = interfaces.insert(interface.clone(), result.request.clone()) {
            return Err(ClaimError::DuplicateInterface {
                claim: name,
                first,
                second: result.request.clone(),
                interface,
            });
        }
        members.push(AllocatedMember {
            request: result.request.clone(),
            pool: result.pool.clone(),
            device: result.device.clone(),
            share_id: result.share_id.clone(),
            member,
        });
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use can_dra_api::Access;
    use serde_json::json;

    const DRIVER: &str = "can.dra.dev";

    fn claim_ref() -> ClaimRef {
        ClaimRef {
            namespace: "ns".into(),
            uid: "u1".into(),
            name: "c".into(),
        }
    }

    fn claim(results: serde_json::Value, config: serde_json::Value) -> ResourceClaim {
        serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": "c", "namespace": "ns", "uid": "u1"},
            "spec": {},
            "status": {"allocation": {"devices": {"results": results, "config": config}}},
        }))
        .unwrap()
    }

    fn result(request: &str, device: &str) -> serde_json::Value {
        json!({"request": request, "driver": DRIVER, "pool": "node-a", "device": device})
    }

    fn opaque(source: &str, requests: &[&str], params: serde_json::Value) -> serde_json::Value {
        let mut params = params;
        params["apiVersion"] = json!("can.dra.dev/v1alpha1");
        params["kind"] = json!("MemberConfig");
        json!({"source": source, "requests": requests, "opaque": {"driver": DRIVER, "parameters": params}})
    }

    fn known() -> KnownDevices {
        KnownDevices::from_pool("node-a", ["can0-m0", "can0-m1", "can1-m0"])
    }

    #[test]
    fn class_configs_apply_before_claim_configs_whatever_the_listed_order() {
        let c = claim(
            json!([result("a", "can0-m0")]),
            json!([
                opaque("FromClaim", &[], json!({"interfaceName": "claim0"})),
                opaque(
                    "FromClass",
                    &[],
                    json!({"interfaceName": "class0", "access": "listenOnly"})
                ),
            ]),
        );
        let members = resolve_members(&claim_ref(), &c, DRIVER, &known()).unwrap();
        assert_eq!(members[0].member.interface_name.as_str(), "claim0");
        assert_eq!(members[0].member.access, Access::ListenOnly);
    }

    #[test]
    fn subrequest_results_take_configs_for_their_main_request() {
        let c = claim(
            json!([result("a/fast", "can0-m0"), result("b", "can0-m1")]),
            json!([
                opaque("FromClaim", &["a"], json!({"interfaceName": "fast0"})),
                opaque("FromClaim", &["b/x"], json!({"interfaceName": "other"})),
            ]),
        );
        let members = resolve_members(&claim_ref(), &c, DRIVER, &known()).unwrap();
        assert_eq!(members[0].member.interface_name.as_str(), "fast0");
        // `b/x` names a subrequest of b that was not chosen; request b keeps its default name.
        assert_eq!(members[1].member.interface_name.as_str(), "can1");
    }

    #[test]
    fn configs_that_apply_to_all_requests_clash_on_interface_names() {
        let c = claim(
            json!([result("a", "can0-m0"), result("b", "can0-m1")]),
            json!([opaque("FromClaim", &[], json!({"interfaceName": "ecu0"}))]),
        );
        let err = resolve_members(&claim_ref(), &c, DRIVER, &known()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "claim ns/c: requests \"a\" and \"b\" both use interface name \"ecu0\" in the pod"
        );
    }

    #[test]
    fn unknown_source_names_the_field() {
        let mut entry = opaque("FromClaim", &[], json!({}));
        entry["source"] = json!("FromElsewhere");
        let c = claim(json!([result("a", "can0-m0")]), json!([entry]));
        let err = resolve_members(&claim_ref(), &c, DRIVER, &known()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "claim ns/c: status.allocation.devices.config[0].source: \"FromElsewhere\" is neither FromClass nor FromClaim"
        );
    }

    #[test]
    fn contradictory_merge_names_the_entries() {
        let c = claim(
            json!([result("a", "can0-m0")]),
            json!([
                opaque("FromClass", &[], json!({"access": "listenOnly"})),
                opaque(
                    "FromClaim",
                    &["a"],
                    json!({"transmitAllow": [{"id": "0x100"}]})
                ),
            ]),
        );
        let err = resolve_members(&claim_ref(), &c, DRIVER, &known()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("claim ns/c, request \"a\": status.allocation.devices.config[0,1] merged.transmitAllow: cannot be combined with access: listenOnly"),
            "{text}"
        );
    }

    #[test]
    fn wrong_uid_and_missing_allocation_are_refused() {
        let c = claim(json!([]), json!([]));
        let other = ClaimRef {
            uid: "u2".into(),
            ..claim_ref()
        };
        assert_eq!(
            check(&other, &c).unwrap_err().to_string(),
            "claim ns/c was replaced: uid u1, expected u2"
        );
        let mut unallocated = c.clone();
        unallocated.status = None;
        assert_eq!(
            check(&claim_ref(), &unallocated).unwrap_err().to_string(),
            "claim ns/c is not allocated"
        );
    }
}
