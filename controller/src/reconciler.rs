//! One bus's reconcile: publish its pool's slices, settle its tunnel port, work out its members
//! and endpoints from the watched claims, pods and nodes, and write its status when that changed.
//!
//! The reconcile reads the cluster from reflector stores the controller keeps current
//! ([`Context`]); it waits until they hold a first full list, so a starting controller never
//! writes a status computed from an empty view.

use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use can_dra_cluster::canbus::CanBus;
use can_dra_cluster::naming::pool_name;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::ResourceClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::store::WriterDropped;
use kube::runtime::reflector::{Lookup, Store};
use kube::{Api, Client, ResourceExt};

use crate::bus_pool::{BusPools, SliceError};
use crate::membership::{self, ClusterView};
use crate::status::{Observation, Problem, desired_status, status_patch};

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The slices could not be published (the status says so too, when it could be written).
    #[error(transparent)]
    Slices(#[from] SliceError),
    /// The status could not be written.
    #[error("cannot write the status of CanBus {bus}: {source}")]
    Status {
        /// The bus.
        bus: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// A watch stopped before it listed anything.
    #[error("the {0} watch stopped before its first list")]
    NotReady(&'static str),
}

/// What every reconcile shares: the client, the stores and the ports handed out.
pub struct Context {
    client: Client,
    driver: String,
    publisher: BusPools,
    buses: Store<CanBus>,
    claims: Store<ResourceClaim>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    /// Ports this controller assigned, by bus: the store may not show a status just written
    /// when the next bus is reconciled, and two buses must not get the same port.
    assigned: Mutex<BTreeMap<String, u16>>,
    resync: Duration,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

/// The reflector stores a [`Context`] reads.
#[derive(Clone, Debug)]
pub struct Stores {
    /// The CanBuses (the store of the kube-runtime `Controller` that drives the reconciles).
    pub buses: Store<CanBus>,
    /// The ResourceClaims.
    pub claims: Store<ResourceClaim>,
    /// The Pods.
    pub pods: Store<Pod>,
    /// The Nodes.
    pub nodes: Store<Node>,
}

impl Context {
    /// A context for driver `driver`, re-publishing healthy buses every `resync`.
    pub fn new(client: Client, driver: &str, stores: Stores, resync: Duration) -> Self {
        Self {
            publisher: BusPools::new(client.clone(), driver.to_owned()),
            client,
            driver: driver.to_owned(),
            buses: stores.buses,
            claims: stores.claims,
            pods: stores.pods,
            nodes: stores.nodes,
            assigned: Mutex::new(BTreeMap::new()),
            resync,
        }
    }

    /// The slice publisher (shared with the sweep of deleted buses).
    pub fn publisher(&self) -> &BusPools {
        &self.publisher
    }

    /// The names of the nodes that exist.
    pub fn live_nodes(&self) -> std::collections::BTreeSet<String> {
        self.nodes.state().iter().map(|n| n.name_any()).collect()
    }

    /// Forgets the ports of buses that are gone, so they can be handed out again.
    pub fn forget_ports(&self, live: &std::collections::BTreeSet<String>) {
        self.assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|bus, _| live.contains(bus));
    }

    async fn wait_until_ready(&self) -> Result<(), ReconcileError> {
        let ready = |r: Result<(), _>, what| r.map_err(|_| ReconcileError::NotReady(what));
        ready(store_ready(&self.claims).await, "ResourceClaim")?;
        ready(store_ready(&self.pods).await, "Pod")?;
        ready(store_ready(&self.nodes).await, "Node")
    }

    /// Settles the tunnel port of `bus`, remembering one it assigned.
    fn tunnel_port(&self, bus: &CanBus) -> Result<u16, membership::PortConflict> {
        let all: Vec<CanBus> = self.buses.state().iter().map(|b| (**b).clone()).collect();
        let mut assigned = self.assigned.lock().unwrap_or_else(PoisonError::into_inner);
        let port = membership::tunnel_port(bus, &all, &assigned)?;
        if bus.spec.tunnel_port.is_none() {
            assigned.insert(bus.name_any(), port);
        } else {
            assigned.remove(&bus.name_any());
        }
        Ok(port)
    }

    /// What the watched claims, pods and nodes say about `bus`'s members and endpoints.
    fn observe(&self, bus: &CanBus, port: Option<u16>) -> Observation {
        let pool = pool_name(&bus.name_any());
        // Only claims with devices of this pool, and pods that use claims, matter.
        let claims: Vec<ResourceClaim> = self
            .claims
            .state()
            .iter()
            .filter(|c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.allocation.as_ref()?.devices.as_ref()?.results.as_ref())
                    .is_some_and(|r| r.iter().any(|r| r.driver == self.driver && r.pool == pool))
            })
            .map(|c| (**c).clone())
            .collect();
        let pods: Vec<Pod> = if claims.is_empty() {
            Vec::new()
        } else {
            self.pods
                .state()
                .iter()
                .filter(|p| uses_claims(p))
                .map(|p| (**p).clone())
                .collect()
        };
        let nodes: Vec<Node> = self.nodes.state().iter().map(|n| (**n).clone()).collect();
        let view = ClusterView {
            claims: &claims,
            pods: &pods,
            nodes: &nodes,
        };
        let members = membership::members(&bus.name_any(), &self.driver, view);
        let endpoints = port
            .map(|port| membership::endpoints(bus, &members, &nodes, port))
            .unwrap_or_default();
        let serving = membership::serving_nodes(bus, &endpoints);
        Observation {
            members,
            endpoints,
            tunnel_port: port,
            serving,
            problem: None,
        }
    }
}

/// How often a task waiting for a store polls its readiness again (see [`store_ready`]).
const READY_POLL: Duration = Duration::from_millis(200);

/// Waits until `store` holds a first full list. Unlike `Store::wait_until_ready` alone, this
/// works with several waiters at once: kube-runtime 5 wakes only the last task that waited (its
/// one-shot channel keeps one waker), and the Controller waits on its own store, as concurrent
/// reconciles wait on the others. Polling again registers the waiter anew.
pub async fn store_ready<K>(store: &Store<K>) -> Result<(), WriterDropped>
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    loop {
        if let Ok(outcome) = tokio::time::timeout(READY_POLL, store.wait_until_ready()).await {
            return outcome;
        }
    }
}

/// Whether a pod takes part in DRA (it names ResourceClaims).
pub fn uses_claims(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.resource_claims.as_ref())
        .is_some_and(|c| !c.is_empty())
        || pod
            .status
            .as_ref()
            .and_then(|s| s.resource_claim_statuses.as_ref())
            .is_some_and(|c| !c.is_empty())
}

/// Reconciles one bus: slices first, then the status (see the module docs).
pub async fn reconcile(bus: Arc<CanBus>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.wait_until_ready().await?;
    let name = bus.name_any();
    let published = ctx.publisher.publish(&bus).await;
    let port = ctx.tunnel_port(&bus);
    let mut observation = ctx.observe(&bus, port.as_ref().ok().copied());
    observation.problem = match (&published, &port) {
        (Err(SliceError::Spec { source, .. }), _) => Some(Problem {
            reason: "InvalidSpec",
            message: source.to_string(),
        }),
        (Err(error @ SliceError::NameTooLong { .. }), _) => Some(Problem {
            reason: "InvalidName",
            message: error.to_string(),
        }),
        (Err(error @ SliceError::Unpublishable { .. }), _) => Some(Problem {
            reason: "Unpublishable",
            message: error.to_string(),
        }),
        (_, Err(conflict)) => Some(Problem {
            reason: "TunnelPortConflict",
            message: conflict.to_string(),
        }),
        (Err(error), _) => Some(Problem {
            reason: "PublishFailed",
            message: error.to_string(),
        }),
        (Ok(_), Ok(_)) => None,
    };
    let now = Time(Timestamp::now());
    let desired = desired_status(&bus, &observation, &now);
    if let Some(patch) = status_patch(bus.status.as_ref(), &desired) {
        let api: Api<CanBus> = Api::all(ctx.client.clone());
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| ReconcileError::Status {
                bus: name.clone(),
                source,
            })?;
        tracing::info!(bus = %name, members = ?desired.members, endpoints = ?desired.endpoints,
            tunnel_port = ?desired.tunnel_port, "wrote the bus status");
    }
    match published {
        // Reported in the status (and logged); retrying the same bus cannot fix it, a change of
        // the bus will, and every change reconciles it.
        Err(error) if error.needs_bus_change() => {
            tracing::warn!(bus = %name, %error, "the bus cannot be published until it changes");
            Ok(Action::requeue(ctx.resync))
        }
        Ok(_) => Ok(Action::requeue(ctx.resync)),
        Err(error) => Err(error.into()),
    }
}
