//! Attach: the CDI hook reports a container's pid, and the prepared member joins its bus inside
//! that pid's network namespace. A second container of the same pod finds it attached; a new
//! sandbox (another namespace) gets it afresh; a hook that gave up leaves nothing behind.

use can_dra_dataplane::bus::BusError;
use can_dra_dataplane::bus::kernel::Kernel;
use can_dra_dataplane::bus::model::NetnsRef;
use can_dra_dataplane::netns::{NetnsError, NetnsId};

use super::NodeDriver;
use super::namespace::NamespaceOpener;
use super::state::{Attachment, member_id};
use crate::checkpoint::CheckpointError;
use crate::hook_socket::{AttachRequest, Requester};
use crate::plane::PlaneError;

/// Why a member was not attached. The hook hands the message to the container runtime, which
/// refuses to start the container.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The hook is no longer waiting (its deadline passed or it closed its connection), before
    /// the attach or while it ran (then it was rolled back).
    #[error("not attached: {0}")]
    HookGone(String),
    /// The claim device is not prepared on this node.
    #[error(
        "claim {claim_uid} device {pool}/{device} is not prepared on this node; refusing to \
         start the container without its CAN bus"
    )]
    NotPrepared {
        /// The claim.
        claim_uid: String,
        /// The pool.
        pool: String,
        /// The device.
        device: String,
    },
    /// The device was prepared, but its slot is no longer served.
    #[error("device {pool}/{device} is no longer published by this node")]
    NotPublished {
        /// The pool.
        pool: String,
        /// The device.
        device: String,
    },
    /// The container's process is gone (it exited before its bus was attached).
    #[error("process {pid} is gone, and with it the container's network namespace: {source}")]
    ProcessGone {
        /// The pid the hook reported.
        pid: u32,
        /// The underlying error.
        #[source]
        source: NetnsError,
    },
    /// The process's namespace went away while the member was made.
    #[error("the network namespace of process {pid} is gone (the container exited): {source}")]
    NamespaceGone {
        /// The pid the hook reported.
        pid: u32,
        /// The underlying error.
        #[source]
        source: BusError,
    },
    /// The process's network namespace cannot be used for another reason.
    #[error("process {pid}: {source}")]
    Namespace {
        /// The pid the hook reported.
        pid: u32,
        /// The underlying error.
        #[source]
        source: NetnsError,
    },
    /// The process lives in the node's own network namespace (a hostNetwork pod).
    #[error(
        "hostNetwork pods cannot join a bus: pid {pid} lives in the node's network namespace \
         {netns}, where the driver keeps its own links; run the pod without hostNetwork"
    )]
    HostNetwork {
        /// The pid the hook reported.
        pid: u32,
        /// The node's namespace.
        netns: NetnsId,
    },
    /// The data plane refused or failed.
    #[error(transparent)]
    DataPlane(#[from] PlaneError),
    /// The hook gave up while the member was made, and removing it again failed.
    #[error("{why}, and rolling the attach back failed: {source}")]
    RollbackFailed {
        /// Why the hook is gone.
        why: String,
        /// The underlying error.
        #[source]
        source: BusError,
    },
    /// The member is attached, but the checkpoint could not record it.
    #[error("member attached but the checkpoint failed: {0}")]
    Checkpoint(#[source] CheckpointError),
}

impl AttachError {
    /// Whether the container is gone: its process exited or its namespace vanished. The
    /// container never runs, so nothing needs repairing.
    pub fn container_gone(&self) -> bool {
        matches!(self, Self::ProcessGone { .. } | Self::NamespaceGone { .. })
    }
}

impl From<BusError> for AttachError {
    fn from(error: BusError) -> Self {
        Self::DataPlane(error.into())
    }
}

/// What the data plane did for one attach.
enum AttachOutcome {
    /// The member is in the namespace: the message, and where.
    Attached(String, Attachment),
    /// The hook gave up while the member was made, so it was removed again: why.
    RolledBack(String),
}

impl<K: Kernel + Send + 'static, N: NamespaceOpener> NodeDriver<K, N> {
    /// Attaches the member of `request` in the namespace of its pid; see the [module
    /// docs](self).
    pub(super) async fn attach_member(
        &self,
        request: AttachRequest,
        requester: Requester,
    ) -> Result<String, AttachError> {
        let mut state = self.state.lock().await;
        // Waiting for the lock can take long (a stopped daemon, a large prepare).
        if let Some(why) = requester.gone() {
            return Err(AttachError::HookGone(why));
        }
        let Some(member) = state
            .claims
            .get(&request.claim_uid)
            .and_then(|c| {
                c.devices
                    .iter()
                    .find(|d| d.pool == request.pool && d.device == request.device)
            })
            .cloned()
        else {
            return Err(AttachError::NotPrepared {
                claim_uid: request.claim_uid,
                pool: request.pool,
                device: request.device,
            });
        };
        let Some(slot) = self.slot_of(&member) else {
            return Err(AttachError::NotPublished {
                pool: member.pool,
                device: member.device,
            });
        };
        let id = member_id(&request.claim_uid, &member.request);
        let pid = request.pid;
        let previous = member.attachment;
        let namespaces = self.namespaces.clone();
        let outcome = self
            .plane
            .run(move |buses| {
                let current = namespaces.netns_of(pid).map_err(|source| match source {
                    NetnsError::Open { .. } => AttachError::ProcessGone { pid, source },
                    source => AttachError::Namespace { pid, source },
                })?;
                if namespaces.node_namespaces().contains(&current) {
                    return Err(AttachError::HostNetwork {
                        pid,
                        netns: current,
                    });
                }
                let attachment = Attachment::new(pid, current);
                let joined = buses
                    .state()
                    .bus(&slot.bus)
                    .is_some_and(|b| b.member(&id).is_some());
                let same_netns = previous.is_some_and(|p| p.netns() == current);
                if joined && same_netns {
                    return Ok(AttachOutcome::Attached(
                        format!("already attached in {current}"),
                        attachment,
                    ));
                }
                if joined {
                    // A new sandbox: the old namespace (and the pod end with it) is gone.
                    buses.leave(&slot.bus, &id)?;
                }
                if buses.state().bus(&slot.bus).is_none() {
                    buses.add_bus(slot.spec.clone())?;
                }
                let spec = member.member.spec(id.clone(), NetnsRef::Pid(pid));
                buses.join(&slot.bus, spec).map_err(|source| match source {
                    BusError::NamespaceGone { .. } => AttachError::NamespaceGone { pid, source },
                    source => source.into(),
                })?;
                // The hook may have given up while the member was made: then its container
                // never runs, and nothing of the attach may stay.
                if let Some(why) = requester.gone() {
                    return match buses.leave(&slot.bus, &id) {
                        Ok(()) => Ok(AttachOutcome::RolledBack(why)),
                        Err(source) => Err(AttachError::RollbackFailed { why, source }),
                    };
                }
                let verb = if previous.is_some() {
                    "re-attached"
                } else {
                    "attached"
                };
                Ok(AttachOutcome::Attached(
                    format!(
                        "{verb} {} on bus {} in {current}",
                        member.member.interface, slot.bus
                    ),
                    attachment,
                ))
            })
            .await?;
        let (outcome, attachment) = match outcome {
            AttachOutcome::Attached(message, attachment) => (Ok(message), Some(attachment)),
            AttachOutcome::RolledBack(why) => {
                tracing::warn!(reason = %why, "attach rolled back: the hook has given up");
                (Err(AttachError::HookGone(why)), None)
            }
        };
        if let Some(entry) = state.claims.get_mut(&request.claim_uid) {
            for d in entry
                .devices
                .iter_mut()
                .filter(|d| d.pool == request.pool && d.device == request.device)
            {
                d.attachment = attachment;
            }
        }
        // An old attachment the roll-back replaced is gone too: the checkpoint says so.
        if attachment.is_some() || previous.is_some() {
            self.parts
                .checkpoint
                .save(&*state)
                .map_err(AttachError::Checkpoint)?;
        }
        outcome
    }
}
