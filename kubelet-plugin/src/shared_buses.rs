//! Cluster-wide buses (`CanBus`, published by the controller as pools `canbus/<bus>`) as the node
//! daemon sees them: the spec it needs to join members and the status that says where the other
//! nodes' tunnel endpoints listen.
//!
//! CanBuses are read as plain JSON and then parsed into the cluster model's types, so that the
//! tunnel port the controller writes (`status.tunnelPort`, see the contract in `docs/tunnel.md`)
//! is read whichever version of the type this build has.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use can_dra_cluster::canbus::{CanBus, CanBusSpec, CanBusStatus, ExternalPeerStatus};
use can_dra_cluster::naming::pool_name;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::ApiResource;

/// One CanBus as the node needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedBus {
    /// The CanBus name.
    pub name: String,
    /// Its spec, as the cluster model's type reads it.
    pub spec: CanBusSpec,
    /// The UDP port of the bus's tunnel endpoints (`status.tunnelPort`), once the controller
    /// assigned one.
    pub tunnel_port: Option<u16>,
    /// Node name to `host:port` of its tunnel endpoint (`status.endpoints`).
    pub endpoints: BTreeMap<String, String>,
    /// The node serving each external peer (`status.externalPeers`).
    pub external_peers: Vec<ExternalPeerStatus>,
}

/// A CanBus cannot be read or used.
#[derive(Debug, thiserror::Error)]
pub enum CanBusError {
    /// The API server did not answer.
    #[error("reading CanBuses from the API server: {0}")]
    Api(#[source] kube::Error),
    /// The object does not parse as a CanBus.
    #[error("CanBus {name}: {field}: {message}")]
    Malformed {
        /// The CanBus name.
        name: String,
        /// The field (`spec`, `status`, `status.tunnelPort`).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl SharedBus {
    /// Parses a CanBus read as JSON. The spec is validated as the controller does.
    pub fn from_object(object: &DynamicObject) -> Result<Self, CanBusError> {
        let name = object.metadata.name.clone().unwrap_or_default();
        let malformed = |field: &'static str, message: String| CanBusError::Malformed {
            name: name.clone(),
            field,
            message,
        };
        let spec: CanBusSpec =
            serde_json::from_value(object.data.get("spec").cloned().unwrap_or_default())
                .map_err(|e| malformed("spec", e.to_string()))?;
        spec.validate()
            .map_err(|e| malformed("spec", e.to_string()))?;
        let raw_status = object.data.get("status").cloned();
        let tunnel_port = match raw_status.as_ref().and_then(|s| s.get("tunnelPort")) {
            None | Some(serde_json::Value::Null) => None,
            Some(value) => {
                let port = value
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        malformed("status.tunnelPort", format!("{value} is not a UDP port"))
                    })?;
                Some(port)
            }
        };
        // After the port, so that a bad port is reported by its own field name.
        let status: CanBusStatus = match &raw_status {
            Some(value) if !value.is_null() => serde_json::from_value(value.clone())
                .map_err(|e| malformed("status", e.to_string()))?,
            _ => CanBusStatus::default(),
        };
        Ok(Self {
            name,
            spec,
            tunnel_port,
            endpoints: status.endpoints,
            external_peers: status.external_peers,
        })
    }

    /// The pool the controller publishes the bus's member slots in; also the name of the bus's
    /// mesh on this node.
    pub fn pool(&self) -> String {
        pool_name(&self.name)
    }

    /// Checks that `device` is one of the bus's member slots (`m0` .. `m<maxMembers-1>`).
    pub fn check_member_device(&self, device: &str) -> Result<(), String> {
        let index = device
            .strip_prefix('m')
            .filter(|digits| !digits.starts_with('+'))
            .and_then(|digits| digits.parse::<u32>().ok())
            .ok_or_else(|| {
                format!(
                    "device {device} is not a member slot of CanBus {} (m0..m{})",
                    self.name,
                    self.spec.max_members.saturating_sub(1)
                )
            })?;
        if index >= self.spec.max_members {
            return Err(format!(
                "device {device} is beyond CanBus {}'s maxMembers {}",
                self.name, self.spec.max_members
            ));
        }
        Ok(())
    }

    /// The addresses of the external peers `node`'s endpoint serves: those `status.externalPeers`
    /// gives to `node`, at the address and port `spec.externalPeers` lists for them. Other nodes
    /// serve none of them. A status entry for a peer the spec no longer lists is skipped (the
    /// controller removes it on its next pass).
    pub fn external_peers_served_by(&self, node: &str) -> Vec<SocketAddr> {
        self.external_peers
            .iter()
            .filter(|serving| serving.node == node)
            .filter_map(|serving| {
                let peer = self
                    .spec
                    .external_peers
                    .iter()
                    .find(|peer| peer.name == serving.name)?;
                // The spec was validated, so the address parses.
                Some(SocketAddr::new(peer.ip().ok()?, peer.port))
            })
            .collect()
    }

    /// The interfaces `spec.physical` attaches on `node`.
    pub fn physical_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.spec
            .physical
            .iter()
            .filter(move |attachment| attachment.node == node)
            .map(|attachment| attachment.interface.as_str())
    }
}

/// Reads CanBuses from the API server.
#[derive(Clone)]
pub struct CanBusReader {
    api: Api<DynamicObject>,
}

impl fmt::Debug for CanBusReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CanBusReader").finish_non_exhaustive()
    }
}

impl CanBusReader {
    /// A reader over `client`.
    pub fn new(client: Client) -> Self {
        let resource = ApiResource::erase::<CanBus>(&());
        Self {
            api: Api::all_with(client, &resource),
        }
    }

    /// Every CanBus; the ones that do not parse are returned as errors beside the others, so one
    /// broken bus does not stop the rest.
    pub async fn list(&self) -> Result<Vec<Result<SharedBus, CanBusError>>, CanBusError> {
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(CanBusError::Api)?;
        Ok(list.items.iter().map(SharedBus::from_object).collect())
    }

    /// The CanBus whose pool is `pool`, if there is one.
    pub async fn by_pool(&self, pool: &str) -> Result<Option<SharedBus>, CanBusError> {
        for bus in self.list().await? {
            match bus {
                Ok(bus) if bus.pool() == pool => return Ok(Some(bus)),
                Ok(_) => {}
                Err(error) if pool_of_error(&error).as_deref() == Some(pool) => return Err(error),
                Err(_) => {}
            }
        }
        Ok(None)
    }
}

fn pool_of_error(error: &CanBusError) -> Option<String> {
    match error {
        CanBusError::Malformed { name, .. } => Some(pool_name(name)),
        CanBusError::Api(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    fn bus(status: serde_json::Value) -> Result<SharedBus, CanBusError> {
        SharedBus::from_object(&object(serde_json::json!({
            "apiVersion": "can.dra.dev/v1alpha1",
            "kind": "CanBus",
            "metadata": {"name": "powertrain"},
            "spec": {"bitrate": "500k", "fd": true, "maxMembers": 4,
                     "physical": [{"node": "n1", "interface": "can0"},
                                  {"node": "n2", "interface": "can1"}]},
            "status": status,
        })))
    }

    #[test]
    fn status_gives_port_and_endpoints() {
        let parsed = bus(serde_json::json!({
            "tunnelPort": 47001,
            "endpoints": {"n1": "192.0.2.1:47001", "n2": "192.0.2.2:47001"},
            "members": {"n1": 1}
        }))
        .unwrap();
        assert_eq!(parsed.tunnel_port, Some(47001));
        assert_eq!(parsed.endpoints.len(), 2);
        assert!(parsed.spec.fd);
        assert_eq!(parsed.pool(), "canbus/powertrain");
        assert!(can_dra_cluster::naming::is_bus_pool(&parsed.pool()));
        assert_eq!(parsed.physical_on("n2").collect::<Vec<_>>(), ["can1"]);
        assert_eq!(parsed.physical_on("n3").count(), 0);
    }

    #[test]
    fn only_the_serving_node_gets_an_external_peer() {
        let parsed = SharedBus::from_object(&object(serde_json::json!({
            "apiVersion": "can.dra.dev/v1alpha1",
            "kind": "CanBus",
            "metadata": {"name": "powertrain"},
            "spec": {"bitrate": "500k", "externalPeers": [
                {"name": "rack", "address": "198.51.100.7", "port": 20000},
                {"name": "esp", "address": "2001:db8::9", "port": 20001, "node": "n2"},
                {"name": "idle", "address": "198.51.100.8", "port": 20000}]},
            "status": {"tunnelPort": 47001, "externalPeers": [
                {"name": "rack", "node": "n1"},
                {"name": "esp", "node": "n2"},
                {"name": "gone", "node": "n1"}]},
        })))
        .unwrap();
        let on = |node| parsed.external_peers_served_by(node);
        assert_eq!(on("n1"), ["198.51.100.7:20000".parse().unwrap()]);
        assert_eq!(on("n2"), ["[2001:db8::9]:20001".parse().unwrap()]);
        assert!(on("n3").is_empty());
    }

    #[test]
    fn a_bus_without_status_has_no_port_yet() {
        let parsed = bus(serde_json::Value::Null).unwrap();
        assert_eq!(parsed.tunnel_port, None);
        assert!(parsed.endpoints.is_empty());
    }

    #[test]
    fn a_bad_port_names_the_field() {
        let error = bus(serde_json::json!({"tunnelPort": 70000})).unwrap_err();
        assert!(error.to_string().contains("status.tunnelPort"), "{error}");
        assert!(error.to_string().contains("powertrain"), "{error}");
    }

    #[test]
    fn member_devices_are_bounded_by_max_members() {
        let parsed = bus(serde_json::Value::Null).unwrap();
        assert!(parsed.check_member_device("m0").is_ok());
        assert!(parsed.check_member_device("m3").is_ok());
        let beyond = parsed.check_member_device("m4").unwrap_err();
        assert!(beyond.contains("maxMembers 4"), "{beyond}");
        for bad in ["x0", "m", "m-1", "m+1", "can0-m0"] {
            assert!(parsed.check_member_device(bad).is_err(), "{bad}");
        }
    }
}
