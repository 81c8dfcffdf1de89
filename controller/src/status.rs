//! A bus's `status`: what it should say ([`desired_status`]) and the smallest write that makes it
//! say so ([`status_patch`]), so that the controller writes only when something changed.
//!
//! The status carries the members per node, the tunnel endpoint per node, the tunnel port in force,
//! the node serving each external peer and a `Ready` condition: `True` (reason `Published`) when the pool is published and the tunnel
//! port is settled, `False` with the reason otherwise (`InvalidSpec`, `TunnelPortConflict`,
//! `PublishFailed`).

use can_dra_cluster::canbus::{CanBus, CanBusStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Map, Value, json};

use crate::membership::{Endpoints, Members, Serving};

/// The condition type the controller maintains.
pub const READY: &str = "Ready";

/// Why a bus is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The condition reason, CamelCase (e.g. `InvalidSpec`).
    pub reason: &'static str,
    /// What is wrong, for people.
    pub message: String,
}

/// What the controller observed about a bus in one reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Members per node.
    pub members: Members,
    /// The tunnel endpoints (and nodes that cannot have one).
    pub endpoints: Endpoints,
    /// The tunnel port in force, if settled.
    pub tunnel_port: Option<u16>,
    /// The node serving each external peer.
    pub serving: Serving,
    /// Why the bus is not ready, if it is not.
    pub problem: Option<Problem>,
}

fn ready_condition(bus: &CanBus, observation: &Observation, now: &Time) -> Condition {
    let (status, reason, message) = match &observation.problem {
        Some(problem) => ("False", problem.reason, problem.message.clone()),
        None => {
            let mut message = format!(
                "{} member slots published; members on {} node(s)",
                bus.spec.max_members,
                observation.members.len()
            );
            if !observation.endpoints.unreachable.is_empty() {
                let nodes: Vec<&str> = observation
                    .endpoints
                    .unreachable
                    .iter()
                    .map(String::as_str)
                    .collect();
                message.push_str(&format!(
                    "; no tunnel endpoint for node(s) without an InternalIP: {}",
                    nodes.join(", ")
                ));
            }
            if !observation.serving.unserved.is_empty() {
                message.push_str(&format!(
                    "; no node can serve external peer(s) {} yet (the bus has no endpoint on \
                     the node they name, or none at all)",
                    observation.serving.unserved.join(", ")
                ));
            }
            ("True", "Published", message)
        }
    };
    let previous = bus
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    // The transition time moves only when the condition's status does.
    let last_transition_time = previous
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: bus.metadata.generation,
        last_transition_time,
    }
}

/// The status `bus` should have after `observation`, at `now`. Conditions other than `Ready` are
/// kept as they are.
pub fn desired_status(bus: &CanBus, observation: &Observation, now: &Time) -> CanBusStatus {
    let mut conditions: Vec<Condition> = bus
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    conditions.retain(|c| c.type_ != READY);
    conditions.push(ready_condition(bus, observation, now));
    CanBusStatus {
        members: observation.members.clone(),
        endpoints: observation.endpoints.endpoints.clone(),
        tunnel_port: observation.tunnel_port,
        external_peers: observation.serving.served.clone(),
        conditions,
    }
}

/// Adds `null` for every key of `old` that `new` lacks, so a merge patch removes it.
fn null_removed(new: &mut Map<String, Value>, field: &str, old: &Value) {
    let Some(old) = old.get(field) else {
        return;
    };
    match (new.get_mut(field), old) {
        (Some(Value::Object(new_map)), Value::Object(old_map)) => {
            for key in old_map.keys() {
                if !new_map.contains_key(key) {
                    new_map.insert(key.clone(), Value::Null);
                }
            }
        }
        (Some(_), _) => {}
        (None, _) => {
            new.insert(field.to_owned(), Value::Null);
        }
    }
}

/// The JSON merge patch (for the `status` subresource) that turns `old` into `new`, or `None`
/// when they are equal. Map entries and fields that `new` drops are sent as `null`.
pub fn status_patch(old: Option<&CanBusStatus>, new: &CanBusStatus) -> Option<Value> {
    if old == Some(new) {
        return None;
    }
    let old = old.map_or(Value::Null, |s| {
        serde_json::to_value(s).unwrap_or(Value::Null)
    });
    let mut status = match serde_json::to_value(new) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    for field in [
        "members",
        "endpoints",
        "tunnelPort",
        "externalPeers",
        "conditions",
    ] {
        null_removed(&mut status, field, &old);
    }
    Some(json!({ "status": status }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use can_dra_cluster::canbus::CanBusSpec;
    use k8s_openapi::jiff::Timestamp;
    use std::collections::BTreeMap;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    fn observation(members: &[(&str, u32)], port: u16) -> Observation {
        let members: Members = members.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect();
        let endpoints = Endpoints {
            endpoints: members
                .keys()
                .map(|n| (n.clone(), format!("10.0.0.1:{port}")))
                .collect(),
            ..Endpoints::default()
        };
        Observation {
            members,
            endpoints,
            tunnel_port: Some(port),
            serving: Serving::default(),
            problem: None,
        }
    }

    #[test]
    fn an_unchanged_status_writes_nothing_and_keeps_the_transition_time() {
        let mut bus = CanBus::new("body", CanBusSpec::new("500k"));
        let first = desired_status(&bus, &observation(&[("a", 1)], 47000), &at(10));
        assert_eq!(first.conditions[0].status, "True");
        bus.status = Some(first.clone());
        let again = desired_status(&bus, &observation(&[("a", 1)], 47000), &at(20));
        assert_eq!(again, first);
        assert_eq!(status_patch(Some(&first), &again), None);
    }

    #[test]
    fn a_node_leaving_is_removed_by_the_patch() {
        let mut bus = CanBus::new("body", CanBusSpec::new("500k"));
        let both = desired_status(&bus, &observation(&[("a", 1), ("b", 2)], 47000), &at(10));
        bus.status = Some(both.clone());
        let one = desired_status(&bus, &observation(&[("a", 1)], 47000), &at(20));
        let patch = status_patch(Some(&both), &one).unwrap();
        assert_eq!(patch["status"]["members"]["b"], Value::Null);
        assert_eq!(patch["status"]["endpoints"]["b"], Value::Null);
        assert_eq!(patch["status"]["members"]["a"], 1);
        // Applying the patch as a merge patch gives exactly the new status.
        let mut merged = serde_json::to_value(&both).unwrap();
        merge(&mut merged, &patch["status"]);
        let merged: CanBusStatus = serde_json::from_value(merged).unwrap();
        assert_eq!(merged, one);
        assert_eq!(merged.members, BTreeMap::from([("a".to_owned(), 1)]));
    }

    #[test]
    fn a_problem_makes_the_bus_not_ready_with_its_reason() {
        let bus = CanBus::new("body", CanBusSpec::new("500k"));
        let mut seen = observation(&[], 47000);
        seen.problem = Some(Problem {
            reason: "TunnelPortConflict",
            message: "spec.tunnelPort 47000 is also the tunnel port of CanBus a".into(),
        });
        let status = desired_status(&bus, &seen, &at(10));
        let ready = &status.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "TunnelPortConflict")
        );
        let patch = status_patch(None, &status).unwrap();
        assert_eq!(patch["status"]["tunnelPort"], 47000);
    }

    #[test]
    fn serving_nodes_are_written_and_removed_and_unserved_peers_are_named() {
        use can_dra_cluster::canbus::ExternalPeerStatus;
        let mut bus = CanBus::new("body", CanBusSpec::new("500k"));
        let mut seen = observation(&[("a", 1)], 47000);
        seen.serving = Serving {
            served: vec![ExternalPeerStatus {
                name: "rack".into(),
                node: "a".into(),
            }],
            unserved: vec!["esp".into()],
        };
        let with = desired_status(&bus, &seen, &at(10));
        assert_eq!(with.external_peers, seen.serving.served);
        assert!(with.conditions[0].message.contains("external peer(s) esp"));
        let patch = status_patch(None, &with).unwrap();
        assert_eq!(
            patch["status"]["externalPeers"],
            serde_json::json!([{"name": "rack", "node": "a"}])
        );
        bus.status = Some(with.clone());
        let without = desired_status(&bus, &observation(&[("a", 1)], 47000), &at(20));
        let patch = status_patch(Some(&with), &without).unwrap();
        assert_eq!(patch["status"]["externalPeers"], Value::Null);
    }

    /// RFC 7386, as the API server applies a merge patch.
    fn merge(target: &mut Value, patch: &Value) {
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p.clone(),
        }
    }
}
