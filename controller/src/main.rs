//! `can-dra-controller`: the can-dra cluster controller (CanBus resources, cluster-wide
//! ResourceSlices, tunnel membership).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use can_dra_controller::canbus::{CanBus, crd_yaml};
use can_dra_controller::lease::LeaderLease;
use can_dra_controller::slices::{BusSlicePublisher, SliceError};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

/// How often a healthy bus is re-published anyway (repairs edits made behind our back).
const RESYNC: Duration = Duration::from_secs(300);
/// How long to wait after a failed reconcile.
const RETRY: Duration = Duration::from_secs(30);
/// How often slices of buses that are gone are swept.
const SWEEP: Duration = Duration::from_secs(120);
/// How long one leader Lease acquisition or renewal holds.
const LEASE: Duration = Duration::from_secs(15);
/// How often a follower retries the Lease.
const LEASE_RETRY: Duration = Duration::from_secs(2);

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

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CanBus CustomResourceDefinition as YAML.
    Crd,
}

/// What every reconcile shares.
#[derive(Debug)]
struct Shared {
    publisher: BusSlicePublisher,
}

async fn reconcile(bus: Arc<CanBus>, shared: Arc<Shared>) -> Result<Action, SliceError> {
    shared.publisher.publish(&bus).await?;
    Ok(Action::requeue(RESYNC))
}

fn error_policy(bus: Arc<CanBus>, error: &SliceError, _shared: Arc<Shared>) -> Action {
    tracing::warn!(bus = %bus.name_any(), %error, "cannot publish the bus's ResourceSlices");
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
async fn lead(lease: LeaderLease) -> tokio::sync::oneshot::Receiver<()> {
    loop {
        match lease.try_lead().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot acquire the leader Lease"),
        }
        tokio::time::sleep(LEASE_RETRY).await;
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

async fn run(args: ControllerArgs) -> anyhow::Result<()> {
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
            LEASE,
        );
        Some(lead(lease).await)
    };
    let lost_lead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = BusSlicePublisher::new(client.clone(), args.driver_name.clone());
    let buses: Api<CanBus> = Api::all(client.clone());
    let slices: Api<ResourceSlice> = Api::all(client);
    let controller = Controller::new(buses, watcher::Config::default()).owns(
        slices,
        watcher::Config::default().fields(&format!("spec.driver={}", args.driver_name)),
    );

    // Owner references let the garbage collector remove a deleted bus's slices; the sweep
    // catches what it cannot, e.g. slices whose owner reference was stripped.
    let store = controller.store();
    let sweeper = publisher.clone();
    tokio::spawn(async move {
        if store.wait_until_ready().await.is_err() {
            return;
        }
        let mut ticks = tokio::time::interval(SWEEP);
        loop {
            ticks.tick().await;
            let live: BTreeSet<String> = store.state().iter().map(|b| b.name_any()).collect();
            if let Err(error) = sweeper.sweep(&live).await {
                tracing::warn!(%error, "cannot sweep the slices of deleted buses");
            }
        }
    });

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
        .run(reconcile, error_policy, Arc::new(Shared { publisher }))
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
