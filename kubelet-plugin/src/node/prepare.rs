//! Prepare: a claim's allocation becomes checkpointed members with a CDI spec and a Ready
//! status. Nothing touches the kernel: the pod's network namespace does not exist yet.

use can_dra_cluster::naming::is_bus_pool;
use can_dra_dataplane::bus::kernel::Kernel;
use can_dra_dataplane::bus::model::BusSpec;
use dra_kubeletplugin::driver::{ClaimRef, PreparedDevice};

use super::NodeDriver;
use super::member::MemberParams;
use super::namespace::NamespaceOpener;
use super::state::{NodeState, PreparedClaim, PreparedMember, main_request};
use super::topology::SlotInfo;
use crate::cdi::{CdiError, ClaimDevice};
use crate::checkpoint::CheckpointError;
use crate::claim_status::DeviceReady;
use crate::claims::ClaimError;
use crate::shared_buses::CanBusError;

/// Why a claim could not be prepared. Each message names the claim (except a claim that cannot
/// be read, whose error names it already).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The claim cannot be read, is not allocated, or its configuration is invalid.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// A node-local device that this node does not serve.
    #[error("claim {claim}: device {pool}/{device} is not served by this node")]
    NotServed {
        /// The claim.
        claim: String,
        /// The pool.
        pool: String,
        /// The device.
        device: String,
    },
    /// A member of a cluster-wide bus, and the daemon serves none.
    #[error(
        "claim {claim}: device {pool}/{device} belongs to a cluster-wide bus, which this daemon \
         does not serve"
    )]
    SharedBusesNotServed {
        /// The claim.
        claim: String,
        /// The pool.
        pool: String,
        /// The device.
        device: String,
    },
    /// The CanBus of a cluster-wide pool cannot be read.
    #[error("claim {claim}: device {pool}/{device}: {source}")]
    CanBus {
        /// The claim.
        claim: String,
        /// The pool.
        pool: String,
        /// The device.
        device: String,
        /// The underlying error.
        #[source]
        source: CanBusError,
    },
    /// No CanBus publishes the pool.
    #[error("claim {claim}: device {pool}/{device}: no CanBus publishes pool {pool}")]
    NoCanBus {
        /// The claim.
        claim: String,
        /// The pool.
        pool: String,
        /// The device.
        device: String,
    },
    /// The device is not a member slot of its CanBus.
    #[error("claim {claim}: {reason}")]
    NotAMember {
        /// The claim.
        claim: String,
        /// What the CanBus says.
        reason: String,
    },
    /// The CDI spec cannot be written.
    #[error("claim {claim}: {source}")]
    Cdi {
        /// The claim.
        claim: String,
        /// The underlying error.
        #[source]
        source: CdiError,
    },
    /// The checkpoint cannot be written (the CDI spec is removed again).
    #[error("claim {claim}: {source}")]
    Checkpoint {
        /// The claim.
        claim: String,
        /// The underlying error.
        #[source]
        source: CheckpointError,
    },
}

impl<K: Kernel + Send + 'static, N: NamespaceOpener> NodeDriver<K, N> {
    /// Prepares one claim (idempotently: a prepared claim is answered from the checkpoint, and
    /// its status written if that failed before).
    pub(super) async fn prepare_one(
        &self,
        state: &mut NodeState,
        claim: &ClaimRef,
    ) -> Result<Vec<PreparedDevice>, PrepareError> {
        if let Some(prepared) = state.claims.get_mut(&claim.uid) {
            tracing::debug!(claim = %claim, "already prepared");
            if prepared.status_pending && self.write_status(claim, prepared, None).await {
                prepared.status_pending = false;
                prepared.status_written_unsaved = true;
            }
            return Ok(answer(prepared));
        }
        let known = self.topology().known.clone();
        let allocated = self.parts.claims.allocated(claim, &known).await?;
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
            .map_err(|source| PrepareError::Cdi {
                claim: claim.to_string(),
                source,
            })?;
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
        if let Err(source) = self.parts.checkpoint.save(state) {
            // Undo: no CDI spec and no entry for a claim the kubelet will be told failed.
            state.claims.remove(&claim.uid);
            if let Err(undo) = self.parts.cdi.remove(&claim.uid) {
                tracing::warn!(claim = %claim, error = %undo, "removing the CDI spec failed");
            }
            return Err(PrepareError::Checkpoint {
                claim: claim.to_string(),
                source,
            });
        }
        self.publish_shared_pools(state);
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
        Ok(answer(&prepared))
    }

    /// The bus of an allocated device and whether it is a cluster-wide one (then its FD flag).
    async fn bus_of(
        &self,
        claim: &ClaimRef,
        pool: &str,
        device: &str,
    ) -> Result<(SlotInfo, Option<bool>), PrepareError> {
        let names = || (claim.to_string(), pool.to_owned(), device.to_owned());
        if !is_bus_pool(pool) {
            let slot = self
                .slot(device)
                .filter(|_| pool == self.parts.node)
                .ok_or_else(|| {
                    let (claim, pool, device) = names();
                    PrepareError::NotServed {
                        claim,
                        pool,
                        device,
                    }
                })?;
            return Ok((slot, None));
        }
        let reader = self.shared.as_ref().ok_or_else(|| {
            let (claim, pool, device) = names();
            PrepareError::SharedBusesNotServed {
                claim,
                pool,
                device,
            }
        })?;
        let bus = reader
            .by_pool(pool)
            .await
            .map_err(|source| {
                let (claim, pool, device) = names();
                PrepareError::CanBus {
                    claim,
                    pool,
                    device,
                    source,
                }
            })?
            .ok_or_else(|| {
                let (claim, pool, device) = names();
                PrepareError::NoCanBus {
                    claim,
                    pool,
                    device,
                }
            })?;
        bus.check_member_device(device)
            .map_err(|reason| PrepareError::NotAMember {
                claim: claim.to_string(),
                reason,
            })?;
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
}

/// What the kubelet is told of a prepared claim.
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
