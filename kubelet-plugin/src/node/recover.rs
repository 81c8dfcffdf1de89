//! Recovery at start-up, before serving: the in-memory bus state is empty after a restart, so
//! the CDI specs a node reboot wiped are written again, attachments whose pod namespace is gone
//! are dropped, and the kernel is reconciled against the rest.

use std::collections::BTreeMap;

use can_dra_dataplane::bus::ReconcileReport;
use can_dra_dataplane::bus::kernel::Kernel;
use can_dra_dataplane::bus::model::{BusSpec, DesiredState, NetnsRef};
use dra_kubeletplugin::driver::ClaimUid;

use super::namespace::NamespaceOpener;
use super::state::{DroppedAttachment, NodeState, main_request, member_id};
use super::{NodeDriver, NodeError};
use crate::cdi::ClaimDevice;
use crate::inventory::Inventory;

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

impl<K: Kernel + Send + 'static, N: NamespaceOpener> NodeDriver<K, N> {
    /// Start-up reconcile, before serving: see [`recover_on`](Self::recover_on), with the
    /// host probed by [`HostCan::probe`].
    pub async fn recover(&self) -> Result<RecoveryReport, NodeError> {
        self.recover_on(HostCan::probe(&self.inventory())).await
    }

    /// Re-creates the CDI spec of every checkpointed claim that lacks it (see
    /// [`RecoveryReport::cdi_restored`]), drops checkpointed attachments whose namespace is
    /// gone or is the node's own, then reconciles the kernel against the remaining ones
    /// (repairing what is missing, removing orphans) so that the buses are known again and a
    /// hook call for an attached pod finds it attached. The kernel is opened only when an
    /// attachment remains or the host has CAN. The checkpoint is saved either way.
    pub async fn recover_on(&self, host: HostCan) -> Result<RecoveryReport, NodeError> {
        let mut state = self.state.lock().await;
        self.remove_stale_temporaries();
        let mut dropped = state.drop_stale_attachments(&*self.namespaces);
        dropped.extend(state.drop_node_namespace_attachments(&self.namespaces.node_namespaces()));
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
        self.publish_shared_pools(&state);
        let desired = self.desired_state(&state);
        let attached = desired.buses.iter().any(|b| !b.members.is_empty());
        if attached || host == HostCan::Present {
            let reconciled = match self.plane.reconcile(desired, state.shared_pools()).await {
                Ok(reconciled) => reconciled,
                Err(error) => {
                    // Keep what was learnt about dead namespaces even though the kernel failed.
                    if !report.dropped.is_empty()
                        && let Err(save) = self.parts.checkpoint.save(&*state)
                    {
                        tracing::error!(error = %save, "saving the checkpoint failed");
                    }
                    tracing::error!(%error, "start-up reconcile failed");
                    return Err(NodeError::Reconcile(error));
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
}
