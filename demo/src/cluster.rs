//! The cluster side of the demo, without a cluster: what the scheduler would have left in the API
//! server (the Node, one allocated ResourceClaim per pod with its claim parameters) served by the
//! API server **test double**, and the node configuration the daemon reads.

use anyhow::Context;
use can_dra_doubles::apiserver::ApiServer;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceClaim;
use serde_json::{Value, json};

/// The DRA driver name (the daemon's default).
pub const DRIVER: &str = "can.dra.dev";
/// The node name, which is also the pool of the node's devices.
pub const NODE: &str = "demo-node";
/// The namespace of the claims.
pub const NAMESPACE: &str = "demo";
/// The physical controller stand-in the node configuration publishes.
pub const CONTROLLER: &str = "can0";
/// Member slots published for the controller.
pub const SLOTS: u32 = 4;

/// The node configuration (`--config`): publish only the controller stand-in, with a few slots.
pub fn node_config_yaml() -> String {
    format!(
        "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\nphysical:\n  include: [\"{CONTROLLER}\"]\n  slots: {SLOTS}\n"
    )
}

/// One pod of the demo and the claim the scheduler allocated for it.
#[derive(Debug, Clone)]
pub struct PodClaim {
    /// The pod's name.
    pub pod: &'static str,
    /// The ResourceClaim's name.
    pub claim: &'static str,
    /// The claim's UID.
    pub uid: &'static str,
    /// The allocated device (a slot of the controller).
    pub device: String,
    /// The claim parameters (`MemberConfig`), as a user writes them.
    pub parameters: Value,
    /// What the parameters mean, for the screen.
    pub role: &'static str,
}

/// The request name in every claim.
const REQUEST: &str = "can";

/// pod-a read-write, pod-b behind a slow lossy member, pod-c listen-only.
pub fn pod_claims() -> [PodClaim; 3] {
    let slot = |index: u32| format!("{CONTROLLER}-m{index}");
    [
        PodClaim {
            pod: "pod-a",
            claim: "pod-a-can",
            uid: "d3m0-a",
            device: slot(0),
            parameters: json!({"interfaceName": "can0", "access": "readWrite"}),
            role: "read-write",
        },
        PodClaim {
            pod: "pod-b",
            claim: "pod-b-can",
            uid: "d3m0-b",
            device: slot(1),
            parameters: json!({
                "interfaceName": "can0",
                "shaping": {"rx": {"bitrate": "20k", "delay": "20ms", "loss": "10%"}},
            }),
            role: "read-write, receives through a 20 kbit/s bus with 20 ms delay and 10% loss",
        },
        PodClaim {
            pod: "pod-c",
            claim: "pod-c-can",
            uid: "d3m0-c",
            device: slot(2),
            parameters: json!({"interfaceName": "can0", "access": "listenOnly"}),
            role: "listen-only monitor",
        },
    ]
}

impl PodClaim {
    /// The allocated claim as the scheduler leaves it: one request, its result on the node's
    /// pool, and the claim parameters as opaque config for the driver.
    pub fn object(&self) -> anyhow::Result<ResourceClaim> {
        let mut parameters = self.parameters.clone();
        parameters["apiVersion"] = json!("can.dra.dev/v1alpha1");
        parameters["kind"] = json!("MemberConfig");
        serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": self.claim, "namespace": NAMESPACE, "uid": self.uid},
            "spec": {"devices": {"requests": [
                {"name": REQUEST, "exactly": {"deviceClassName": DRIVER}},
            ]}},
            "status": {"allocation": {"devices": {
                "results": [
                    {"request": REQUEST, "driver": DRIVER, "pool": NODE, "device": self.device},
                ],
                "config": [{
                    "source": "FromClaim",
                    "requests": [REQUEST],
                    "opaque": {"driver": DRIVER, "parameters": parameters},
                }],
            }}},
        }))
        .with_context(|| format!("building claim {}", self.claim))
    }
}

/// Starts the double and stores the Node and the claims in it.
pub async fn start_api_server(claims: &[PodClaim]) -> anyhow::Result<ApiServer> {
    let server = ApiServer::start().await?;
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
    }))?;
    server.insert_node(node);
    for claim in claims {
        server.insert_claim(claim.object()?);
    }
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use can_dra_api::{Access, MemberConfig, NodeConfig};

    #[test]
    fn every_claims_parameters_pass_the_api_validation_and_mean_what_the_demo_says() {
        let claims = pod_claims();
        let resolved: Vec<_> = claims
            .iter()
            .map(|claim| {
                let mut parameters = claim.parameters.clone();
                parameters["apiVersion"] = json!("can.dra.dev/v1alpha1");
                parameters["kind"] = json!("MemberConfig");
                MemberConfig::from_json_value(&parameters)
                    .and_then(|config| config.resolve(0))
                    .unwrap_or_else(|error| panic!("{}: {error}", claim.claim))
            })
            .collect();
        assert_eq!(resolved[0].access, Access::ReadWrite);
        assert!(resolved[0].shaping.rx.is_unshaped());
        let slow = resolved[1].shaping.rx;
        assert_eq!(slow.bitrate.map(|b| b.bits_per_second()), Some(20_000));
        assert_eq!(slow.delay, std::time::Duration::from_millis(20));
        assert_eq!(slow.loss.millionths(), 100_000);
        assert_eq!(resolved[2].access, Access::ListenOnly);
        for member in &resolved {
            assert_eq!(member.interface_name.as_str(), "can0");
        }
    }

    #[test]
    fn claims_are_allocated_on_distinct_slots_of_the_published_controller() {
        let config = NodeConfig::from_yaml_str(&node_config_yaml()).unwrap();
        assert!(config.publishes_physical(CONTROLLER));
        // The daemon's own member host ends are vxcan links too: they must not be published.
        assert!(!config.publishes_physical("cdra0142530b7ac"));
        let claims = pod_claims();
        let mut devices: Vec<&str> = claims.iter().map(|c| c.device.as_str()).collect();
        devices.dedup();
        assert_eq!(devices.len(), claims.len());
        for claim in &claims {
            let object = serde_json::to_value(claim.object().unwrap()).unwrap();
            let result = &object["status"]["allocation"]["devices"]["results"][0];
            assert_eq!(result["pool"], NODE);
            assert_eq!(result["driver"], DRIVER);
            let slot: u32 = claim.device[CONTROLLER.len() + 2..].parse().unwrap();
            assert!(slot < SLOTS, "{} is not a published slot", claim.device);
        }
    }
}
