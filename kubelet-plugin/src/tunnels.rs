//! Cross-node buses on this node: one tunnel endpoint per CanBus the node takes part in.
//!
//! For each such bus the daemon keeps, on the host (the contract is in `docs/tunnel.md`):
//! - a vxcan pair `vxtm-<bus>` / `vxtt-<bus>` (named by
//!   [`tunnel_link_names`]: a hash of the name when it is longer than 10 bytes; MTU 72 on FD
//!   buses); `vxtm-<bus>` is the tunnel interface of the bus's mesh, so
//!   can-gw connects it both ways with every local member and the physical attachment;
//! - a [`can_dra_tunnel::Endpoint`] on `vxtt-<bus>`, listening on
//!   `<tunnel address>:<status.tunnelPort>`, whose peers are the other nodes' endpoints in the
//!   CanBus status, and the external peers (`spec.externalPeers`) the status gives this node to
//!   serve, as external peers whose frames the endpoint relays.
//!
//! [`plan`] works out what the node needs from the CanBuses (pure logic); [`Tunnels`] brings the
//! running endpoints and links in line with it through the narrow [`TunnelHost`] seam, which the
//! daemon implements over the node's one data plane handle ([`KernelTunnelHost`]) and the unit
//! tests with a double; [`run`] feeds it from the CanBuses and a watch of the node's prepared
//! cluster-wide pools.
//! Links are found again by their prefix, so what a crashed daemon left behind and no longer
//! wanted is deleted by the first pass; wanted pairs are kept and their rules set again without
//! duplicates.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use can_dra_dataplane::bus::model::BusSpec;
use can_dra_dataplane::bus::naming::{is_tunnel_link, tunnel_link_names};
use can_dra_tunnel::{CountersSnapshot, Endpoint, EndpointConfig, Namespaces, PeerClass};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::plane::DataPlane;
use crate::shared_buses::{CanBusReader, SharedBus};

/// What this node runs for one bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPlan {
    /// The CanBus name.
    pub bus: String,
    /// The name of the bus's mesh on this node (its pool name).
    pub mesh: String,
    /// Whether the bus carries CAN FD.
    pub fd: bool,
    /// The pair end that joins the mesh.
    pub mesh_link: String,
    /// The pair end the endpoint's socket uses.
    pub tunnel_link: String,
    /// Where the endpoint listens.
    pub listen: SocketAddr,
    /// The other nodes' endpoints.
    pub peers: Vec<SocketAddr>,
    /// The external peers this node serves.
    pub external: Vec<SocketAddr>,
    /// The physical controller `spec.physical` attaches on this node.
    pub physical: Option<String>,
}

impl TunnelPlan {
    /// Whether `other` needs the same links and listener (it may differ in peers).
    fn same_shape(&self, other: &Self) -> bool {
        Self {
            peers: Vec::new(),
            external: Vec::new(),
            ..self.clone()
        } == Self {
            peers: Vec::new(),
            external: Vec::new(),
            ..other.clone()
        }
    }

    /// Every peer of the endpoint with its class: node peers, then external peers.
    pub fn classified_peers(&self) -> Vec<(SocketAddr, PeerClass)> {
        let nodes = self.peers.iter().map(|addr| (*addr, PeerClass::Node));
        let external = self
            .external
            .iter()
            .map(|addr| (*addr, PeerClass::External));
        nodes.chain(external).collect()
    }
}

/// The tunnels this node needs: one per bus where the node has an endpoint in the status, has
/// prepared members (`local_pools`), a physical attachment or external peers to serve. Problems with single buses (no
/// port yet, an unreadable endpoint) are returned as messages naming the bus; the rest of the
/// plan stands.
pub fn plan(
    node: &str,
    address: IpAddr,
    buses: &[SharedBus],
    local_pools: &BTreeSet<String>,
) -> (BTreeMap<String, TunnelPlan>, Vec<String>) {
    let mut plans = BTreeMap::new();
    let mut problems = Vec::new();
    for bus in buses {
        let physical: Vec<&str> = bus.physical_on(node).collect();
        let external = bus.external_peers_served_by(node);
        let takes_part = bus.endpoints.contains_key(node)
            || local_pools.contains(&bus.pool())
            || !physical.is_empty()
            || !external.is_empty();
        if !takes_part {
            continue;
        }
        let Some(port) = bus.tunnel_port else {
            problems.push(format!(
                "CanBus {}: status.tunnelPort is not set yet; no tunnel",
                bus.name
            ));
            continue;
        };
        if let [_, extra @ ..] = physical.as_slice()
            && !extra.is_empty()
        {
            problems.push(format!(
                "CanBus {}: only one physical attachment per node is bridged; ignoring {}",
                bus.name,
                extra.join(", ")
            ));
        }
        let mut peers = Vec::new();
        for (other, endpoint) in &bus.endpoints {
            if other == node {
                continue;
            }
            match endpoint.parse::<SocketAddr>() {
                Ok(addr) => peers.push(addr),
                Err(error) => problems.push(format!(
                    "CanBus {}: status.endpoints[{other}] {endpoint:?}: {error}",
                    bus.name
                )),
            }
        }
        let (mesh_link, tunnel_link) = tunnel_link_names(&bus.name);
        plans.insert(
            bus.name.clone(),
            TunnelPlan {
                bus: bus.name.clone(),
                mesh: bus.pool(),
                fd: bus.spec.fd,
                mesh_link,
                tunnel_link,
                listen: SocketAddr::new(address, port),
                peers,
                external,
                physical: physical.first().map(|p| (*p).to_owned()),
            },
        );
    }
    (plans, problems)
}

/// A running endpoint, as the manager uses it.
pub trait TunnelEndpoint: Send + Sync + 'static {
    /// Replaces the peer set.
    fn set_peers(&self, peers: &[(SocketAddr, PeerClass)]);
    /// The endpoint's counters.
    fn counters(&self) -> CountersSnapshot;
    /// Stops it.
    fn shutdown(self) -> impl Future<Output = Result<(), String>> + Send;
}

impl TunnelEndpoint for Endpoint {
    fn set_peers(&self, peers: &[(SocketAddr, PeerClass)]) {
        Endpoint::set_classified_peers(self, peers.iter().copied());
    }

    fn counters(&self) -> CountersSnapshot {
        Endpoint::counters(self)
    }

    async fn shutdown(self) -> Result<(), String> {
        Endpoint::shutdown(self).await.map_err(|e| e.to_string())
    }
}

/// The operating-system effects of the tunnels: links, the bus mesh and endpoints.
pub trait TunnelHost: Send + 'static {
    /// The endpoint type.
    type Endpoint: TunnelEndpoint;
    /// The names of the tunnel links on the host ([`is_tunnel_link`]).
    fn links(&mut self) -> impl Future<Output = Result<Vec<String>, String>> + Send;
    /// Deletes a host link (its pair goes with it).
    fn delete_link(&mut self, name: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// Makes sure the pair exists with the plan's MTU and is the tunnel interface (with the
    /// physical attachment) of the plan's mesh.
    fn attach(&mut self, plan: &TunnelPlan) -> impl Future<Output = Result<(), String>> + Send;
    /// Takes the pair out of the mesh and deletes it.
    fn detach(&mut self, plan: &TunnelPlan) -> impl Future<Output = Result<(), String>> + Send;
    /// Starts an endpoint on the plan's tunnel link and address, with no peers.
    fn start(
        &mut self,
        plan: &TunnelPlan,
    ) -> impl Future<Output = Result<Self::Endpoint, String>> + Send;
}

/// What one [`Tunnels::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Buses whose endpoint was started.
    pub started: Vec<String>,
    /// Buses whose endpoint was stopped and links removed.
    pub stopped: Vec<String>,
    /// Buses whose peers changed.
    pub repeered: Vec<String>,
    /// Leftover tunnel links deleted.
    pub links_deleted: Vec<String>,
    /// Buses (or links) that failed, with why.
    pub failed: Vec<(String, String)>,
}

impl ApplyReport {
    /// Whether nothing changed and nothing failed.
    pub fn is_quiet(&self) -> bool {
        self.started.is_empty()
            && self.stopped.is_empty()
            && self.repeered.is_empty()
            && self.links_deleted.is_empty()
            && self.failed.is_empty()
    }
}

struct Running<E> {
    plan: TunnelPlan,
    endpoint: E,
}

/// The node's tunnels at run time.
pub struct Tunnels<H: TunnelHost> {
    host: H,
    running: BTreeMap<String, Running<H::Endpoint>>,
}

impl<H: TunnelHost> std::fmt::Debug for Tunnels<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnels")
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<H: TunnelHost> Tunnels<H> {
    /// No tunnels yet; nothing is touched before [`apply`](Self::apply).
    pub fn new(host: H) -> Self {
        Self {
            host,
            running: BTreeMap::new(),
        }
    }

    /// The buses with a running endpoint.
    pub fn running(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    /// The current peers of a bus's endpoint.
    pub fn plan_of(&self, bus: &str) -> Option<&TunnelPlan> {
        self.running.get(bus).map(|r| &r.plan)
    }

    /// Counters of every running endpoint.
    pub fn counters(&self) -> BTreeMap<String, CountersSnapshot> {
        self.running
            .iter()
            .map(|(bus, running)| (bus.clone(), running.endpoint.counters()))
            .collect()
    }

    /// Makes the running tunnels match `wanted`: stops what is no longer wanted (or changed
    /// shape: address, port, FD, physical attachment), deletes leftover tunnel links, starts what
    /// is missing and gives every endpoint its peers. A bus that fails is cleaned up and retried
    /// on the next call; the others go on.
    pub async fn apply(&mut self, wanted: &BTreeMap<String, TunnelPlan>) -> ApplyReport {
        let mut report = ApplyReport::default();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(bus, running)| {
                wanted
                    .get(*bus)
                    .is_none_or(|plan| !plan.same_shape(&running.plan))
            })
            .map(|(bus, _)| bus.clone())
            .collect();
        for bus in stale {
            if let Some(running) = self.running.remove(&bus) {
                self.stop(running, &mut report).await;
            }
        }

        let keep: BTreeSet<&str> = wanted
            .values()
            .flat_map(|plan| [plan.mesh_link.as_str(), plan.tunnel_link.as_str()])
            .collect();
        match self.host.links().await {
            Ok(links) => {
                // Only tunnel links, whatever the host reports: nothing else is ours to delete.
                let leftovers = links
                    .iter()
                    .filter(|l| is_tunnel_link(l) && !keep.contains(l.as_str()));
                for link in leftovers {
                    match self.host.delete_link(link).await {
                        Ok(()) => report.links_deleted.push(link.clone()),
                        Err(error) => report.failed.push((link.clone(), error)),
                    }
                }
            }
            Err(error) => report.failed.push(("tunnel links".into(), error)),
        }

        for (bus, plan) in wanted {
            if let Some(running) = self.running.get_mut(bus) {
                if running.plan.peers != plan.peers || running.plan.external != plan.external {
                    running.endpoint.set_peers(&plan.classified_peers());
                    running.plan.peers = plan.peers.clone();
                    running.plan.external = plan.external.clone();
                    report.repeered.push(bus.clone());
                }
                continue;
            }
            match self.start(plan).await {
                Ok(endpoint) => {
                    endpoint.set_peers(&plan.classified_peers());
                    self.running.insert(
                        bus.clone(),
                        Running {
                            plan: plan.clone(),
                            endpoint,
                        },
                    );
                    report.started.push(bus.clone());
                }
                Err(error) => report.failed.push((bus.clone(), error)),
            }
        }
        report
    }

    async fn start(&mut self, plan: &TunnelPlan) -> Result<H::Endpoint, String> {
        let started = match self.host.attach(plan).await {
            Ok(()) => self.host.start(plan).await,
            Err(error) => Err(error),
        };
        if started.is_err()
            && let Err(undo) = self.host.detach(plan).await
        {
            tracing::warn!(bus = %plan.bus, error = %undo, "removing a half-built tunnel failed");
        }
        started
    }

    async fn stop(&mut self, running: Running<H::Endpoint>, report: &mut ApplyReport) {
        let bus = running.plan.bus.clone();
        if let Err(error) = running.endpoint.shutdown().await {
            tracing::warn!(%bus, %error, "the tunnel endpoint did not stop cleanly");
        }
        match self.host.detach(&running.plan).await {
            Ok(()) => report.stopped.push(bus),
            Err(error) => report.failed.push((bus, error)),
        }
    }

    /// Stops every endpoint but keeps the links and rules, so a daemon taking over (a rolling
    /// update) finds the mesh in place.
    pub async fn stop_endpoints(&mut self) {
        for (bus, running) in std::mem::take(&mut self.running) {
            if let Err(error) = running.endpoint.shutdown().await {
                tracing::warn!(%bus, %error, "the tunnel endpoint did not stop cleanly");
            }
        }
    }
}

/// [`TunnelHost`] over the node's data plane and real endpoints.
#[derive(Debug, Clone)]
pub struct KernelTunnelHost {
    plane: DataPlane,
}

impl KernelTunnelHost {
    /// Tunnels in `plane` (the daemon's own network namespace), shared with the node driver.
    pub fn new(plane: DataPlane) -> Self {
        Self { plane }
    }
}

impl TunnelHost for KernelTunnelHost {
    type Endpoint = Endpoint;

    async fn links(&mut self) -> Result<Vec<String>, String> {
        self.plane.tunnel_links().await.map_err(|e| e.to_string())
    }

    async fn delete_link(&mut self, name: &str) -> Result<(), String> {
        self.plane
            .delete_host_link(name)
            .await
            .map_err(|e| e.to_string())
    }

    async fn attach(&mut self, plan: &TunnelPlan) -> Result<(), String> {
        let mut mesh = BusSpec::new(plan.mesh.clone());
        mesh.fd = plan.fd;
        mesh.physical = plan.physical.clone();
        mesh.tunnel = Some(plan.mesh_link.clone());
        self.plane
            .attach_tunnel(mesh, &plan.tunnel_link)
            .await
            .map_err(|e| e.to_string())
    }

    async fn detach(&mut self, plan: &TunnelPlan) -> Result<(), String> {
        self.plane
            .detach_tunnel(&plan.mesh, [&plan.mesh_link, &plan.tunnel_link])
            .await
            .map_err(|e| e.to_string())
    }

    async fn start(&mut self, plan: &TunnelPlan) -> Result<Endpoint, String> {
        let config = EndpointConfig::new(plan.listen, plan.tunnel_link.clone());
        Endpoint::start(config, Namespaces::default())
            .await
            .map_err(|e| format!("CanBus {}: starting the tunnel endpoint: {e}", plan.bus))
    }
}

/// How the daemon runs its tunnels.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// This node's name, as in the CanBus status.
    pub node: String,
    /// The address endpoints listen on (`--tunnel-address`).
    pub address: IpAddr,
    /// How often CanBuses are read again.
    pub resync: Duration,
    /// How often the counters are logged (at debug).
    pub counters_every: Duration,
}

/// Follows the CanBuses until `shutdown`: reads them every `resync`, plans (with the node's
/// prepared cluster-wide pools as `local_pools` holds them then) and applies. On shutdown the
/// endpoints stop and the links stay for the next daemon.
pub async fn run<H: TunnelHost>(
    settings: TunnelSettings,
    reader: CanBusReader,
    local_pools: watch::Receiver<BTreeSet<String>>,
    mut tunnels: Tunnels<H>,
    shutdown: CancellationToken,
) {
    let mut last_problems: Vec<String> = Vec::new();
    let mut last_counters = tokio::time::Instant::now();
    loop {
        // A hanging API call must not hold up the shutdown.
        let listed = tokio::select! {
            () = shutdown.cancelled() => break,
            listed = reader.list() => listed,
        };
        match listed {
            Ok(listed) => {
                let mut buses = Vec::new();
                let mut problems = Vec::new();
                for bus in listed {
                    match bus {
                        Ok(bus) => buses.push(bus),
                        Err(error) => problems.push(error.to_string()),
                    }
                }
                let local = local_pools.borrow().clone();
                let (wanted, planning) = plan(&settings.node, settings.address, &buses, &local);
                problems.extend(planning);
                let report = tunnels.apply(&wanted).await;
                if !report.is_quiet() {
                    tracing::info!(
                        started = ?report.started,
                        stopped = ?report.stopped,
                        repeered = ?report.repeered,
                        links_deleted = ?report.links_deleted,
                        "tunnels changed"
                    );
                }
                problems.extend(
                    report
                        .failed
                        .iter()
                        .map(|(what, why)| format!("{what}: {why}")),
                );
                if problems != last_problems {
                    for problem in &problems {
                        tracing::warn!(%problem, "tunnel");
                    }
                    last_problems = problems;
                }
            }
            Err(error) => tracing::warn!(%error, "reading CanBuses failed; tunnels unchanged"),
        }
        if last_counters.elapsed() >= settings.counters_every {
            last_counters = tokio::time::Instant::now();
            for (bus, counters) in tunnels.counters() {
                tracing::debug!(
                    %bus,
                    from_can = counters.frames_from_can,
                    to_can = counters.frames_to_can,
                    rejected = counters.rejected(),
                    peers = ?counters.peers,
                    drops = ?counters.drops,
                    "tunnel counters"
                );
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(settings.resync) => {}
        }
    }
    tunnels.stop_endpoints().await;
}

#[cfg(test)]
mod tests;
