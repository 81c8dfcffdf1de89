//! `can-dra-kubelet-plugin`: the can-dra node daemon.
//!
//! Wires the parts together: the API client, the node inventory and its ResourceSlices, the
//! checkpoint, the CDI hook socket and the kubelet-facing gRPC servers; then waits for SIGTERM or
//! SIGINT and stops them in order. `--health-probe` checks a running daemon instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use can_dra_api::NodeConfig;
use can_dra_kubelet_plugin::adapters::{self, AdapterWatch};
use can_dra_kubelet_plugin::cdi::CdiWriter;
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::claim_status::StatusWriter;
use can_dra_kubelet_plugin::claims::ClaimReader;
use can_dra_kubelet_plugin::hook_socket::{self, HOOK_SOCKET_NAME};
use can_dra_kubelet_plugin::node::{NodeDriver, NodeParts};
use can_dra_kubelet_plugin::shared_buses::CanBusReader;
use can_dra_kubelet_plugin::slices::SlicePublisher;
use can_dra_kubelet_plugin::tunnels::{self, KernelTunnelHost, TunnelSettings, Tunnels};
use can_dra_kubelet_plugin::{cli::PluginArgs, logging};
use can_dra_proto::dra::v1::NodePrepareResourcesRequest;
use can_dra_proto::dra::v1::dra_plugin_client::DraPluginClient;
use can_dra_proto::registration::InfoRequest;
use can_dra_proto::registration::registration_client::RegistrationClient;
use dra_kubeletplugin::server::{PluginConfig, PluginServer};
use dra_kubeletplugin::sockets::SocketLayout;

/// How long each call of the health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = PluginArgs::parse();
    logging::init(args.log_format);
    if args.health_probe {
        return probe(&args).await;
    }
    tracing::info!(node = %args.node_name, driver = %args.driver_name, "starting");
    run(args).await
}

async fn kube_client(args: &PluginArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster configuration")?,
    };
    kube::Client::try_from(config).context("building the API client")
}

fn node_config(path: Option<&Path>) -> anyhow::Result<NodeConfig> {
    let Some(path) = path else {
        return Ok(NodeConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the node configuration {}", path.display()))?;
    NodeConfig::from_yaml_str(&text)
        .with_context(|| format!("in the node configuration {}", path.display()))
}

async fn run(args: PluginArgs) -> anyhow::Result<()> {
    let client = kube_client(&args).await?;
    let config = node_config(args.config.as_deref())?;
    let inventory = adapters::list_inventory_async(&config)
        .await
        .context("listing the node's CAN controllers")?;
    let publisher = SlicePublisher::new(client.clone(), &args.driver_name, &args.node_name);
    let report = publisher
        .publish(&inventory)
        .await
        .context("publishing the node's ResourceSlices")?;
    tracing::info!(slices = ?report.slices, generation = report.generation, "slices published");

    let data_dir: PathBuf = args.kubelet_plugins_dir.join(&args.driver_name);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let socket_path = data_dir.join(HOOK_SOCKET_NAME);
    let driver = Arc::new(
        NodeDriver::new(NodeParts {
            driver: args.driver_name.clone(),
            node: args.node_name.clone(),
            inventory,
            claims: ClaimReader::new(client.clone(), &args.driver_name),
            status: StatusWriter::new(client.clone(), &args.driver_name),
            cdi: CdiWriter::new(&args.cdi_dir, &args.driver_name, &args.hook_path)
                .with_hook_socket(&socket_path),
            checkpoint: CheckpointStore::new(data_dir.join("checkpoint.json")),
        })
        .context("starting the node driver")?
        .with_shared_buses(CanBusReader::new(client.clone())),
    );
    // Before serving, so a hook call for an attached pod finds it attached; a failure must not
    // keep pods from being prepared, so it is logged (by recover) and the daemon goes on.
    match driver.recover().await {
        Ok(report) => tracing::info!(
            dropped = report.dropped.len(),
            cdi_restored = report.cdi_restored.len(),
            reconciled = report.reconciled.is_some(),
            "recovered from the checkpoint"
        ),
        Err(error) => tracing::warn!(%error, "start-up reconcile failed; serving anyway"),
    }

    let shutdown = CancellationToken::new();
    let listener = hook_socket::bind(&socket_path)
        .with_context(|| format!("binding the hook socket {}", socket_path.display()))?;
    let hook_task = tokio::spawn(hook_socket::serve(
        listener,
        driver.clone(),
        shutdown.clone().cancelled_owned(),
    ));

    let mut plugin = PluginConfig::new(
        &args.driver_name,
        &args.kubelet_plugins_dir,
        &args.kubelet_registrar_dir,
    );
    plugin.pod_uid = args.pod_uid.clone();
    let adapter_watch = AdapterWatch::new(driver.clone(), publisher, config);
    let shared_pools = driver.watch_shared_pools();
    let plane = driver.data_plane().clone();
    let server = PluginServer::start(plugin, driver, shutdown.clone())
        .await
        .context("starting the kubelet plugin servers")?;
    tracing::info!(hook = %socket_path.display(), "serving");

    tokio::spawn(adapter_watch.run(adapters::RELIST_INTERVAL, shutdown.clone()));
    let tunnels = args.tunnel_address.map(|address| {
        tokio::spawn(tunnels::run(
            TunnelSettings {
                node: args.node_name.clone(),
                address,
                resync: args.tunnel_resync,
                counters_every: TUNNEL_COUNTERS_INTERVAL,
            },
            CanBusReader::new(client),
            shared_pools,
            Tunnels::new(KernelTunnelHost::new(plane)),
            shutdown.clone(),
        ))
    });
    let signals = shutdown.clone();
    tokio::spawn(async move {
        match wait_for_signal().await {
            Ok(name) => tracing::info!(signal = name, "shutting down"),
            Err(error) => tracing::error!(%error, "cannot wait for signals; shutting down"),
        }
        signals.cancel();
    });
    let served = server.wait().await;
    shutdown.cancel();
    if let Some(tunnels) = tunnels
        && let Err(error) = tunnels.await
    {
        tracing::warn!(%error, "the tunnel task failed");
    }
    if let Err(error) = hook_task.await {
        tracing::warn!(%error, "the hook server task failed");
    }
    if let Err(error) = std::fs::remove_file(&socket_path) {
        tracing::debug!(%error, "hook socket already gone");
    }
    served.context("the kubelet plugin servers failed")
}

/// How often the tunnel counters are logged (at debug).
const TUNNEL_COUNTERS_INTERVAL: Duration = Duration::from_secs(30);

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// A gRPC channel over a unix socket; the URI is a placeholder.
async fn connect(path: &Path) -> anyhow::Result<Channel> {
    let socket = path.to_path_buf();
    Endpoint::from_static("http://can-dra.invalid")
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .with_context(|| format!("connecting to {}", path.display()))
}

async fn probe(args: &PluginArgs) -> anyhow::Result<()> {
    let layout = SocketLayout::new(
        &args.driver_name,
        &args.kubelet_plugins_dir,
        &args.kubelet_registrar_dir,
        args.pod_uid.as_deref(),
    )
    .context("computing the socket paths")?;
    let info = RegistrationClient::new(connect(&layout.registration_socket).await?)
        .get_info(InfoRequest {})
        .await
        .context("GetInfo on the registration socket")?
        .into_inner();
    if info.name != args.driver_name {
        bail!(
            "the registration socket serves driver {:?}, expected {:?}",
            info.name,
            args.driver_name
        );
    }
    DraPluginClient::new(connect(Path::new(&info.endpoint)).await?)
        .node_prepare_resources(NodePrepareResourcesRequest { claims: Vec::new() })
        .await
        .context("an empty NodePrepareResources")?;
    println!("healthy: {} at {}", info.name, info.endpoint);
    Ok(())
}
