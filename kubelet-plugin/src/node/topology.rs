//! The slots the node serves and their health: which bus each published device joins, how the
//! data plane builds that bus, and whether its controller can carry frames.

use std::collections::BTreeMap;

use can_dra_dataplane::bus::kernel::Kernel;
use can_dra_dataplane::bus::model::BusSpec;
use can_dra_dataplane::link::{CanController, CanState};
use dra_kubeletplugin::driver::{DeviceHealth, HealthStatus};

use super::state::{NodeState, PreparedMember};
use super::{NodeDriver, NodeError};
use crate::claims::KnownDevices;
use crate::inventory::{Inventory, PhysicalController, SlotBus};
use crate::shared_buses::CanBusReader;

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
        // A state the data plane does not know is published like no state at all.
        state: if found.up {
            found
                .state
                .filter(|state| !matches!(state, CanState::Other(_)))
        } else {
            Some(CanState::Stopped)
        },
        slots: 0,
    }
}

/// The node's bus, as the data plane is told about it on first use.
#[derive(Debug, Clone)]
pub(super) struct SlotInfo {
    pub(super) bus: String,
    pub(super) spec: BusSpec,
}

/// The slots the driver serves, rebuilt by [`NodeDriver::apply_inventory`] when the node's
/// adapters change.
#[derive(Debug, Clone, Default)]
pub(super) struct Topology {
    pub(super) inventory: Inventory,
    /// Devices a new claim may be prepared on: exactly the published ones.
    pub(super) known: KnownDevices,
    /// Published slots, plus the slots of prepared claims whose controller went away (kept so
    /// that their health stays reported and their members can still be unprepared).
    pub(super) slots: BTreeMap<String, SlotInfo>,
}

impl Topology {
    /// The topology of `inventory` on node `node`.
    pub(super) fn new(node: &str, inventory: Inventory) -> Result<Self, NodeError> {
        let (known, slots) = slot_table(node, &inventory)?;
        Ok(Self {
            inventory,
            known,
            slots,
        })
    }
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

impl<K: Kernel, N> NodeDriver<K, N> {
    pub(super) fn topology(&self) -> std::sync::RwLockReadGuard<'_, Topology> {
        // The lock is never held across a panic-prone section; a poisoned one is still sound.
        self.topology
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn topology_mut(&self) -> std::sync::RwLockWriteGuard<'_, Topology> {
        self.topology
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn slot(&self, device: &str) -> Option<SlotInfo> {
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
        let mut topology = Topology::new(&self.parts.node, inventory)?;
        if self.shared.is_some() {
            topology.known.accept_shared_pools();
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
                if topology.slots.contains_key(&device.device) {
                    continue;
                }
                if let Some(info) = old.slots.get(&device.device) {
                    topology.slots.insert(device.device.clone(), info.clone());
                    kept.push(device.device.clone());
                }
            }
        }
        let physical = topology.inventory.physical.clone();
        *self.topology_mut() = topology;
        drop(state);
        self.update_controllers(&physical);
        kept.sort();
        kept.dedup();
        Ok(kept)
    }

    /// Drops the slots kept for a vanished controller once no prepared claim holds them, so
    /// that they leave the health feed too.
    pub(super) fn forget_unused_slots(&self, state: &NodeState) {
        let physical = {
            let mut topology = self.topology_mut();
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
        self.topology_mut().known.accept_shared_pools();
        self.shared = Some(reader);
        self
    }

    /// The bus a prepared member joins: a node-local slot's bus, or the mesh of a cluster-wide
    /// bus.
    pub(super) fn slot_of(&self, member: &PreparedMember) -> Option<SlotInfo> {
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
                        Some(c) if c.state == Some(CanState::BusOff) => (
                            HealthStatus::Unhealthy,
                            format!("controller {interface} is bus-off"),
                        ),
                        Some(c) if c.state == Some(CanState::Stopped) => (
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
}
