//! The node driver: joins the claim reader, the checkpoint, the CDI writer, the status writer and
//! the data plane behind the [`Driver`] seam the gRPC layer calls, and answers the CDI hook
//! ([`Attacher`]).
//!
//! One noun per module, one lifecycle step per file:
//! - [`state`]: the checkpoint schema (prepared claims, members, attachments).
//! - [`member`]: the one conversion from a resolved claim member to the data plane's member.
//! - [`topology`]: the served slots, their buses and their health.
//! - [`namespace`]: the network namespace of a pid, behind [`NamespaceOpener`].
//! - [`prepare`]: validate and persist ([`PrepareError`]); it never touches the kernel, because
//!   the pod's network namespace does not exist yet.
//! - [`attach`]: the member is created when the CDI hook reports the container's pid
//!   ([`AttachError`]).
//! - [`unprepare`]: undoes both ([`UnprepareError`]).
//! - [`recover`]: after a restart the in-memory bus state is empty: the CDI specs a node reboot
//!   wiped are written again, attachments whose pod namespace is gone are dropped and the kernel
//!   is reconciled against the rest, before serving.
//!
//! Every change to the buses goes through the driver's [`DataPlane`], generic over the data
//! plane's `Kernel` so that unit tests run it over a fake kernel and [`FakeNamespaces`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use can_dra_dataplane::bus::kernel::Kernel;
use can_dra_dataplane::bus::system::SystemKernel;
use dra_kubeletplugin::driver::{
    ClaimRef, ClaimUid, DeviceHealth, Driver, DriverError, PreparedDevice,
};
use tokio::sync::{Mutex, watch};

use crate::claim_status::StatusWriter;
use crate::hook_socket::{AttachRequest, Attacher, Requester};
use crate::inventory::Inventory;
use crate::plane::{DataPlane, PlaneError};
use crate::shared_buses::CanBusReader;
use crate::{cdi::CdiWriter, checkpoint::CheckpointStore, claims::ClaimReader};

pub mod attach;
pub mod member;
pub mod namespace;
pub mod prepare;
pub mod recover;
pub mod state;
pub mod topology;
pub mod unprepare;

pub use attach::AttachError;
pub use member::MemberParams;
pub use namespace::{FakeNamespaces, NamespaceOpener, SystemNamespaces};
pub use prepare::PrepareError;
pub use recover::{HostCan, RecoveryReport};
pub use state::{
    Attachment, DroppedAttachment, NodeState, PreparedClaim, PreparedMember, member_id,
};
pub use topology::physical_controller;
pub use unprepare::UnprepareError;

use topology::Topology;

/// Errors of building a [`NodeDriver`] and of its start-up recovery.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The inventory cannot be turned into slots.
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    /// The checkpoint cannot be read or written.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Reconciling the kernel against the checkpoint failed (or the data plane did not open).
    #[error("reconciling the kernel with the checkpoint: {0}")]
    Reconcile(PlaneError),
}

/// Everything [`NodeDriver::new`] needs.
#[derive(Debug, Clone)]
pub struct NodeParts {
    /// The DRA driver name.
    pub driver: String,
    /// The node name (the pool of node-local devices).
    pub node: String,
    /// What the node publishes at start; [`NodeDriver::apply_inventory`] replaces it later.
    pub inventory: Inventory,
    /// Reads claims.
    pub claims: ClaimReader,
    /// Writes claim status.
    pub status: StatusWriter,
    /// Writes CDI specs.
    pub cdi: CdiWriter,
    /// The checkpoint file.
    pub checkpoint: CheckpointStore,
}

/// The CAN driver of one node, over the data plane's kernel `K` and the namespaces of `N`.
pub struct NodeDriver<K: Kernel = SystemKernel, N = SystemNamespaces> {
    parts: NodeParts,
    topology: std::sync::RwLock<Topology>,
    state: Mutex<NodeState>,
    // Opened by recovery or on first attach: prepare and unprepare of unattached claims need no
    // kernel.
    plane: DataPlane<K>,
    namespaces: Arc<N>,
    health: watch::Sender<Vec<DeviceHealth>>,
    // The cluster-wide bus pools with prepared members, for the tunnels.
    shared_pools: watch::Sender<BTreeSet<String>>,
    // Where members of cluster-wide buses are checked; without it only this node's pools are
    // served.
    shared: Option<CanBusReader>,
}

impl<K: Kernel, N> std::fmt::Debug for NodeDriver<K, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDriver")
            .field("driver", &self.parts.driver)
            .field("node", &self.parts.node)
            .finish_non_exhaustive()
    }
}

impl NodeDriver {
    /// Builds the driver over the host's kernel and processes from the inventory of
    /// [`NodeParts`] and loads the checkpoint.
    pub fn new(parts: NodeParts) -> Result<Self, NodeError> {
        Self::with_data_plane(parts, DataPlane::system(), SystemNamespaces)
    }
}

impl<K: Kernel + Send + 'static, N: NamespaceOpener> NodeDriver<K, N> {
    /// Builds the driver over `plane` and `namespaces` and loads the checkpoint.
    pub fn with_data_plane(
        parts: NodeParts,
        plane: DataPlane<K>,
        namespaces: N,
    ) -> Result<Self, NodeError> {
        let state: NodeState = parts.checkpoint.load()?;
        let topology = Topology::new(&parts.node, parts.inventory.clone())?;
        let (health, _) = watch::channel(Vec::new());
        let (shared_pools, _) = watch::channel(state.shared_pools());
        let driver = Self {
            parts,
            topology: std::sync::RwLock::new(topology),
            state: Mutex::new(state),
            plane,
            namespaces: Arc::new(namespaces),
            health,
            shared_pools,
            shared: None,
        };
        let physical = driver.inventory().physical;
        driver.update_controllers(&physical);
        Ok(driver)
    }

    /// The data plane the driver writes to (the tunnels share it).
    pub fn data_plane(&self) -> &DataPlane<K> {
        &self.plane
    }

    /// Whether the kernel handle of the data plane is open.
    pub fn data_plane_open(&self) -> bool {
        self.plane.is_open()
    }

    /// A copy of the checkpointed state.
    pub async fn state(&self) -> NodeState {
        self.state.lock().await.clone()
    }

    /// The cluster-wide bus pools this node has prepared members of.
    pub async fn shared_pools(&self) -> BTreeSet<String> {
        self.state.lock().await.shared_pools()
    }

    /// Follows [`shared_pools`](Self::shared_pools): a new value after every prepare,
    /// unprepare and recovery that changes it.
    pub fn watch_shared_pools(&self) -> watch::Receiver<BTreeSet<String>> {
        self.shared_pools.subscribe()
    }

    fn publish_shared_pools(&self, state: &NodeState) {
        let pools = state.shared_pools();
        self.shared_pools.send_if_modified(|current| {
            let changed = *current != pools;
            if changed {
                *current = pools;
            }
            changed
        });
    }
}

impl<K: Kernel + Send + 'static, N: NamespaceOpener> Driver for NodeDriver<K, N> {
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Result<HashMap<ClaimUid, Result<Vec<PreparedDevice>, String>>, DriverError> {
        let mut state = self.state.lock().await;
        let mut answers = HashMap::new();
        for claim in claims {
            let answer = self
                .prepare_one(&mut state, &claim)
                .await
                .map_err(|error| error.to_string());
            if let Err(reason) = &answer {
                tracing::warn!(claim = %claim, %reason, "prepare failed");
            }
            answers.insert(claim.uid, answer);
        }
        // Statuses written since the last checkpoint write: record them once for the request.
        if state.claims.values().any(|c| c.status_written_unsaved)
            && let Err(error) = self.parts.checkpoint.save(&*state)
        {
            tracing::warn!(%error, "saving the checkpoint after the status writes failed");
        } else {
            for claim in state.claims.values_mut() {
                claim.status_written_unsaved = false;
            }
        }
        Ok(answers)
    }

    async fn unprepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Result<HashMap<ClaimUid, Result<(), String>>, DriverError> {
        let mut state = self.state.lock().await;
        let mut answers = HashMap::new();
        for claim in claims {
            let answer = self
                .unprepare_one(&mut state, &claim)
                .await
                .map_err(|error| error.to_string());
            if let Err(reason) = &answer {
                tracing::warn!(claim = %claim, %reason, "unprepare failed");
            }
            answers.insert(claim.uid, answer);
        }
        Ok(answers)
    }

    fn health(&self) -> watch::Receiver<Vec<DeviceHealth>> {
        self.health.subscribe()
    }
}

impl<K: Kernel + Send + 'static, N: NamespaceOpener> Attacher for NodeDriver<K, N> {
    type Error = AttachError;

    async fn attach(
        &self,
        request: AttachRequest,
        requester: Requester,
    ) -> Result<String, AttachError> {
        self.attach_member(request, requester).await
    }
}

#[cfg(test)]
mod tests;
