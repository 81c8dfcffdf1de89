//! The one pool publisher: makes a pool's ResourceSlices say what a [`DesiredPool`] says, for
//! the node daemon's pool and for every `CanBus` pool of the controller alike.
//!
//! Writes use create/update with optimistic concurrency (POST for new slices, PUT with the
//! listed `resourceVersion` for existing ones) rather than server-side apply: the publisher is the
//! only writer of its pools, and a stale update fails with a conflict instead of overwriting a
//! change it has not seen; the whole sync then starts again from a fresh list.
//!
//! Each sync lists the pool's slices with the field selectors kube-apiserver allows for
//! ResourceSlices (`metadata.name`, `spec.nodeName`, `spec.driver` only; `spec.pool.name` is a
//! 400): `spec.nodeName=<node>,spec.driver=<driver>` for a node's pool,
//! `spec.driver=<driver>,spec.nodeName=` for a pool without a node. It keeps of the answer only
//! the driver's slices of that pool and node ([`DesiredPool::holds`]): other pools of the same
//! driver share these selectors. It compares them with the desired slices (empty lists and maps
//! equal absent ones, as on the wire; an owner matches by uid, kind and name). If nothing
//! differs, nothing is written. Otherwise `pool.generation` becomes one more than the highest
//! generation seen, obsolete slices are deleted first (as the Go helper does), and every desired
//! slice is written with the new generation.
//!
//! Every written slice is compared with what the server returned (see `readback.rs`):
//! each field the server dropped is logged once at warn level and listed in the
//! [`PublishReport`], and a slice the server trimmed is not written again until its desired spec
//! changes.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

use crate::naming::{bus_pools_selector, node_pools_selector};
use crate::pool::{DesiredPool, holds, same_content};
use crate::readback::ServerEdits;

/// How many times a sync starts over after a conflicting write before giving up.
const SYNC_ATTEMPTS: usize = 3;

/// Listing, writing or deleting slices failed; the next sync starts from scratch.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The slices could not be listed.
    #[error("cannot list the ResourceSlices {what}: {source}")]
    List {
        /// Which: `of pool <name>`, or `selected by <field selector>`.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A slice could not be written or deleted.
    #[error("cannot {action} ResourceSlice {name}: {source}")]
    Write {
        /// `create`, `update` or `delete`.
        action: &'static str,
        /// The slice name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

impl PublishError {
    /// Whether a fresh list may fix it (someone else changed the slices meanwhile).
    fn is_race(&self) -> bool {
        matches!(self, Self::Write { source: kube::Error::Api(status), .. }
            if status.code == 409 || status.code == 404)
    }
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReport {
    /// The pool generation now published.
    pub generation: i64,
    /// The slice names, in index order.
    pub slices: Vec<String>,
    /// Slices created.
    pub created: usize,
    /// Slices updated.
    pub updated: usize,
    /// Obsolete slices deleted.
    pub deleted: usize,
    /// Field paths the API server dropped from the slices this sync wrote, sorted, each once
    /// (e.g. `spec.devices[*].taints`): a feature gate is probably off on the cluster.
    pub dropped: Vec<String>,
}

impl PublishReport {
    /// Whether the sync wrote nothing.
    pub fn unchanged(&self) -> bool {
        self.created + self.updated + self.deleted == 0
    }
}

/// Deletes `slices`, returning those this call removed: one already gone (404) is not an error.
/// The one way slices are deleted, by the publisher and by the clean-up of other pools.
pub async fn delete_slices(
    api: &Api<ResourceSlice>,
    slices: impl IntoIterator<Item = ResourceSlice>,
) -> Result<Vec<ResourceSlice>, PublishError> {
    let mut deleted = Vec::new();
    for slice in slices {
        let name = slice.metadata.name.clone().unwrap_or_default();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => deleted.push(slice),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(PublishError::Write {
                    action: "delete",
                    name,
                    source,
                });
            }
        }
    }
    Ok(deleted)
}

/// `driver`'s slices that field selector `selector` lists (it should select on `spec.driver`,
/// see [`crate::naming`]) and `keep` accepts: slices of other drivers are never returned, whatever
/// the server answered.
pub async fn list_slices(
    api: &Api<ResourceSlice>,
    driver: &str,
    selector: &str,
    keep: impl Fn(&ResourceSlice) -> bool,
) -> Result<Vec<ResourceSlice>, PublishError> {
    let listed = api
        .list(&ListParams::default().fields(selector))
        .await
        .map_err(|source| PublishError::List {
            what: format!("selected by {selector}"),
            source,
        })?;
    Ok(listed
        .items
        .into_iter()
        .filter(|s| s.spec.driver == driver && keep(s))
        .collect())
}

/// Publishes pools of one driver. Clones share what the server kept of the slices written.
#[derive(Clone)]
pub struct PoolPublisher {
    client: Client,
    driver: String,
    edits: Arc<Mutex<ServerEdits>>,
}

impl fmt::Debug for PoolPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolPublisher")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

impl PoolPublisher {
    /// A publisher of `driver`'s pools.
    pub fn new(client: Client, driver: impl Into<String>) -> Self {
        Self {
            client,
            driver: driver.into(),
            edits: Arc::default(),
        }
    }

    /// The driver whose pools this publishes.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    fn api(&self) -> Api<ResourceSlice> {
        Api::all(self.client.clone())
    }

    fn edits(&self) -> MutexGuard<'_, ServerEdits> {
        self.edits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `pool`'s slices say exactly what it says, writing only if something differs.
    /// A write that races with another change is retried from a fresh list a few times.
    pub async fn publish(&self, pool: &DesiredPool) -> Result<PublishReport, PublishError> {
        let mut attempt = 1;
        loop {
            match self.sync(pool).await {
                Err(error) if error.is_race() && attempt < SYNC_ATTEMPTS => {
                    tracing::info!(%error, attempt, "ResourceSlices changed meanwhile; syncing again");
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// Deletes every slice of pool `pool` (on node `node`, or on none); returns how many went.
    pub async fn remove(&self, pool: &str, node: Option<&str>) -> Result<usize, PublishError> {
        let existing = self.list_pool(pool, node).await?;
        Ok(self.delete(existing).await?.len())
    }

    /// The driver's slices `selector` lists that `keep` accepts (see [`list_slices`]).
    pub async fn list(
        &self,
        selector: &str,
        keep: impl Fn(&ResourceSlice) -> bool,
    ) -> Result<Vec<ResourceSlice>, PublishError> {
        list_slices(&self.api(), &self.driver, selector, keep).await
    }

    /// Deletes `slices` (see [`delete_slices`]) and forgets what the server kept of them.
    pub async fn delete(
        &self,
        slices: Vec<ResourceSlice>,
    ) -> Result<Vec<ResourceSlice>, PublishError> {
        {
            let mut edits = self.edits();
            for slice in &slices {
                edits.forget(slice.metadata.name.as_deref().unwrap_or_default());
            }
        }
        delete_slices(&self.api(), slices).await
    }

    /// The slices of pool `pool` on node `node` (or on none).
    async fn list_pool(
        &self,
        pool: &str,
        node: Option<&str>,
    ) -> Result<Vec<ResourceSlice>, PublishError> {
        let selector = match node {
            Some(node) => node_pools_selector(&self.driver, node),
            None => bus_pools_selector(&self.driver),
        };
        self.list(&selector, |s| holds(&self.driver, pool, node, s))
            .await
            .map_err(|error| match error {
                PublishError::List { source, .. } => PublishError::List {
                    what: format!("of pool {pool}"),
                    source,
                },
                other => other,
            })
    }

    async fn sync(&self, pool: &DesiredPool) -> Result<PublishReport, PublishError> {
        let existing = self.list_pool(&pool.name, pool.placement.node()).await?;
        let current = existing
            .iter()
            .map(|s| s.spec.pool.generation)
            .max()
            .unwrap_or(0);
        let find = |name: &Option<String>| {
            existing
                .iter()
                .find(|s| s.metadata.name.is_some() && s.metadata.name == *name)
        };
        let as_is = pool.resource_slices(&self.driver, current);
        let up_to_date = existing.len() == as_is.len() && {
            let edits = self.edits();
            as_is
                .iter()
                .all(|d| find(&d.metadata.name).is_some_and(|e| same_content(e, &edits.as_kept(d))))
        };
        let names: Vec<String> = pool.slices.iter().map(|s| s.name.clone()).collect();
        let mut report = PublishReport {
            generation: current,
            slices: names,
            created: 0,
            updated: 0,
            deleted: 0,
            dropped: Vec::new(),
        };
        if up_to_date {
            return Ok(report);
        }

        report.generation = current + 1;
        let obsolete: Vec<ResourceSlice> = existing
            .iter()
            .filter(|e| {
                !e.metadata
                    .name
                    .as_ref()
                    .is_some_and(|n| report.slices.contains(n))
            })
            .cloned()
            .collect();
        report.deleted = self.delete(obsolete).await?.len();
        let mut dropped = BTreeSet::new();
        for mut slice in pool.resource_slices(&self.driver, report.generation) {
            let name = slice.metadata.name.clone().unwrap_or_default();
            let (action, outcome) = match find(&slice.metadata.name) {
                Some(old) => {
                    // Keep what others put in the metadata; take our spec and owner.
                    let mut metadata = old.metadata.clone();
                    metadata.owner_references = slice.metadata.owner_references.take();
                    metadata.managed_fields = None;
                    slice.metadata = metadata;
                    let outcome = self
                        .api()
                        .replace(&name, &PostParams::default(), &slice)
                        .await;
                    ("update", outcome)
                }
                None => {
                    let outcome = self.api().create(&PostParams::default(), &slice).await;
                    ("create", outcome)
                }
            };
            let written = outcome.map_err(|source| PublishError::Write {
                action,
                name: name.clone(),
                source,
            })?;
            match action {
                "update" => report.updated += 1,
                _ => report.created += 1,
            }
            dropped.extend(self.edits().record(&name, &slice.spec, &written.spec));
        }
        report.dropped = dropped.into_iter().collect();
        tracing::info!(
            pool = %pool.name,
            generation = report.generation,
            slices = report.slices.len(),
            devices = pool.slices.iter().map(|s| s.devices.len()).sum::<usize>(),
            created = report.created,
            updated = report.updated,
            deleted = report.deleted,
            "published ResourceSlices"
        );
        Ok(report)
    }
}
