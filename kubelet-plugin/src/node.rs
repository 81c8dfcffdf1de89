//! The node driver: joins the claim reader, the checkpoint, the CDI writer, the status writer and
//! the data plane behind the [`Driver`] seam the gRPC layer calls, and answers the CDI hook
//! ([`Attacher`]).
//!
//! Prepare validates and persists; it never touches the kernel, because the pod's network
//! namespace does not exist yet. The member is created later, when the CDI hook reports the
//! container's pid ([`NodeDriver::attach`]). Unprepare undoes both.
//!
//! After a restart the in-memory bus state is empty: [`NodeDriver::recover`] re-creates the CDI
//! specs a node reboot wiped, drops attachments whose pod namespace is gone and reconciles the
//! kernel against the rest, before serving.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use can_dra_api::{FrameFormat, ResolvedMember, ShapingDirection};
use can_dra_cluster::naming::is_bus_pool;
use can_dra_dataplane::bus::kernel::KernelError;
use can_dra_dataplane::bus::model::DesiredState;
use can_dra_dataplane::bus::model::{Access, BusSpec, CanFilter, MemberSpec, NetnsRef, Shaping};
use can_dra_dataplane::bus::system::SystemKernel;
use can_dra_dataplane::bus::{BusError, Buses, ReconcileReport};
use can_dra_dataplane::link::{CanController, CanState};
use can_dra_dataplane::netns::{Netns, NetnsId};
use dra_kubeletplugin::driver::{
    ClaimRef, ClaimUid, DeviceHealth, Driver, DriverError, HealthStatus, PreparedDevice,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use crate::cdi::{CdiWriter, ClaimDevice};
use crate::checkpoint::CheckpointStore;
use crate::claims::{ClaimReader, KnownDevices};
use crate::hook::{AttachRequest, Attacher, Requester};
use crate::inventory::{ControllerState, Inventory, PhysicalController, SlotBus};
use crate::shared_buses::CanBusReader;
use crate::status::{DeviceReady, StatusWriter};

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

/// A [`MemberSpec`] without its id and namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberParams {
    /// The interface name inside the pod.
    pub interface: String,
    /// Whether the member's link carries CAN FD frames.
    pub fd: bool,
    /// Whether the member may transmit.
    pub access: Access,
    /// Frames the member may send; empty allows everything.
    #[serde(default)]
    pub transmit_allow: Vec<CanFilter>,
    /// Frames delivered to the member; empty delivers everything.
    #[serde(default)]
    pub receive_filters: Vec<CanFilter>,
    /// Shaping towards the pod.
    #[serde(default)]
    pub rx_shaping: Option<Shaping>,
    /// Shaping of what the pod sends.
    #[serde(default)]
    pub tx_shaping: Option<Shaping>,
}

impl MemberParams {
    /// The parameters of a resolved member on a bus that is (or is not) FD.
    pub fn from_resolved(member: &ResolvedMember, bus_fd: bool) -> Self {
        let filters = |list: &[can_dra_api::CanFilter]| -> Vec<CanFilter> {
            list.iter()
                .map(|f| CanFilter {
                    id: f.id,
                    mask: f.mask,
                    extended: f.extended,
                    invert: f.invert,
                })
                .collect()
        };
        let mut access = match member.access {
            can_dra_api::Access::ReadWrite => Access::ReadWrite,
            can_dra_api::Access::ListenOnly => Access::ListenOnly,
        };
        // An explicit but empty allow-list permits nothing, while the data plane reads an empty
        // list as "everything": say it as listen-only instead.
        if member.transmit_allow.as_ref().is_some_and(Vec::is_empty) {
            access = Access::ListenOnly;
        }
        Self {
            interface: member.interface_name.as_str().to_owned(),
            fd: match member.frame_format {
                Some(FrameFormat::Fd) => true,
                Some(FrameFormat::Classic) => false,
                None => bus_fd,
            },
            access,
            transmit_allow: filters(member.transmit_allow.as_deref().unwrap_or_default()),
            receive_filters: filters(&member.receive_filters),
            rx_shaping: shaping(&member.shaping.rx),
            tx_shaping: shaping(&member.shaping.tx),
        }
    }

    /// The full member spec for a namespace.
    pub fn spec(&self, id: impl Into<String>, netns: NetnsRef) -> MemberSpec {
        MemberSpec {
            id: id.into(),
            netns,
            interface: self.interface.clone(),
            fd: self.fd,
            access: self.access,
            transmit_allow: self.transmit_allow.clone(),
            receive_filters: self.receive_filters.clone(),
            rx_shaping: self.rx_shaping,
            tx_shaping: self.tx_shaping,
        }
    }
}

fn shaping(direction: &ShapingDirection) -> Option<Shaping> {
    let micros = |d: std::time::Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    let shaping = Shaping {
        bitrate: direction.bitrate.map(|b| b.bits_per_second()),
        data_bitrate: direction.data_bitrate.map(|b| b.bits_per_second()),
        delay_us: micros(direction.delay),
        jitter_us: micros(direction.jitter),
        loss_ppm: direction.loss.millionths(),
        duplicate_ppm: direction.duplicate.millionths(),
    };
    (!shaping.is_neutral()).then_some(shaping)
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

/// The member id on the node's buses: `<claim uid>/<request>`.
pub fn member_id(claim_uid: &str, request: &str) -> String {
    format!("{claim_uid}/{request}")
}

/// A physical controller as the inventory publishes it, from what netlink reports (a link
/// that is down is `stopped`).
pub fn physical_controller(found: &CanController) -> PhysicalController {
    let rate = |bps: Option<u32>| bps.and_then(can_dra_api::Bitrate::from_bits_per_second);
    PhysicalController {
        interface: found.name.clone(),
        controller: found.driver.clone().unwrap_or_else(|| "unknown".to_owned()),
        bitrate: rate(found.bitrate),
        data_bitrate: rate(found.data_bitrate),
        fd: found.fd,
        // A link that is administratively down carries no frames whatever its kind; vcan
        // stand-ins report no CAN state at all, so this is their only state.
        state: match found.state {
            _ if !found.up => ControllerState::Stopped,
            Some(CanState::ErrorActive) => ControllerState::ErrorActive,
            Some(CanState::ErrorWarning) => ControllerState::ErrorWarning,
            Some(CanState::ErrorPassive) => ControllerState::ErrorPassive,
            Some(CanState::BusOff) => ControllerState::BusOff,
            Some(CanState::Stopped) => ControllerState::Stopped,
            Some(CanState::Sleeping) => ControllerState::Sleeping,
            Some(CanState::Other(_)) | None => ControllerState::Unknown,
        },
        slots: 0,
    }
}

/// Errors of building a [`NodeDriver`].
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The inventory cannot be turned into slots.
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    /// The checkpoint cannot be read or written.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The kernel handle of the data plane cannot be opened.
    #[error("opening the data plane: {0}")]
    DataPlaneOpen(KernelError),
    /// Reconciling the kernel against the checkpoint failed.
    #[error("reconciling the kernel with the checkpoint: {0}")]
    Reconcile(BusError),
    /// The blocking data plane task failed, or its lock is poisoned.
    #[error("the data plane task failed: {0}")]
    DataPlaneTask(String),
}

/// A checkpointed attachment dropped by [`NodeDriver::recover`], because its pod's namespace is
/// gone (the kernel removed the member's pair and rules with it), is the node's own (a
/// hostNetwork pod let in by an earlier version), or could not be placed again.
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

/// What [`NodeDriver::recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Attachments removed from the checkpoint.
    pub dropped: Vec<DroppedAttachment>,
    /// The kernel reconcile, when the data plane was opened for it.
    pub reconciled: Option<ReconcileReport>,
    /// Claims whose CDI spec was missing or different and was written again (after a node
    /// reboot: the CDI directory is a tmpfs, the checkpoint is not).
    pub cdi_restored: Vec<ClaimUid>,
}

/// Whether the host kernel may hold CAN state of the driver, which decides whether
/// [`NodeDriver::recover_on`] reconciles even without attachments (to remove orphans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCan {
    /// CAN controllers were found, or the CAN modules the driver uses are loaded.
    Present,
    /// Nothing of CAN in this kernel: the driver cannot have left anything behind.
    Absent,
}

impl HostCan {
    /// Looks at the inventory and at the kernel: the CAN core (`/proc/net/can`), can-gw or
    /// vxcan loaded means the driver may have created links or rules in an earlier run.
    pub fn probe(inventory: &Inventory) -> Self {
        let loaded = ["/proc/net/can", "/sys/module/can_gw", "/sys/module/vxcan"]
            .iter()
            .any(|path| std::path::Path::new(path).exists());
        if loaded || !inventory.physical.is_empty() {
            Self::Present
        } else {
            Self::Absent
        }
    }
}

impl NodeState {
    /// Drops every attachment whose pid no longer lives in the recorded namespace (same nsfs
    /// device and inode), and returns what was dropped. A reused pid lives in another
    /// namespace, so it is dropped too.
    pub fn drop_stale_attachments(&mut self) -> Vec<DroppedAttachment> {
        let mut dropped = Vec::new();
        for (uid, claim) in &mut self.claims {
            for device in &mut claim.devices {
                let Some(attachment) = device.attachment else {
                    continue;
                };
                let reason = match Netns::from_pid(attachment.pid) {
                    Ok(netns) => {
                        let id = netns.id();
                        if id.dev == attachment.netns_dev && id.ino == attachment.netns_ino {
                            continue;
                        }
                        format!(
                            "pid {} now lives in {id}, not net:[{}]",
                            attachment.pid, attachment.netns_ino
                        )
                    }
                    Err(error) => error.to_string(),
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

impl NodeState {
    /// Drops every attachment whose namespace is the node's own (see [`node_namespaces`]): an
    /// earlier version let a hostNetwork pod join, and its pod end would sit among the node's
    /// links. Without the attachment the reconcile removes the member's pair. Returns what was
    /// dropped.
    pub fn drop_node_namespace_attachments(&mut self) -> Vec<DroppedAttachment> {
        let node = node_namespaces();
        let mut dropped = Vec::new();
        for (uid, claim) in &mut self.claims {
            for device in &mut claim.devices {
                let Some(attachment) = device.attachment else {
                    continue;
                };
                let id = NetnsId {
                    dev: attachment.netns_dev,
                    ino: attachment.netns_ino,
                };
                if !node.contains(&id) {
                    continue;
                }
                device.attachment = None;
                dropped.push(DroppedAttachment {
                    claim_uid: uid.clone(),
                    request: device.request.clone(),
                    attachment,
                    reason: format!(
                        "it lives in the node's network namespace {id}; hostNetwork pods cannot \
                         join a bus"
                    ),
                });
            }
        }
        dropped
    }
}

/// The node's own network namespaces: the daemon's (where its member host ends and tunnel
/// links live) and that of the host's init process.
fn node_namespaces() -> Vec<NetnsId> {
    [std::process::id(), 1]
        .into_iter()
        .filter_map(|pid| Netns::from_pid(pid).ok())
        .map(|netns| netns.id())
        .collect()
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

/// The node's bus, as the data plane is told about it on first use.
#[derive(Debug, Clone)]
struct SlotInfo {
    bus: String,
    spec: BusSpec,
}

/// The slots the driver serves, rebuilt by [`NodeDriver::apply_inventory`] when the node's
/// adapters change.
#[derive(Debug, Clone, Default)]
struct Topology {
    inventory: Inventory,
    /// Devices a new claim may be prepared on: exactly the published ones.
    known: KnownDevices,
    /// Published slots, plus the slots of prepared claims whose controller went away (kept so
    /// that their health stays reported and their members can still be unprepared).
    slots: BTreeMap<String, SlotInfo>,
}

/// The slot table of an inventory: every slot's bus and how the data plane should build it.
fn slot_table(
    node: &str,
    inventory: &Inventory,
) -> Result<(KnownDevices, BTreeMap<String, SlotInfo>), NodeError> {
    let mut known = KnownDevices::default();
    let mut slots = BTreeMap::new();
    for slot in inventory.slots()? {
        known.insert(node, slot.device.clone());
        let (bus, spec) = match &slot.bus {
            SlotBus::Physical { interface } => {
                let fd = inventory
                    .physical
                    .iter()
                    .any(|c| &c.interface == interface && c.fd);
                let mut spec = BusSpec::new(interface.clone());
                spec.physical = Some(interface.clone());
                spec.fd = fd;
                (interface.clone(), spec)
            }
            SlotBus::Virtual { name } => {
                let fd = inventory
                    .virtual_buses
                    .iter()
                    .any(|b| &b.name == name && b.fd);
                let mut spec = BusSpec::new(name.clone());
                spec.fd = fd;
                (name.clone(), spec)
            }
        };
        slots.insert(slot.device, SlotInfo { bus, spec });
    }
    Ok((known, slots))
}

/// The CAN driver of one node.
pub struct NodeDriver {
    parts: NodeParts,
    topology: std::sync::RwLock<Topology>,
    state: Mutex<NodeState>,
    // Opened by recovery or on first attach: prepare and unprepare of unattached claims need no
    // kernel.
    buses: Arc<std::sync::Mutex<Option<Buses<SystemKernel>>>>,
    health: watch::Sender<Vec<DeviceHealth>>,
    // Where members of cluster-wide buses are checked; without it only this node's pools are
    // served.
    shared: Option<CanBusReader>,
}

impl std::fmt::Debug for NodeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDriver")
            .field("driver", &self.parts.driver)
            .field("node", &self.parts.node)
            .finish_non_exhaustive()
    }
}

impl NodeDriver {
    /// Builds the driver from the inventory of [`NodeParts`] and loads the checkpoint.
    pub fn new(parts: NodeParts) -> Result<Self, NodeError> {
        let state: NodeState = parts.checkpoint.load()?;
        let (known, slots) = slot_table(&parts.node, &parts.inventory)?;
        let (health, _) = watch::channel(Vec::new());
        let topology = Topology {
            inventory: parts.inventory.clone(),
            known,
            slots,
        };
        let driver = Self {
            parts,
            topology: std::sync::RwLock::new(topology),
            state: Mutex::new(state),
            buses: Arc::new(std::sync::Mutex::new(None)),
            health,
            shared: None,
        };
        let physical = driver.inventory().physical;
        driver.update_controllers(&physical);
        Ok(driver)
    }

    fn topology(&self) -> std::sync::RwLockReadGuard<'_, Topology> {
        // The lock is never held across a panic-prone section; a poisoned one is still sound.
        self.topology
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn slot(&self, device: &str) -> Option<SlotInfo> {
        self.topology().slots.get(device).cloned()
    }

    /// The inventory the driver serves now.
    pub fn inventory(&self) -> Inventory {
        self.topology().inventory.clone()
    }

    /// The devices the driver serves now: the published slots plus those kept for prepared
    /// claims whose controller went away.
    pub fn served_devices(&self) -> Vec<String> {
        self.topology().slots.keys().cloned().collect()
    }

    /// Serves `inventory` from now on (after an adapter appeared, went away or changed): new
    /// slots can be prepared at once, and the health feed follows. Slots of a vanished controller
    /// that hold prepared claims are kept (Unhealthy) until those claims are unprepared; returns
    /// their device names.
    pub async fn apply_inventory(&self, inventory: Inventory) -> Result<Vec<String>, NodeError> {
        // The state lock orders this against prepare and unprepare.
        let state = self.state.lock().await;
        let (mut known, mut slots) = slot_table(&self.parts.node, &inventory)?;
        if self.shared.is_some() {
            known.accept_shared_pools();
        }
        let mut kept = Vec::new();
        {
            let old = self.topology();
            let prepared = state
                .claims
                .values()
                .flat_map(|c| &c.devices)
                .filter(|d| d.pool == self.parts.node);
            for device in prepared {
                if slots.contains_key(&device.device) {
                    continue;
                }
                if let Some(info) = old.slots.get(&device.device) {
                    slots.insert(device.device.clone(), info.clone());
                    kept.push(device.device.clone());
                }
            }
        }
        let physical = inventory.physical.clone();
        *self
            .topology
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Topology {
            inventory,
            known,
            slots,
        };
        drop(state);
        self.update_controllers(&physical);
        kept.sort();
        kept.dedup();
        Ok(kept)
    }

    /// Drops the slots kept for a vanished controller once no prepared claim holds them, so
    /// that they leave the health feed too.
    fn forget_unused_slots(&self, state: &NodeState) {
        let physical = {
            let mut topology = self
                .topology
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Topology {
                inventory,
                known,
                slots,
            } = &mut *topology;
            let before = slots.len();
            slots.retain(|device, _| {
                known.contains(&self.parts.node, device)
                    || state
                        .claims
                        .values()
                        .flat_map(|c| &c.devices)
                        .any(|d| d.pool == self.parts.node && &d.device == device)
            });
            if slots.len() == before {
                return;
            }
            inventory.physical.clone()
        };
        self.update_controllers(&physical);
    }

    /// Also serves members of cluster-wide buses (devices `m<N>` of pools `canbus/<bus>`),
    /// checking each against its CanBus read through `reader` when the claim is prepared.
    pub fn with_shared_buses(mut self, reader: CanBusReader) -> Self {
        self.topology
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .known
            .accept_shared_pools();
        self.shared = Some(reader);
        self
    }

    /// The cluster-wide bus pools this node has prepared members of.
    pub async fn shared_pools(&self) -> std::collections::BTreeSet<String> {
        self.state
            .lock()
            .await
            .claims
            .values()
            .flat_map(|claim| &claim.devices)
            .filter(|device| device.shared_fd.is_some())
            .map(|device| device.pool.clone())
            .collect()
    }

    /// The bus a prepared member joins: a node-local slot's bus, or the mesh of a cluster-wide
    /// bus.
    fn slot_of(&self, member: &PreparedMember) -> Option<SlotInfo> {
        match member.shared_fd {
            Some(fd) => {
                let mut spec = BusSpec::new(member.bus.clone());
                spec.fd = fd;
                Some(SlotInfo {
                    bus: member.bus.clone(),
                    spec,
                })
            }
            None => self.slot(&member.device),
        }
    }

    /// The bus of an allocated device and whether it is a cluster-wide one (then its FD flag).
    async fn bus_of(
        &self,
        claim: &ClaimRef,
        pool: &str,
        device: &str,
    ) -> Result<(SlotInfo, Option<bool>), String> {
        if !is_bus_pool(pool) {
            let slot = self
                .slot(device)
                .filter(|_| pool == self.parts.node)
                .ok_or_else(|| {
                    format!("claim {claim}: device {pool}/{device} is not served by this node")
                })?;
            return Ok((slot, None));
        }
        let reader = self.shared.as_ref().ok_or_else(|| {
            format!(
                "claim {claim}: device {pool}/{device} belongs to a cluster-wide bus, which this \
                 daemon does not serve"
            )
        })?;
        let bus = reader
            .by_pool(pool)
            .await
            .map_err(|e| format!("claim {claim}: device {pool}/{device}: {e}"))?
            .ok_or_else(|| {
                format!("claim {claim}: device {pool}/{device}: no CanBus publishes pool {pool}")
            })?;
        bus.check_member_device(device)
            .map_err(|e| format!("claim {claim}: {e}"))?;
        let mut spec = BusSpec::new(pool);
        spec.fd = bus.spec.fd;
        Ok((
            SlotInfo {
                bus: pool.to_owned(),
                spec,
            },
            Some(bus.spec.fd),
        ))
    }

    /// Runs `work` on the node's data plane (opened on first use) on a blocking thread. The
    /// tunnels use it too: they share the buses with the members.
    pub async fn with_data_plane<T, F>(&self, work: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(&mut Buses<SystemKernel>) -> Result<T, String> + Send + 'static,
    {
        self.with_buses(work).await
    }

    /// Recomputes the health feed from the controllers found now: slots of a controller that is
    /// bus-off, down or gone are Unhealthy; virtual bus slots are Healthy.
    pub fn update_controllers(&self, found: &[PhysicalController]) {
        let report: Vec<DeviceHealth> = self
            .topology()
            .slots
            .iter()
            .map(|(device, slot)| {
                let (status, message) = match &slot.spec.physical {
                    None => (HealthStatus::Healthy, String::new()),
                    Some(interface) => match found.iter().find(|c| &c.interface == interface) {
                        None => (
                            HealthStatus::Unhealthy,
                            format!("controller {interface} is gone"),
                        ),
                        Some(c) if c.state == ControllerState::BusOff => (
                            HealthStatus::Unhealthy,
                            format!("controller {interface} is bus-off"),
                        ),
                        Some(c) if c.state == ControllerState::Stopped => (
                            HealthStatus::Unhealthy,
                            format!("controller {interface} is down"),
                        ),
                        Some(_) => (HealthStatus::Healthy, String::new()),
                    },
                };
                DeviceHealth {
                    pool: self.parts.node.clone(),
                    device: device.clone(),
                    status,
                    message,
                }
            })
            .collect();
        self.health.send_if_modified(|current| {
            if *current == report {
                false
            } else {
                *current = report;
                true
            }
        });
    }

    /// A copy of the checkpointed state.
    pub async fn state(&self) -> NodeState {
        self.state.lock().await.clone()
    }

    fn answer(prepared: &PreparedClaim) -> Vec<PreparedDevice> {
        prepared
            .devices
            .iter()
            .map(|d| PreparedDevice {
                request_names: vec![main_request(&d.request).to_owned()],
                pool_name: d.pool.clone(),
                device_name: d.device.clone(),
                cdi_device_ids: vec![d.cdi_device_id.clone()],
                share_id: d.share_id.clone(),
            })
            .collect()
    }

    async fn prepare_one(
        &self,
        state: &mut NodeState,
        claim: &ClaimRef,
    ) -> Result<Vec<PreparedDevice>, String> {
        if let Some(prepared) = state.claims.get_mut(&claim.uid) {
            tracing::debug!(claim = %claim, "already prepared");
            if prepared.status_pending && self.write_status(claim, prepared, None).await {
                prepared.status_pending = false;
                prepared.status_written_unsaved = true;
            }
            return Ok(Self::answer(prepared));
        }
        let known = self.topology().known.clone();
        let allocated = self
            .parts
            .claims
            .allocated(claim, &known)
            .await
            .map_err(|e| e.to_string())?;
        let mut devices = Vec::new();
        let mut cdi_devices = Vec::new();
        for member in &allocated.members {
            let (slot, shared_fd) = self.bus_of(claim, &member.pool, &member.device).await?;
            let params = MemberParams::from_resolved(&member.member, slot.spec.fd);
            cdi_devices.push(ClaimDevice {
                request: main_request(&member.request).to_owned(),
                pool: member.pool.clone(),
                device: member.device.clone(),
                interface_name: params.interface.clone(),
            });
            devices.push(PreparedMember {
                request: member.request.clone(),
                pool: member.pool.clone(),
                device: member.device.clone(),
                share_id: member.share_id.clone(),
                bus: slot.bus.clone(),
                member: params,
                shared_fd,
                cdi_device_id: String::new(),
                attachment: None,
            });
        }
        let ids = self
            .parts
            .cdi
            .write(&claim.uid, &cdi_devices)
            .map_err(|e| format!("claim {claim}: {e}"))?;
        for (device, id) in devices.iter_mut().zip(ids) {
            device.cdi_device_id = id;
        }
        let prepared = PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            devices,
            status_pending: true,
            status_written_unsaved: false,
        };
        state.claims.insert(claim.uid.clone(), prepared.clone());
        if let Err(error) = self.parts.checkpoint.save(state) {
            // Undo: no CDI spec and no entry for a claim the kubelet will be told failed.
            state.claims.remove(&claim.uid);
            if let Err(undo) = self.parts.cdi.remove(&claim.uid) {
                tracing::warn!(claim = %claim, error = %undo, "removing the CDI spec failed");
            }
            return Err(format!("claim {claim}: {error}"));
        }
        if self
            .write_status(claim, &prepared, Some(&allocated.claim))
            .await
            && let Some(entry) = state.claims.get_mut(&claim.uid)
        {
            // Saved with the next checkpoint write (at the latest at the end of the request).
            entry.status_pending = false;
            entry.status_written_unsaved = true;
        }
        tracing::info!(claim = %claim, devices = prepared.devices.len(), "claim prepared");
        Ok(Self::answer(&prepared))
    }

    /// Writes the claim's status (Ready, with each member's interface name); a failure is
    /// logged and the claim stays usable. Whether it was written.
    async fn write_status(
        &self,
        claim: &ClaimRef,
        prepared: &PreparedClaim,
        previous: Option<&k8s_openapi::api::resource::v1::ResourceClaim>,
    ) -> bool {
        let ready: Vec<DeviceReady> = prepared
            .devices
            .iter()
            .map(|d| DeviceReady {
                share_id: d.share_id.clone(),
                ..DeviceReady::new(&d.pool, &d.device, &d.member.interface)
            })
            .collect();
        match self.parts.status.mark_ready(claim, &ready, previous).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(claim = %claim, %error, "writing the claim status failed");
                false
            }
        }
    }

    async fn unprepare_one(&self, state: &mut NodeState, claim: &ClaimRef) -> Result<(), String> {
        if let Some(prepared) = state.claims.get(&claim.uid).cloned() {
            for device in prepared.devices.iter().filter(|d| d.attachment.is_some()) {
                let id = member_id(&claim.uid, &device.request);
                self.leave(&device.bus, &id)
                    .await
                    .map_err(|e| format!("claim {claim}: leaving bus {}: {e}", device.bus))?;
                if let Some(entry) = state.claims.get_mut(&claim.uid) {
                    for d in entry
                        .devices
                        .iter_mut()
                        .filter(|d| d.device == device.device)
                    {
                        d.attachment = None;
                    }
                }
            }
        }
        self.parts
            .cdi
            .remove(&claim.uid)
            .map_err(|e| format!("claim {claim}: {e}"))?;
        self.parts
            .status
            .clear(claim)
            .await
            .map_err(|e| e.to_string())?;
        if state.claims.remove(&claim.uid).is_some() {
            self.parts
                .checkpoint
                .save(state)
                .map_err(|e| format!("claim {claim}: {e}"))?;
            self.forget_unused_slots(state);
        }
        tracing::info!(claim = %claim, "claim unprepared");
        Ok(())
    }

    /// Whether the kernel handle of the data plane is open.
    pub fn data_plane_open(&self) -> bool {
        self.buses.lock().map(|b| b.is_some()).unwrap_or(false)
    }

    /// Start-up reconcile, before serving: see [`recover_on`](Self::recover_on), with the
    /// host probed by [`HostCan::probe`].
    pub async fn recover(&self) -> Result<RecoveryReport, NodeError> {
        self.recover_on(HostCan::probe(&self.inventory())).await
    }

    /// Re-creates the CDI spec of every checkpointed claim that lacks it (see
    /// [`RecoveryReport::cdi_restored`]), drops checkpointed attachments whose namespace is
    /// gone or is the node's own, then reconciles the kernel against the remaining ones (repairing what is missing,
    /// removing orphans) so that the buses are known again and a hook call for an attached pod
    /// finds it attached. The kernel is opened only when an attachment remains or the host has
    /// CAN. The checkpoint is saved either way.
    pub async fn recover_on(&self, host: HostCan) -> Result<RecoveryReport, NodeError> {
        let mut state = self.state.lock().await;
        self.remove_stale_temporaries();
        let mut dropped = state.drop_stale_attachments();
        dropped.extend(state.drop_node_namespace_attachments());
        let mut report = RecoveryReport {
            dropped,
            reconciled: None,
            cdi_restored: self.restore_cdi_specs(&state),
        };
        for dropped in &report.dropped {
            tracing::info!(
                claim = %dropped.claim_uid,
                request = %dropped.request,
                pid = dropped.attachment.pid,
                reason = %dropped.reason,
                "dropping an attachment"
            );
        }
        let desired = self.desired_state(&state);
        let attached = desired.buses.iter().any(|b| !b.members.is_empty());
        if attached || host == HostCan::Present {
            let reconciled = self.reconcile(desired).await;
            let reconciled = match reconciled {
                Ok(reconciled) => reconciled,
                Err(error) => {
                    // Keep what was learnt about dead namespaces even though the kernel failed.
                    if !report.dropped.is_empty()
                        && let Err(save) = self.parts.checkpoint.save(&*state)
                    {
                        tracing::error!(error = %save, "saving the checkpoint failed");
                    }
                    tracing::error!(%error, "start-up reconcile failed");
                    return Err(error);
                }
            };
            for skipped in &reconciled.skipped {
                let found = state.claims.iter_mut().find_map(|(uid, claim)| {
                    claim
                        .devices
                        .iter_mut()
                        .find(|d| member_id(uid, &d.request) == skipped.member)
                        .map(|d| (uid.clone(), d))
                });
                if let Some((uid, device)) = found
                    && let Some(attachment) = device.attachment.take()
                {
                    tracing::warn!(
                        claim = %uid,
                        request = %device.request,
                        bus = %skipped.bus,
                        reason = %skipped.reason,
                        "member could not be restored; its attachment is dropped"
                    );
                    report.dropped.push(DroppedAttachment {
                        claim_uid: uid,
                        request: device.request.clone(),
                        attachment,
                        reason: skipped.reason.clone(),
                    });
                }
            }
            tracing::info!(
                links_created = ?reconciled.links_created,
                links_deleted = ?reconciled.links_deleted,
                rules_added = reconciled.rules_added,
                rules_deleted = reconciled.rules_deleted,
                members_configured = ?reconciled.members_configured,
                skipped = reconciled.skipped.len(),
                "kernel reconciled with the checkpoint"
            );
            report.reconciled = Some(reconciled);
        } else {
            tracing::info!("nothing attached and no CAN in this kernel: nothing to reconcile");
        }
        if let Err(error) = self.parts.checkpoint.save(&*state) {
            tracing::error!(%error, "saving the checkpoint after recovery failed");
            return Err(error.into());
        }
        Ok(report)
    }

    /// Writes the CDI spec of every checkpointed claim that lacks it (or whose spec differs
    /// from what prepare wrote): the kubelet may never call prepare again for a claim it
    /// believes prepared, so without this a pod's containers could not start after a node
    /// reboot emptied the CDI directory. A failure is logged; the claim stays checkpointed.
    /// Returns the claims whose spec was written.
    fn restore_cdi_specs(&self, state: &NodeState) -> Vec<ClaimUid> {
        let mut restored = Vec::new();
        for (uid, claim) in &state.claims {
            let devices: Vec<ClaimDevice> = claim
                .devices
                .iter()
                .map(|d| ClaimDevice {
                    request: main_request(&d.request).to_owned(),
                    pool: d.pool.clone(),
                    device: d.device.clone(),
                    interface_name: d.member.interface.clone(),
                })
                .collect();
            match self.parts.cdi.restore(uid, &devices) {
                Ok((ids, written)) => {
                    let recorded: Vec<&str> = claim
                        .devices
                        .iter()
                        .map(|d| d.cdi_device_id.as_str())
                        .collect();
                    if ids.iter().map(String::as_str).ne(recorded.iter().copied()) {
                        tracing::warn!(
                            claim = %uid,
                            ?ids,
                            ?recorded,
                            "the CDI device ids differ from the ones handed to the kubelet \
                             (was the driver name changed?)"
                        );
                    }
                    if written {
                        tracing::info!(
                            claim = %uid,
                            spec = %self.parts.cdi.spec_path(uid).display(),
                            "CDI spec of a checkpointed claim re-created"
                        );
                        restored.push(uid.clone());
                    }
                }
                Err(error) => tracing::error!(
                    claim = %uid,
                    %error,
                    "re-creating the CDI spec of a checkpointed claim failed; its containers \
                     cannot start until it is prepared again"
                ),
            }
        }
        restored
    }

    /// Removes what writes interrupted by a crash left in the CDI and data directories; a
    /// failure is only logged, as the files are harmless to the daemon.
    fn remove_stale_temporaries(&self) {
        let found = [
            self.parts
                .cdi
                .remove_stale_temporaries()
                .map_err(|e| e.to_string()),
            self.parts
                .checkpoint
                .remove_stale_temporaries()
                .map_err(|e| e.to_string()),
        ];
        for outcome in found {
            match outcome {
                Ok(removed) => {
                    for file in removed {
                        tracing::info!(file = %file.display(), "removed a temporary file of an interrupted write");
                    }
                }
                Err(error) => tracing::warn!(%error, "cleaning up interrupted writes failed"),
            }
        }
    }

    /// The node-local buses with the members still attached, as the data plane should hold them.
    fn desired_state(&self, state: &NodeState) -> DesiredState {
        let mut buses: BTreeMap<String, BusSpec> = self
            .topology()
            .slots
            .values()
            .map(|slot| (slot.bus.clone(), slot.spec.clone()))
            .collect();
        for (uid, claim) in &state.claims {
            for device in &claim.devices {
                if device.attachment.is_some()
                    && let Some(slot) = self.slot_of(device)
                {
                    buses.entry(slot.bus).or_insert(slot.spec);
                }
                let (Some(attachment), Some(bus)) = (device.attachment, buses.get_mut(&device.bus))
                else {
                    continue;
                };
                let id = member_id(uid, &device.request);
                bus.members
                    .push(device.member.spec(id, NetnsRef::Pid(attachment.pid)));
            }
        }
        DesiredState {
            buses: buses.into_values().collect(),
        }
    }

    /// Opens the data plane if needed and reconciles it; members the reconcile had to skip are
    /// removed from the data plane's state again, so a later hook call joins them afresh.
    async fn reconcile(&self, desired: DesiredState) -> Result<ReconcileReport, NodeError> {
        let buses = self.buses.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = buses
                .lock()
                .map_err(|_| NodeError::DataPlaneTask("the data plane lock is poisoned".into()))?;
            let buses = match guard.as_mut() {
                Some(buses) => buses,
                None => guard.insert(Buses::new(
                    SystemKernel::open().map_err(NodeError::DataPlaneOpen)?,
                )),
            };
            let report = buses.reconcile(desired).map_err(NodeError::Reconcile)?;
            for skipped in &report.skipped {
                if let Err(error) = buses.leave(&skipped.bus, &skipped.member) {
                    tracing::warn!(member = %skipped.member, %error, "forgetting a skipped member failed");
                }
            }
            Ok(report)
        })
        .await
        .map_err(|e| NodeError::DataPlaneTask(e.to_string()))?
    }

    async fn with_buses<T, F>(&self, work: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(&mut Buses<SystemKernel>) -> Result<T, String> + Send + 'static,
    {
        let buses = self.buses.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = buses
                .lock()
                .map_err(|_| "the data plane lock is poisoned".to_owned())?;
            if guard.is_none() {
                let kernel =
                    SystemKernel::open().map_err(|e| format!("opening the data plane: {e}"))?;
                *guard = Some(Buses::new(kernel));
            }
            match guard.as_mut() {
                Some(buses) => work(buses),
                None => Err("the data plane is not open".to_owned()),
            }
        })
        .await
        .map_err(|e| format!("data plane task failed: {e}"))?
    }

    async fn leave(&self, bus: &str, id: &str) -> Result<(), String> {
        let (bus, id) = (bus.to_owned(), id.to_owned());
        self.with_buses(move |buses| {
            let joined = buses
                .state()
                .bus(&bus)
                .is_some_and(|b| b.member(&id).is_some());
            if joined {
                buses.leave(&bus, &id).map_err(|e| e.to_string())
            } else {
                Ok(())
            }
        })
        .await
    }
}

/// `req` of `req/sub`.
fn main_request(request: &str) -> &str {
    request.split('/').next().unwrap_or(request)
}

impl Driver for NodeDriver {
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Result<HashMap<ClaimUid, Result<Vec<PreparedDevice>, String>>, DriverError> {
        let mut state = self.state.lock().await;
        let mut answers = HashMap::new();
        for claim in claims {
            let answer = self.prepare_one(&mut state, &claim).await;
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
            let answer = self.unprepare_one(&mut state, &claim).await;
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

impl Attacher for NodeDriver {
    async fn attach(&self, request: AttachRequest, requester: Requester) -> Result<String, String> {
        let mut state = self.state.lock().await;
        // Waiting for the lock can take long (a stopped daemon, a large prepare).
        if let Some(why) = requester.gone() {
            return Err(format!("not attached: {why}"));
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
            return Err(format!(
                "claim {} device {}/{} is not prepared on this node; refusing to start the \
                 container without its CAN bus",
                request.claim_uid, request.pool, request.device
            ));
        };
        let Some(slot) = self.slot_of(&member) else {
            return Err(format!(
                "device {}/{} is no longer published by this node",
                member.pool, member.device
            ));
        };
        let id = member_id(&request.claim_uid, &member.request);
        let pid = request.pid;
        let previous = member.attachment;
        let outcome = self
            .with_buses(move |buses| {
                let netns = Netns::from_pid(pid).map_err(|e| e.to_string())?;
                let current = netns.id();
                refuse_node_namespace(pid, current)?;
                let attachment = Attachment {
                    pid,
                    netns_dev: current.dev,
                    netns_ino: current.ino,
                };
                let joined = buses
                    .state()
                    .bus(&slot.bus)
                    .is_some_and(|b| b.member(&id).is_some());
                let same_netns = previous
                    .is_some_and(|p| p.netns_dev == current.dev && p.netns_ino == current.ino);
                if joined && same_netns {
                    return Ok(AttachOutcome::Attached(
                        format!("already attached in {current}"),
                        attachment,
                    ));
                }
                if joined {
                    // A new sandbox: the old namespace (and the pod end with it) is gone.
                    buses.leave(&slot.bus, &id).map_err(|e| e.to_string())?;
                }
                if buses.state().bus(&slot.bus).is_none() {
                    buses
                        .add_bus(slot.spec.clone())
                        .map_err(|e| e.to_string())?;
                }
                let spec = member.member.spec(id.clone(), NetnsRef::Pid(pid));
                buses.join(&slot.bus, spec).map_err(|e| e.to_string())?;
                // The hook may have given up while the member was made: then its container
                // never runs, and nothing of the attach may stay.
                if let Some(why) = requester.gone() {
                    buses
                        .leave(&slot.bus, &id)
                        .map_err(|e| format!("{why}, and rolling the attach back failed: {e}"))?;
                    return Ok(AttachOutcome::RolledBack(why));
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
        let (message, attachment) = match outcome {
            AttachOutcome::Attached(message, attachment) => (message, Some(attachment)),
            AttachOutcome::RolledBack(why) => {
                tracing::warn!(reason = %why, "attach rolled back: the hook has given up");
                (format!("not attached: {why}"), None)
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
                .map_err(|e| format!("member attached but the checkpoint failed: {e}"))?;
        }
        match attachment {
            Some(_) => Ok(message),
            None => Err(message),
        }
    }
}

/// What the data plane did for one attach.
enum AttachOutcome {
    /// The member is in the namespace: the message, and where.
    Attached(String, Attachment),
    /// The hook gave up while the member was made, so it was removed again: why.
    RolledBack(String),
}

/// Refuses a target namespace that is the node's own: the daemon's (where its member host ends
/// and tunnel links live) or that of the host's init process. A pod end there would sit among
/// the node's links, where it could be taken for a controller or deleted as an orphan.
fn refuse_node_namespace(pid: u32, target: NetnsId) -> Result<(), String> {
    if node_namespaces().contains(&target) {
        return Err(format!(
            "hostNetwork pods cannot join a bus: pid {pid} lives in the node's network \
             namespace {target}, where the driver keeps its own links; run the pod without \
             hostNetwork"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

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
                    member: MemberParams {
                        interface: format!("can{k}"),
                        fd: false,
                        access: Access::ReadWrite,
                        transmit_allow: Vec::new(),
                        receive_filters: Vec::new(),
                        rx_shaping: None,
                        tx_shaping: None,
                    },
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
        let id = Netns::from_pid(pid).unwrap().id();
        Attachment {
            pid,
            netns_dev: id.dev,
            netns_ino: id.ino,
        }
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

        let dropped = state.drop_stale_attachments();

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
        assert!(state.drop_stale_attachments().is_empty());
    }
}
