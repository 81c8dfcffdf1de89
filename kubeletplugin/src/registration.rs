//! The kubelet plugin-watcher `Registration` service, served on the registration socket.
//!
//! The kubelet discovers the socket, asks [`GetInfo`](RegistrationService) who we are and which
//! services we speak, then reports the outcome through `NotifyRegistrationStatus`, which we
//! keep observable for the rest of the driver (readiness, logs).

use std::path::Path;

use can_dra_proto::registration::registration_server::{Registration, RegistrationServer};
use can_dra_proto::registration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use can_dra_proto::{
    DRA_PLUGIN_TYPE, DRA_V1_SERVICE, DRA_V1BETA1_SERVICE, HEALTH_V1_SERVICE,
    HEALTH_V1ALPHA1_SERVICE,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// The services advertised in `PluginInfo.supported_versions`, in this order:
///
/// - DRA before health, and `v1.DRAPlugin` before `v1beta1.DRAPlugin`: the kubelet walks the
///   list in order and uses the first DRA service it knows, so a 1.34+ kubelet gets v1 and an
///   older one falls through to v1beta1 (the Go helper's order, too).
/// - `v1.DRAResourceHealth` before `v1alpha1.DRAResourceHealth`: 1.37 kubelets pick the health
///   service themselves (v1 first), and older ones ignore entries they do not know; listing v1
///   first keeps the list in preference order for any reader.
pub const SUPPORTED_VERSIONS: [&str; 4] = [
    DRA_V1_SERVICE,
    DRA_V1BETA1_SERVICE,
    HEALTH_V1_SERVICE,
    HEALTH_V1ALPHA1_SERVICE,
];

/// What the kubelet last told us through `NotifyRegistrationStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationOutcome {
    /// Whether the kubelet registered the plugin.
    pub registered: bool,
    /// The kubelet's reason when it did not; empty otherwise.
    pub error: String,
}

/// The `Registration` service of one plugin instance.
#[derive(Debug)]
pub struct RegistrationService {
    info: PluginInfo,
    outcome: watch::Sender<Option<RegistrationOutcome>>,
}

impl RegistrationService {
    /// A service announcing `driver_name` with its DRA service at `endpoint` (an absolute
    /// socket path).
    pub fn new(driver_name: &str, endpoint: &Path) -> Self {
        let info = PluginInfo {
            r#type: DRA_PLUGIN_TYPE.to_owned(),
            name: driver_name.to_owned(),
            endpoint: endpoint.to_string_lossy().into_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        };
        let (outcome, _) = watch::channel(None);
        Self { info, outcome }
    }

    /// The registration outcome: `None` until the kubelet reports, then its latest report.
    pub fn outcome(&self) -> watch::Receiver<Option<RegistrationOutcome>> {
        self.outcome.subscribe()
    }

    /// Wraps the service for a tonic router.
    pub fn into_server(self) -> RegistrationServer<Self> {
        RegistrationServer::new(self)
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> Result<Response<PluginInfo>, Status> {
        tracing::debug!(info = ?self.info, "kubelet asked for plugin info");
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let outcome = RegistrationOutcome {
            registered: status.plugin_registered,
            error: status.error,
        };
        self.outcome.send_replace(Some(outcome.clone()));
        if outcome.registered {
            tracing::info!(driver = %self.info.name, "registered with the kubelet");
            Ok(Response::new(RegistrationStatusResponse {}))
        } else {
            tracing::error!(
                driver = %self.info.name,
                kubelet_error = %outcome.error,
                "the kubelet rejected the registration"
            );
            Err(Status::internal(format!(
                "registration of {} failed: {}",
                self.info.name, outcome.error
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn info_names_the_driver_and_its_endpoint() {
        let service = RegistrationService::new("dra.example", Path::new("/p/dra.example/dra.sock"));
        let info = service
            .get_info(Request::new(InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.r#type, "DRAPlugin");
        assert_eq!(info.name, "dra.example");
        assert_eq!(info.endpoint, "/p/dra.example/dra.sock");
        assert_eq!(
            info.supported_versions,
            [
                "v1.DRAPlugin",
                "v1beta1.DRAPlugin",
                "v1.DRAResourceHealth",
                "v1alpha1.DRAResourceHealth"
            ]
        );
    }

    #[tokio::test]
    async fn a_rejection_is_stored_and_answered_with_an_error() {
        let service = RegistrationService::new("dra.example", Path::new("/s"));
        let outcome = service.outcome();
        assert_eq!(*outcome.borrow(), None);
        let status = service
            .notify_registration_status(Request::new(RegistrationStatus {
                plugin_registered: false,
                error: "duplicate endpoint".into(),
            }))
            .await
            .unwrap_err();
        assert!(
            status.message().contains("duplicate endpoint"),
            "{status:?}"
        );
        assert_eq!(
            *outcome.borrow(),
            Some(RegistrationOutcome {
                registered: false,
                error: "duplicate endpoint".into()
            })
        );
    }
}
