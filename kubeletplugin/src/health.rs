//! The DRA `DRAResourceHealth` service (`NodeWatchResources`), versions v1alpha1 and v1.
//!
//! Each stream sends the driver's complete device list at once, again on every change of the
//! driver's health feed, and again every [`HealthOptions::resend_interval`] so that the
//! kubelet, which turns devices Unknown when their last report is older than
//! `health_check_timeout_seconds`, keeps seeing fresh reports while nothing changes. Streams
//! end cleanly when the plugin shuts down (the server's graceful stop waits for them).

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use can_dra_proto::health::{v1, v1alpha1};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::driver::{DeviceHealth, HealthStatus};

/// The kubelet truncates longer messages; doing it here keeps the wire small.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Timing of the health streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthOptions {
    /// How often the full list is re-sent when nothing changed.
    pub resend_interval: Duration,
    /// `health_check_timeout_seconds` in every report: how long the kubelet trusts it.
    pub check_timeout: Duration,
}

impl Default for HealthOptions {
    /// Re-send every 10 s with a 30 s timeout (the kubelet's default): two re-sends may be
    /// lost before a device turns Unknown.
    fn default() -> Self {
        Self {
            resend_interval: Duration::from_secs(10),
            check_timeout: Duration::from_secs(30),
        }
    }
}

/// The health service of one plugin instance, serving both versions from one feed.
#[derive(Debug, Clone)]
pub struct HealthService {
    feed: watch::Receiver<Vec<DeviceHealth>>,
    options: HealthOptions,
    shutdown: CancellationToken,
}

/// One report as sent, version-independent.
#[derive(Debug, Clone)]
struct Report {
    devices: Vec<DeviceHealth>,
    sent_at: i64,
    timeout_seconds: i64,
}

/// A stream of health responses of one version.
pub type HealthStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send + 'static>>;

impl HealthService {
    /// A service streaming `feed`; streams end when `shutdown` is cancelled.
    pub fn new(
        feed: watch::Receiver<Vec<DeviceHealth>>,
        options: HealthOptions,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            feed,
            options,
            shutdown,
        }
    }

    /// The health v1alpha1 gRPC service.
    pub fn v1alpha1_server(
        &self,
    ) -> v1alpha1::dra_resource_health_server::DraResourceHealthServer<HealthV1alpha1> {
        v1alpha1::dra_resource_health_server::DraResourceHealthServer::new(HealthV1alpha1(
            self.clone(),
        ))
    }

    /// The health v1 gRPC service.
    pub fn v1_server(&self) -> v1::dra_resource_health_server::DraResourceHealthServer<HealthV1> {
        v1::dra_resource_health_server::DraResourceHealthServer::new(HealthV1(self.clone()))
    }

    /// Starts one stream, encoding each report with `encode`.
    fn watch<M: Send + 'static>(&self, encode: fn(&Report) -> M) -> HealthStream<M> {
        let (sender, receiver) = mpsc::channel(4);
        let mut feed = self.feed.clone();
        let options = self.options;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut resend = tokio::time::interval(options.resend_interval);
            resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick completes at once and sends the initial list.
            loop {
                let devices = tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = sender.closed() => break,
                    _ = resend.tick() => feed.borrow_and_update().clone(),
                    changed = feed.changed() => {
                        if changed.is_err() {
                            let gone = Status::unavailable("the driver's health feed closed");
                            let _ = sender.send(Err(gone)).await;
                            break;
                        }
                        // A change resets the periodic schedule.
                        resend.reset();
                        feed.borrow_and_update().clone()
                    }
                };
                let report = Report {
                    devices,
                    sent_at: unix_seconds(SystemTime::now()),
                    timeout_seconds: i64::try_from(options.check_timeout.as_secs())
                        .unwrap_or(i64::MAX),
                };
                tracing::debug!(devices = report.devices.len(), "sending device health");
                // A kubelet that stops reading must not hold the stream open past shutdown.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    sent = sender.send(Ok(encode(&report))) => if sent.is_err() { break },
                }
            }
            tracing::debug!("health stream ended");
        });
        Box::pin(ReceiverStream::new(receiver))
    }
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Cuts `message` to the kubelet's limit at a character boundary, marking the cut with "...".
fn truncate_message(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_owned();
    }
    let mut end = MAX_MESSAGE_BYTES - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// Health v1alpha1 over [`HealthService`].
#[derive(Debug)]
pub struct HealthV1alpha1(HealthService);

/// Health v1 over [`HealthService`].
#[derive(Debug)]
pub struct HealthV1(HealthService);

fn encode_v1alpha1(report: &Report) -> v1alpha1::NodeWatchResourcesResponse {
    let devices = report
        .devices
        .iter()
        .map(|d| v1alpha1::DeviceHealth {
            device: Some(v1alpha1::DeviceIdentifier {
                pool_name: d.pool.clone(),
                device_name: d.device.clone(),
            }),
            health: match d.status {
                HealthStatus::Healthy => v1alpha1::HealthStatus::Healthy,
                HealthStatus::Unhealthy => v1alpha1::HealthStatus::Unhealthy,
                HealthStatus::Unknown => v1alpha1::HealthStatus::Unknown,
            }
            .into(),
            last_updated_time: report.sent_at,
            health_check_timeout_seconds: report.timeout_seconds,
            message: truncate_message(&d.message),
        })
        .collect();
    v1alpha1::NodeWatchResourcesResponse { devices }
}

fn encode_v1(report: &Report) -> v1::NodeWatchResourcesResponse {
    let devices = report
        .devices
        .iter()
        .map(|d| v1::DeviceHealth {
            device: Some(v1::DeviceIdentifier {
                pool_name: d.pool.clone(),
                device_name: d.device.clone(),
            }),
            health: match d.status {
                HealthStatus::Healthy => v1::HealthStatus::Healthy,
                HealthStatus::Unhealthy => v1::HealthStatus::Unhealthy,
                HealthStatus::Unknown => v1::HealthStatus::Unknown,
            }
            .into(),
            last_updated_time: report.sent_at,
            health_check_timeout_seconds: report.timeout_seconds,
            message: truncate_message(&d.message),
        })
        .collect();
    v1::NodeWatchResourcesResponse { devices }
}

#[tonic::async_trait]
impl v1alpha1::dra_resource_health_server::DraResourceHealth for HealthV1alpha1 {
    type NodeWatchResourcesStream = HealthStream<v1alpha1::NodeWatchResourcesResponse>;

    async fn node_watch_resources(
        &self,
        _request: Request<v1alpha1::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        tracing::info!(
            version = "v1alpha1",
            "kubelet started watching device health"
        );
        Ok(Response::new(self.0.watch(encode_v1alpha1)))
    }
}

#[tonic::async_trait]
impl v1::dra_resource_health_server::DraResourceHealth for HealthV1 {
    type NodeWatchResourcesStream = HealthStream<v1::NodeWatchResourcesResponse>;

    async fn node_watch_resources(
        &self,
        _request: Request<v1::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        tracing::info!(version = "v1", "kubelet started watching device health");
        Ok(Response::new(self.0.watch(encode_v1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn device(name: &str, status: HealthStatus) -> DeviceHealth {
        DeviceHealth {
            pool: "node-a".into(),
            device: name.into(),
            status,
            message: String::new(),
        }
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(truncate_message("bus-off"), "bus-off");
        let long = "é".repeat(600); // 1200 bytes
        let cut = truncate_message(&long);
        assert!(cut.len() <= MAX_MESSAGE_BYTES, "{}", cut.len());
        assert!(cut.ends_with("..."));
    }

    #[tokio::test]
    async fn resends_while_nothing_changes_and_ends_on_shutdown() {
        let (_sender, feed) = watch::channel(vec![device("dev0", HealthStatus::Healthy)]);
        let shutdown = CancellationToken::new();
        let options = HealthOptions {
            resend_interval: Duration::from_millis(100),
            check_timeout: Duration::from_secs(3),
        };
        let service = HealthService::new(feed, options, shutdown.clone());
        let mut stream = service.watch(encode_v1);

        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.devices.len(), 1);
        assert_eq!(first.devices[0].health_check_timeout_seconds, 3);
        assert_eq!(first.devices[0].health, v1::HealthStatus::Healthy as i32);

        let before = std::time::Instant::now();
        let again = stream.next().await.unwrap().unwrap();
        let waited = before.elapsed();
        assert!(
            waited >= Duration::from_millis(80),
            "re-sent after {waited:?}"
        );
        assert_eq!(again.devices.len(), 1);
        assert_eq!(again.devices[0].device, first.devices[0].device);
        assert_eq!(again.devices[0].health, first.devices[0].health);

        shutdown.cancel();
        assert!(stream.next().await.is_none(), "the stream did not end");
    }

    #[tokio::test]
    async fn a_closed_feed_ends_the_stream_with_unavailable() {
        let (sender, feed) = watch::channel(Vec::new());
        let service = HealthService::new(feed, HealthOptions::default(), CancellationToken::new());
        let mut stream = service.watch(encode_v1alpha1);
        assert!(stream.next().await.unwrap().unwrap().devices.is_empty());
        drop(sender);
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(stream.next().await.is_none());
    }
}
