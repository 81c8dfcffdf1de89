//! `can-dra-controller`: the can-dra cluster controller (CanBus resources, cluster-wide
//! ResourceSlices, tunnel membership).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use can_dra_cluster::canbus::{CanBus, crd_yaml};
use can_dra_cluster::naming::driver_selector;
use can_dra_controller::cleanup;
use can_dra_controller::lease::LeaderLease;
use can_dra_controller::reconciler::{
    self, Context, ReconcileError, Stores, store_ready, uses_claims,
};
use clap::{Parser, Subcommand};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};

/// How often a healthy bus is re-published anyway (repairs edits made behind our back).
const RESYNC: Duration = Duration::from_secs(300);
/// How long to wait after a failed reconcile.
const RETRY: Duration = Duration::from_secs(30);
/// How long bursts of changes are gathered into one reconcile of a bus.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Parses `500ms`, `2s` or `2` (seconds).
fn parse_duration(input: &str) -> Result<Duration, String> {
    let (number, scale) = if let Some(ms) = input.strip_suffix("ms") {
        (ms, 1)
    } else {
        (input.strip_suffix('s').unwrap_or(input), 1000)
    };
    let value: u64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{input:?} is not a duration such as 500ms or 15s"))?;
    let millis = value.saturating_mul(scale);
    if millis == 0 {
        return Err(format!("{input:?}: the duration must be positive"));
    }
    Ok(Duration::from_millis(millis))
}

/// The can-dra cluster controller.
#[derive(Debug, Parser)]
#[command(name = "can-dra-controller", version, about, long_about = None)]
struct ControllerArgs {
    /// Path to a kubeconfig file; the in-cluster configuration is used when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,

    /// The DRA driver name.
    #[arg(long, env = "CAN_DRA_DRIVER_NAME", default_value = "can.dra.dev")]
    driver_name: String,

    /// This replica's identity in the leader Lease; the host name when absent.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// The namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,

    /// Run without leader election (a single replica, e.g. during development).
    #[arg(long)]
    no_leader_election: bool,

    /// How long the leader Lease holds without renewal (whole seconds in the Lease; the leader
    /// renews every third of it).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,

    /// How often a follower tries to take the Lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    lease_retry: Duration,

    /// How often slices of deleted buses and deleted nodes are swept (owner references let the
    /// garbage collector do it; the sweep catches slices without them).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    sweep_interval: Duration,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CanBus CustomResourceDefinition as YAML.
    Crd,
}

fn error_policy(bus: Arc<CanBus>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(bus = %bus.name_any(), %error, "cannot reconcile the bus");
    Action::requeue(RETRY)
}

async fn client(args: &ControllerArgs) -> anyhow::Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("cannot use kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("cannot find the cluster configuration")?,
    };
    Client::try_from(config).context("cannot build the Kubernetes client")
}

/// Waits until this replica leads, then keeps renewing; the returned receiver fires when the
/// lead is lost (a renewal refused, or none succeeded for a whole Lease duration).
async fn lead(lease: LeaderLease, retry: Duration) -> tokio::sync::oneshot::Receiver<()> {
    loop {
        match lease.try_lead().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot acquire the leader Lease"),
        }
        tokio::time::sleep(retry).await;
    }
    tracing::info!("leading");
    let (lost, lost_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(lease.duration() / 3).await;
            match lease.try_lead().await {
                Ok(true) => last = tokio::time::Instant::now(),
                Ok(false) => break,
                Err(error) => {
                    tracing::warn!(%error, "cannot renew the leader Lease");
                    if last.elapsed() >= lease.duration() {
                        break;
                    }
                }
            }
        }
        let _ = lost.send(());
    });
    lost_rx
}

/// A watch of `api` kept in a reflector store, and the stream of its events that `relevant`
/// turns into reconcile triggers. The store fills only while the stream is polled.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    relevant: impl Fn(&watcher::Event<K>) -> bool + Send + 'static,
) -> (Store<K>, BoxStream<'static, watcher::Event<K>>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let events = reflector::reflector(writer, watcher(api, config).default_backoff())
        .filter_map(move |event| {
            let event = match event {
                Ok(event) => Some(event).filter(|e| relevant(e)),
                Err(error) => {
                    tracing::warn!(%error, kind = %K::kind(&()), "watch failed; retrying");
                    None
                }
            };
            futures::future::ready(event)
        })
        .boxed();
    (reader, events)
}

/// Whether a watch event changes what the reconcile sees (objects during a re-list only count
/// once the list is complete).
fn settled<K>(event: &watcher::Event<K>) -> bool {
    !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_))
}

/// The claim, pod and node watches: their stores, and one stream of reconcile triggers. A
/// deleted node's node-local slices are removed as the deletion is seen.
fn cluster_watches(
    client: &Client,
    driver: &str,
) -> (Stores, impl Stream<Item = ()> + use<>, Controller<CanBus>) {
    let buses: Api<CanBus> = Api::all(client.clone());
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let controller = Controller::new(buses, watcher::Config::default())
        .owns(
            slices,
            watcher::Config::default().fields(&driver_selector(driver)),
        )
        .with_config(controller::Config::default().debounce(DEBOUNCE));
    let (claims, claim_events) = reflect(
        Api::<ResourceClaim>::all(client.clone()),
        watcher::Config::default(),
        settled,
    );
    let (pods, pod_events) = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        |e| match e {
            watcher::Event::Apply(pod) | watcher::Event::Delete(pod) => uses_claims(pod),
            other => settled(other),
        },
    );
    let (nodes, node_events) = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        settled,
    );
    // The sweep and the port assignment read the buses from the Controller's store; the sweep
    // waits for its first full list (`store_ready`), or it would delete the slices of every bus.
    let buses = controller.store();
    let cleaner = client.clone();
    let driver = driver.to_owned();
    let node_events = node_events.then(move |event| {
        let (client, driver) = (cleaner.clone(), driver.clone());
        async move {
            if let watcher::Event::Delete(node) = &event {
                let name = node.name_any();
                match cleanup::remove_node_slices(client, &driver, &name).await {
                    Ok(count) => tracing::info!(node = %name, slices = count, "node deleted: removed its slices"),
                    Err(error) => tracing::warn!(node = %name, %error, "cannot remove the slices of a deleted node"),
                }
            }
        }
    });
    let triggers = futures::stream::select_all([
        claim_events.map(drop).boxed(),
        pod_events.map(drop).boxed(),
        node_events.boxed(),
    ]);
    let stores = Stores {
        buses,
        claims,
        pods,
        nodes,
    };
    (stores, triggers, controller)
}

/// Every `interval`: deletes the slices of buses that are gone (the garbage collector's job,
/// unless the owner reference was lost) and of nodes that are gone, and frees their ports.
fn spawn_sweeper(
    ctx: Arc<Context>,
    stores: Stores,
    client: Client,
    driver: String,
    interval: Duration,
) {
    tokio::spawn(async move {
        if store_ready(&stores.buses).await.is_err() || store_ready(&stores.nodes).await.is_err() {
            return;
        }
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            let live: BTreeSet<String> =
                stores.buses.state().iter().map(|b| b.name_any()).collect();
            ctx.forget_ports(&live);
            if let Err(error) = ctx.publisher().sweep(&live).await {
                tracing::warn!(%error, "cannot sweep the slices of deleted buses");
            }
            let nodes = ctx.live_nodes();
            if let Err(error) = cleanup::sweep_node_slices(client.clone(), &driver, &nodes).await {
                tracing::warn!(%error, "cannot sweep the slices of deleted nodes");
            }
        }
    });
}

async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    if args.lease_duration < Duration::from_secs(1) {
        // The Lease stores whole seconds: less would be a Lease that expires as it is taken.
        bail!("--lease-duration must be at least 1s");
    }
    let client = client(&args).await?;
    let lost = if args.no_leader_election {
        None
    } else {
        let identity = args
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .context("no identity for the leader Lease: set --identity or POD_NAME")?;
        let name = format!("{}-controller", args.driver_name);
        let lease = LeaderLease::new(
            client.clone(),
            &args.lease_namespace,
            &name,
            &identity,
            args.lease_duration,
        );
        Some(lead(lease, args.lease_retry).await)
    };
    let lost_lead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stores, triggers, controller) = cluster_watches(&client, &args.driver_name);
    let ctx = Arc::new(Context::new(
        client.clone(),
        &args.driver_name,
        stores.clone(),
        RESYNC,
    ));
    spawn_sweeper(
        ctx.clone(),
        stores,
        client,
        args.driver_name.clone(),
        args.sweep_interval,
    );
    let controller = controller.reconcile_all_on(triggers);
    let controller = match lost {
        Some(lost) => {
            let flag = lost_lead.clone();
            controller.graceful_shutdown_on(async move {
                // A dropped sender means the renewing task died: the lead is lost as well.
                let _ = lost.await;
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        }
        None => controller,
    };
    tracing::info!(driver = %args.driver_name, "reconciling CanBus resources");
    controller
        .shutdown_on_signal()
        .run(reconciler::reconcile, error_policy, ctx)
        .for_each(|outcome| async move {
            if let Err(error) = outcome {
                tracing::debug!(%error, "reconcile did not complete");
            }
        })
        .await;
    if lost_lead.load(std::sync::atomic::Ordering::SeqCst) {
        // Exit so the pod restarts as a follower instead of acting on a stale lead.
        bail!("lost the leader Lease");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ControllerArgs::parse();
    if let Some(Command::Crd) = args.command {
        print!("{}", crd_yaml().context("cannot render the CanBus CRD")?);
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The chart sets CAN_DRA_LOG_FORMAT=json for log collectors.
    if std::env::var("CAN_DRA_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    run(args).await
}
