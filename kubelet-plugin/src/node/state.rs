//! The checkpointed state of the node (its schema) and what recovery prunes from it.

use std::collections::BTreeMap;

use can_dra_dataplane::netns::NetnsId;
use dra_kubeletplugin::driver::ClaimUid;
use serde::{Deserialize, Serialize};

use super::member::MemberParams;
use super::namespace::NamespaceOpener;

/// The checkpointed state of the node: every prepared claim, by UID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// Prepared claims by UID.
    #[serde(default)]
    pub claims: BTreeMap<ClaimUid, PreparedClaim>,
}

/// One prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    /// The claim's namespace.
    pub namespace: String,
    /// The claim's name.
    pub name: String,
    /// Its devices, in allocation order.
    pub devices: Vec<PreparedMember>,
    /// The claim's status is not written yet: the write failed, or the daemon stopped between
    /// the checkpoint and the write. A repeated prepare writes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub status_pending: bool,
    /// The status was written since the last checkpoint write (in memory only).
    #[serde(skip)]
    pub status_written_unsaved: bool,
}

/// One device of a prepared claim: where it sits, which bus it joins, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedMember {
    /// The request (`req` or `req/sub`).
    pub request: String,
    /// The pool.
    pub pool: String,
    /// The device in the pool.
    pub device: String,
    /// The share ID of a consumable-capacity allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    /// The node-local bus the member joins.
    pub bus: String,
    /// The member's parameters (everything but its namespace, known only at attach time).
    pub member: MemberParams,
    /// For a member of a cluster-wide bus (a CanBus pool): whether that bus carries CAN FD. Its
    /// mesh on this node is named after the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_fd: Option<bool>,
    /// The fully qualified CDI device id handed to the kubelet.
    pub cdi_device_id: String,
    /// Where the member is attached, once the hook ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
}

/// Where a member was attached: the container's pid and its namespace's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// The pid the hook reported.
    pub pid: u32,
    /// Device number of the namespace's nsfs file.
    pub netns_dev: u64,
    /// Inode number of the namespace's nsfs file.
    pub netns_ino: u64,
}

impl Attachment {
    /// `pid` living in `netns`.
    pub fn new(pid: u32, netns: NetnsId) -> Self {
        Self {
            pid,
            netns_dev: netns.dev,
            netns_ino: netns.ino,
        }
    }

    /// The identity of the namespace it was made in.
    pub fn netns(&self) -> NetnsId {
        NetnsId {
            dev: self.netns_dev,
            ino: self.netns_ino,
        }
    }
}

/// The member id on the node's buses: `<claim uid>/<request>`.
pub fn member_id(claim_uid: &str, request: &str) -> String {
    format!("{claim_uid}/{request}")
}

/// `req` of `req/sub`.
pub(crate) fn main_request(request: &str) -> &str {
    request.split('/').next().unwrap_or(request)
}

/// A checkpointed attachment dropped by [`NodeDriver::recover`](super::NodeDriver::recover),
/// because its pod's namespace is gone (the kernel removed the member's pair and rules with it),
/// is the node's own (a hostNetwork pod let in by an earlier version), or could not be placed
/// again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedAttachment {
    /// The claim.
    pub claim_uid: ClaimUid,
    /// The request of the member.
    pub request: String,
    /// The attachment as it was recorded.
    pub attachment: Attachment,
    /// Why it was dropped.
    pub reason: String,
}

impl NodeState {
    /// The cluster-wide bus pools this node has prepared members of.
    pub fn shared_pools(&self) -> std::collections::BTreeSet<String> {
        self.claims
            .values()
            .flat_map(|claim| &claim.devices)
            .filter(|device| device.shared_fd.is_some())
            .map(|device| device.pool.clone())
            .collect()
    }

    /// Drops every attachment whose pid no longer lives in the recorded namespace (same nsfs
    /// device and inode), and returns what was dropped. A reused pid lives in another
    /// namespace, so it is dropped too.
    pub fn drop_stale_attachments(
        &mut self,
        namespaces: &impl NamespaceOpener,
    ) -> Vec<DroppedAttachment> {
        self.drop_attachments(|attachment| match namespaces.netns_of(attachment.pid) {
            Ok(id) if id == attachment.netns() => None,
            Ok(id) => Some(format!(
                "pid {} now lives in {id}, not net:[{}]",
                attachment.pid, attachment.netns_ino
            )),
            Err(error) => Some(error.to_string()),
        })
    }

    /// Drops every attachment whose namespace is one of the node's own (`node`, see
    /// [`NamespaceOpener::node_namespaces`]): an earlier version let a hostNetwork pod join, and
    /// its pod end would sit among the node's links. Without the attachment the reconcile
    /// removes the member's pair. Returns what was dropped.
    pub fn drop_node_namespace_attachments(&mut self, node: &[NetnsId]) -> Vec<DroppedAttachment> {
        self.drop_attachments(|attachment| {
            let id = attachment.netns();
            node.contains(&id).then(|| {
                format!(
                    "it lives in the node's network namespace {id}; hostNetwork pods cannot \
                     join a bus"
                )
            })
        })
    }

    /// Drops every attachment `why` gives a reason for.
    fn drop_attachments(
        &mut self,
        mut why: impl FnMut(&Attachment) -> Option<String>,
    ) -> Vec<DroppedAttachment> {
        let mut dropped = Vec::new();
        for (uid, claim) in &mut self.claims {
            for device in &mut claim.devices {
                let Some(attachment) = device.attachment else {
                    continue;
                };
                let Some(reason) = why(&attachment) else {
                    continue;
                };
                device.attachment = None;
                dropped.push(DroppedAttachment {
                    claim_uid: uid.clone(),
                    request: device.request.clone(),
                    attachment,
                    reason,
                });
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::node::namespace::SystemNamespaces;

    fn claim_with(attachments: &[(&str, Attachment)]) -> PreparedClaim {
        PreparedClaim {
            namespace: "ns".into(),
            name: "c".into(),
            devices: attachments
                .iter()
                .enumerate()
                .map(|(k, (request, attachment))| PreparedMember {
                    request: (*request).into(),
                    pool: "node".into(),
                    device: format!("body-m{k}"),
                    share_id: None,
                    bus: "body".into(),
                    shared_fd: None,
                    member: MemberParams::new(format!("can{k}")),
                    cdi_device_id: format!("k8s.can.dra.dev/can=uid-{k}"),
                    attachment: Some(*attachment),
                })
                .collect(),
            status_pending: false,
            status_written_unsaved: false,
        }
    }

    fn own_attachment() -> Attachment {
        let pid = std::process::id();
        Attachment::new(pid, SystemNamespaces.netns_of(pid).unwrap())
    }

    #[test]
    fn only_attachments_still_in_their_namespace_survive() {
        let alive = own_attachment();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let dead = Attachment {
            pid: dead_pid,
            ..alive
        };
        let moved = Attachment {
            netns_ino: alive.netns_ino + 1,
            ..alive
        };
        let mut state = NodeState::default();
        state.claims.insert(
            "uid-1".into(),
            claim_with(&[("alive", alive), ("dead", dead), ("moved", moved)]),
        );

        let dropped = state.drop_stale_attachments(&SystemNamespaces);

        let requests: Vec<&str> = dropped.iter().map(|d| d.request.as_str()).collect();
        assert_eq!(requests, ["dead", "moved"]);
        assert!(dropped[0].reason.contains("gone"), "{}", dropped[0].reason);
        assert!(
            dropped[1].reason.contains("now lives in"),
            "{}",
            dropped[1].reason
        );
        let left: Vec<Option<Attachment>> = state.claims["uid-1"]
            .devices
            .iter()
            .map(|d| d.attachment)
            .collect();
        assert_eq!(left, [Some(alive), None, None]);
        // A second pass finds nothing more to drop.
        assert!(state.drop_stale_attachments(&SystemNamespaces).is_empty());
    }
}
