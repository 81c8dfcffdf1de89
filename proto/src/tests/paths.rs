//! Drives each generated client against a recording service to see the HTTP/2 requests the
//! kubelet side would send, and checks the server-side service names the plugin registers.

use std::io;
use std::sync::{Arc, Mutex};

use tonic::body::Body;
use tonic::server::NamedService;

use crate::{dra, health, registration};

/// What the recording service saw of one request: method, URI path and content type.
type Seen = (String, String, String);

/// Requests recorded so far, shared between the service and the test.
type SeenLog = Arc<Mutex<Vec<Seen>>>;

/// A stand-in transport that records each request and fails it, so no server is needed.
fn recording_service() -> (
    SeenLog,
    impl tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = io::Error> + Clone,
) {
    let seen = SeenLog::default();
    let log = Arc::clone(&seen);
    let service = tower::service_fn(move |request: http::Request<Body>| {
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        log.lock().unwrap().push((
            request.method().to_string(),
            request.uri().path().to_string(),
            content_type,
        ));
        async { Err(io::Error::other("recording service never answers")) }
    });
    (seen, service)
}

/// Asserts that the recorded requests were gRPC POSTs to exactly `paths`, in order.
fn assert_grpc_paths(seen: &Mutex<Vec<Seen>>, paths: &[&str]) {
    let seen = seen.lock().unwrap();
    let got: Vec<&str> = seen.iter().map(|(_, path, _)| path.as_str()).collect();
    assert_eq!(got, paths);
    for (method, _, content_type) in seen.iter() {
        assert_eq!(method, "POST");
        assert_eq!(content_type, "application/grpc");
    }
}

#[tokio::test]
async fn dra_v1_client_calls_kubelet_paths() {
    use dra::v1::dra_plugin_client::DraPluginClient;

    let (seen, service) = recording_service();
    let mut client = DraPluginClient::new(service);
    assert!(
        client
            .node_prepare_resources(dra::v1::NodePrepareResourcesRequest::default())
            .await
            .is_err()
    );
    assert!(
        client
            .node_unprepare_resources(dra::v1::NodeUnprepareResourcesRequest::default())
            .await
            .is_err()
    );
    assert_grpc_paths(
        &seen,
        &[
            "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources",
            "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources",
        ],
    );
}

#[tokio::test]
async fn dra_v1beta1_client_calls_kubelet_paths() {
    use dra::v1beta1::dra_plugin_client::DraPluginClient;

    let (seen, service) = recording_service();
    let mut client = DraPluginClient::new(service);
    assert!(
        client
            .node_prepare_resources(dra::v1beta1::NodePrepareResourcesRequest::default())
            .await
            .is_err()
    );
    assert!(
        client
            .node_unprepare_resources(dra::v1beta1::NodeUnprepareResourcesRequest::default())
            .await
            .is_err()
    );
    assert_grpc_paths(
        &seen,
        &[
            "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources",
            "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources",
        ],
    );
}

#[tokio::test]
async fn registration_client_calls_kubelet_paths() {
    use registration::registration_client::RegistrationClient;

    let (seen, service) = recording_service();
    let mut client = RegistrationClient::new(service);
    assert!(client.get_info(registration::InfoRequest {}).await.is_err());
    assert!(
        client
            .notify_registration_status(registration::RegistrationStatus::default())
            .await
            .is_err()
    );
    assert_grpc_paths(
        &seen,
        &[
            "/pluginregistration.Registration/GetInfo",
            "/pluginregistration.Registration/NotifyRegistrationStatus",
        ],
    );
}

#[tokio::test]
async fn health_clients_call_kubelet_paths() {
    let (seen, service) = recording_service();
    let mut alpha =
        health::v1alpha1::dra_resource_health_client::DraResourceHealthClient::new(service.clone());
    assert!(
        alpha
            .node_watch_resources(health::v1alpha1::NodeWatchResourcesRequest {})
            .await
            .is_err()
    );
    let mut ga = health::v1::dra_resource_health_client::DraResourceHealthClient::new(service);
    assert!(
        ga.node_watch_resources(health::v1::NodeWatchResourcesRequest {})
            .await
            .is_err()
    );
    assert_grpc_paths(
        &seen,
        &[
            "/v1alpha1.DRAResourceHealth/NodeWatchResources",
            "/v1.DRAResourceHealth/NodeWatchResources",
        ],
    );
}

#[test]
fn servers_register_upstream_service_names() {
    assert_eq!(
        <dra::v1::dra_plugin_server::DraPluginServer<()> as NamedService>::NAME,
        "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"
    );
    assert_eq!(
        <dra::v1beta1::dra_plugin_server::DraPluginServer<()> as NamedService>::NAME,
        "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin"
    );
    assert_eq!(
        <registration::registration_server::RegistrationServer<()> as NamedService>::NAME,
        "pluginregistration.Registration"
    );
    assert_eq!(
        <health::v1alpha1::dra_resource_health_server::DraResourceHealthServer<()> as NamedService>::NAME,
        "v1alpha1.DRAResourceHealth"
    );
    assert_eq!(
        <health::v1::dra_resource_health_server::DraResourceHealthServer<()> as NamedService>::NAME,
        "v1.DRAResourceHealth"
    );
}

/// The advertised string is the last package segment plus the service name.
fn advertised(service_name: &str) -> String {
    let mut segments = service_name.rsplit('.');
    let service = segments.next().unwrap_or_default();
    let version = segments.next().unwrap_or_default();
    format!("{version}.{service}")
}

#[test]
fn advertised_versions_name_the_served_services() {
    use crate::{DRA_V1_SERVICE, DRA_V1BETA1_SERVICE, HEALTH_V1_SERVICE, HEALTH_V1ALPHA1_SERVICE};

    assert_eq!(
        advertised(dra::v1::dra_plugin_server::SERVICE_NAME),
        DRA_V1_SERVICE
    );
    assert_eq!(
        advertised(dra::v1beta1::dra_plugin_server::SERVICE_NAME),
        DRA_V1BETA1_SERVICE
    );
    assert_eq!(
        advertised(health::v1alpha1::dra_resource_health_server::SERVICE_NAME),
        HEALTH_V1ALPHA1_SERVICE
    );
    assert_eq!(
        advertised(health::v1::dra_resource_health_server::SERVICE_NAME),
        HEALTH_V1_SERVICE
    );
    assert_eq!(crate::DRA_PLUGIN_TYPE, "DRAPlugin");
}
