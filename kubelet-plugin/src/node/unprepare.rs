//! Unprepare: a claim's members leave their buses, its CDI spec, status and checkpoint entry
//! go.

use can_dra_dataplane::bus::kernel::Kernel;
use dra_kubeletplugin::driver::ClaimRef;

use super::NodeDriver;
use super::namespace::NamespaceOpener;
use super::state::{NodeState, member_id};
use crate::cdi::CdiError;
use crate::checkpoint::CheckpointError;
use crate::claim_status::StatusError;
use crate::plane::PlaneError;

/// Why a claim could not be unprepared; the kubelet retries.
#[derive(Debug, thiserror::Error)]
pub enum UnprepareError {
    /// An attached member could not leave its bus.
    #[error("claim {claim}: leaving bus {bus}: {source}")]
    Leave {
        /// The claim.
        claim: String,
        /// The bus.
        bus: String,
        /// The underlying error.
        #[source]
        source: PlaneError,
    },
    /// The CDI spec cannot be removed.
    #[error("claim {claim}: {source}")]
    Cdi {
        /// The claim.
        claim: String,
        /// The underlying error.
        #[source]
        source: CdiError,
    },
    /// The claim's status cannot be cleared.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// The checkpoint cannot be written.
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
    /// Unprepares one claim (a claim that is not prepared is fine).
    pub(super) async fn unprepare_one(
        &self,
        state: &mut NodeState,
        claim: &ClaimRef,
    ) -> Result<(), UnprepareError> {
        if let Some(prepared) = state.claims.get(&claim.uid).cloned() {
            for device in prepared.devices.iter().filter(|d| d.attachment.is_some()) {
                let id = member_id(&claim.uid, &device.request);
                self.plane.leave(&device.bus, &id).await.map_err(|source| {
                    UnprepareError::Leave {
                        claim: claim.to_string(),
                        bus: device.bus.clone(),
                        source,
                    }
                })?;
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
            .map_err(|source| UnprepareError::Cdi {
                claim: claim.to_string(),
                source,
            })?;
        self.parts.status.clear(claim).await?;
        if state.claims.remove(&claim.uid).is_some() {
            self.parts
                .checkpoint
                .save(state)
                .map_err(|source| UnprepareError::Checkpoint {
                    claim: claim.to_string(),
                    source,
                })?;
            self.forget_unused_slots(state);
            self.publish_shared_pools(state);
        }
        tracing::info!(claim = %claim, "claim unprepared");
        Ok(())
    }
}
