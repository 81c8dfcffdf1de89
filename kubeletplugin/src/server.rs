//! Running the plugin's two gRPC servers and stopping them cleanly.
//!
//! Start-up order follows the kubelet's expectations (`dra-api.md` §3.1 item 1): the DRA
//! service socket (DRA v1 and v1beta1, health v1 and v1alpha1) is listening before the
//! registration socket appears, because the kubelet calls the endpoint as soon as it has
//! registered the plugin. Shutdown runs the other way round: the registration socket goes
//! first (the kubelet deregisters the plugin), then the service stops.
//!
//! Both servers read their connections through [`AuthorityShim`], so that they answer whatever
//! HTTP/2 `:authority` a client sends (the kubelet's registration dial sends the socket path);
//! see [`crate::authority`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use dra_kubeletplugin::driver::Driver;
//! use dra_kubeletplugin::server::{PluginConfig, PluginServer};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run<D: Driver>(driver: Arc<D>) -> Result<(), Box<dyn std::error::Error>> {
//! let shutdown = CancellationToken::new(); // cancelled by the SIGTERM handler
//! let config = PluginConfig::new(
//!     "dra.example",
//!     "/var/lib/kubelet/plugins",
//!     "/var/lib/kubelet/plugins_registry",
//! );
//! let server = PluginServer::start(config, driver, shutdown.clone()).await?;
//! server.wait().await?; // returns once `shutdown` is cancelled and the sockets are gone
//! # Ok(())
//! # }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Server;

use crate::authority::AuthorityShim;
use crate::dra::DraService;
use crate::driver::Driver;
use crate::health::{HealthOptions, HealthService};
use crate::registration::{RegistrationOutcome, RegistrationService};
use crate::serializer::Serializer;
use crate::sockets::{self, SocketError, SocketFile, SocketLayout};

/// What the servers need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// The DRA driver name (`PluginInfo.name`, ResourceSlice `spec.driver`).
    pub driver_name: String,
    /// The kubelet's plugins directory (`/var/lib/kubelet/plugins`).
    pub plugins_dir: PathBuf,
    /// The kubelet's registration directory (`/var/lib/kubelet/plugins_registry`).
    pub registrar_dir: PathBuf,
    /// This plugin pod's UID; set it to run side by side with another instance during a
    /// rolling update (unique socket names, cross-instance serialisation).
    pub pod_uid: Option<String>,
    /// Timing of the health streams.
    pub health: HealthOptions,
    /// How long a stopping server may wait for calls in flight before it is cut off.
    pub shutdown_grace: Duration,
}

impl PluginConfig {
    /// A configuration without rolling updates and with default timings.
    pub fn new(
        driver_name: impl Into<String>,
        plugins_dir: impl Into<PathBuf>,
        registrar_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            driver_name: driver_name.into(),
            plugins_dir: plugins_dir.into(),
            registrar_dir: registrar_dir.into(),
            pod_uid: None,
            health: HealthOptions::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Errors of starting or running the servers.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Socket naming or binding failed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The plugin data directory could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A gRPC server stopped with an error.
    #[error("the {which} server failed: {source}")]
    Serve {
        /// `registration` or `DRA service`.
        which: &'static str,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A gRPC server stopped although no shutdown was requested.
    #[error("the {which} server stopped unexpectedly")]
    Stopped {
        /// `registration` or `DRA service`.
        which: &'static str,
    },
    /// A gRPC server task panicked.
    #[error("the {which} server task failed: {reason}")]
    Task {
        /// `registration` or `DRA service`.
        which: &'static str,
        /// The panic or cancellation.
        reason: String,
    },
}

const SERVICE: &str = "DRA service";
const REGISTRATION: &str = "registration";

type ServeTask = JoinHandle<Result<(), tonic::transport::Error>>;

/// One side (service or registration) of the running plugin.
#[derive(Debug)]
struct Side {
    which: &'static str,
    task: ServeTask,
    stop: CancellationToken,
    socket: SocketFile,
    _stop_on_drop: DropGuard,
}

impl Side {
    fn spawn(
        which: &'static str,
        router: tonic::transport::server::Router,
        listener: tokio::net::UnixListener,
        socket: SocketFile,
        stop: CancellationToken,
    ) -> Self {
        let signal = stop.clone().cancelled_owned();
        // Every connection goes through the shim so that any :authority is accepted.
        let incoming =
            UnixListenerStream::new(listener).map(|accepted| accepted.map(AuthorityShim::new));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal));
        tracing::info!(path = %socket.path().display(), "{which} socket listening");
        Self {
            which,
            task,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            socket,
        }
    }

    /// Stops the server (if still running), waits up to `grace` for calls in flight, and
    /// removes the socket. `ended` is the task's result when it finished on its own, which
    /// is an error even when the server returned no error.
    async fn stop(
        mut self,
        ended: Option<Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>>,
        grace: Duration,
    ) -> Result<(), ServerError> {
        let requested = ended.is_none();
        self.stop.cancel();
        let which = self.which;
        let result = match ended {
            Some(result) => Some(result),
            None => match tokio::time::timeout(grace, &mut self.task).await {
                Ok(result) => Some(result),
                Err(_) => {
                    tracing::warn!("{which} server did not stop within {grace:?}; cutting it off");
                    self.task.abort();
                    None
                }
            },
        };
        let removed = self.socket.remove();
        let outcome = match result {
            None | Some(Ok(Ok(()))) if requested => Ok(()),
            None | Some(Ok(Ok(()))) => Err(ServerError::Stopped { which }),
            Some(Ok(Err(source))) => Err(ServerError::Serve { which, source }),
            Some(Err(join)) => Err(ServerError::Task {
                which,
                reason: join.to_string(),
            }),
        };
        if let Ok(true) = removed {
            tracing::info!(path = %self.socket.path().display(), "{which} socket removed");
        }
        outcome.and(removed.map(|_| ()).map_err(ServerError::from))
    }
}

/// The running plugin: the DRA service and registration servers on their sockets.
#[derive(Debug)]
pub struct PluginServer {
    layout: SocketLayout,
    shutdown: CancellationToken,
    registration: watch::Receiver<Option<RegistrationOutcome>>,
    shutdown_grace: Duration,
    service: Side,
    registrar: Side,
}

impl PluginServer {
    /// Binds the service socket and starts serving on it, then does the same for the
    /// registration socket. Cancelling `shutdown` stops both (see [`wait`](Self::wait)).
    /// Must run inside a Tokio runtime.
    pub async fn start<D: Driver>(
        config: PluginConfig,
        driver: Arc<D>,
        shutdown: CancellationToken,
    ) -> Result<Self, ServerError> {
        let layout = SocketLayout::new(
            &config.driver_name,
            &config.plugins_dir,
            &config.registrar_dir,
            config.pod_uid.as_deref(),
        )?;
        std::fs::create_dir_all(&layout.plugin_data_dir).map_err(|source| {
            ServerError::CreateDir {
                path: layout.plugin_data_dir.clone(),
                source,
            }
        })?;

        let serializer = if layout.rolling_update {
            Serializer::across_instances(&layout.serialize_lock())
        } else {
            Serializer::in_process()
        };
        let health_feed = driver.health();
        let dra = DraService::new(driver, serializer);

        let (listener, socket) = sockets::bind(&layout.service_socket)?;
        // Health streams stop with the service side, so its graceful stop is not held up.
        let service_stop = CancellationToken::new();
        let health = HealthService::new(health_feed, config.health, service_stop.clone());
        let router = Server::builder()
            .add_service(dra.v1_server())
            .add_service(dra.v1beta1_server())
            .add_service(health.v1_server())
            .add_service(health.v1alpha1_server());
        let service = Side::spawn(SERVICE, router, listener, socket, service_stop);

        let registration_service =
            RegistrationService::new(&config.driver_name, &layout.service_socket);
        let registration = registration_service.outcome();
        // On error the service side is dropped, which stops it and removes its socket.
        let (listener, socket) = sockets::bind(&layout.registration_socket)?;
        let router = Server::builder().add_service(registration_service.into_server());
        let registrar = Side::spawn(
            REGISTRATION,
            router,
            listener,
            socket,
            CancellationToken::new(),
        );

        Ok(Self {
            layout,
            shutdown,
            registration,
            shutdown_grace: config.shutdown_grace,
            service,
            registrar,
        })
    }

    /// The socket paths in use.
    pub fn layout(&self) -> &SocketLayout {
        &self.layout
    }

    /// What the kubelet said about the registration (`None` until it says something).
    pub fn registration(&self) -> watch::Receiver<Option<RegistrationOutcome>> {
        self.registration.clone()
    }

    /// Runs until `shutdown` is cancelled or a server fails, then stops the registration
    /// server and removes its socket, then the service server and its socket.
    pub async fn wait(self) -> Result<(), ServerError> {
        let Self {
            shutdown,
            shutdown_grace,
            mut service,
            mut registrar,
            ..
        } = self;
        let (service_ended, registrar_ended) = tokio::select! {
            () = shutdown.cancelled() => (None, None),
            ended = &mut service.task => (Some(ended), None),
            ended = &mut registrar.task => (None, Some(ended)),
        };
        if service_ended.is_some() || registrar_ended.is_some() {
            tracing::error!("a gRPC server stopped on its own; stopping the plugin");
        }
        let registrar = registrar.stop(registrar_ended, shutdown_grace).await;
        let service = service.stop(service_ended, shutdown_grace).await;
        registrar.and(service)
    }

    /// Requests shutdown and waits for it, as [`wait`](Self::wait) does.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.wait().await
    }
}
