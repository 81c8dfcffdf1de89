//! The kubelet-facing gRPC side of a DRA plugin, exercised over its real unix sockets by the
//! kubelet test double, with a fake driver that records what reaches it.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use can_dra_doubles::kubelet::{DraVersion, HealthVersion, KubeletDouble, KubeletError};
use can_dra_proto::dra::v1::Claim;
use can_dra_proto::health::v1::HealthStatus as WireHealth;
use dra_kubeletplugin::driver::{
    ClaimRef, ClaimUid, DeviceHealth, Driver, DriverError, HealthStatus, PreparedDevice,
};
use dra_kubeletplugin::health::HealthOptions;
use dra_kubeletplugin::registration::RegistrationOutcome;
use dra_kubeletplugin::server::{PluginConfig, PluginServer, ServerError};
use dra_kubeletplugin::sockets::SocketError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const DRIVER: &str = "dra.example";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Prepare,
    Unprepare,
}

/// How the fake driver misbehaves.
#[derive(Debug, Default)]
struct Script {
    /// Claims (by UID) left out of the driver's answer.
    omit: HashSet<String>,
    /// Claims (by UID) failed individually.
    fail: HashSet<String>,
    /// Fail the whole call.
    whole_call: Option<fn() -> DriverError>,
    /// Time spent inside each call.
    delay: Duration,
}

/// A driver that records calls, tracks how many run at once, and follows a [`Script`].
#[derive(Debug)]
struct FakeDriver {
    calls: Mutex<Vec<(Op, Vec<ClaimRef>)>>,
    script: Mutex<Script>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    health: watch::Sender<Vec<DeviceHealth>>,
}

impl FakeDriver {
    fn new() -> Arc<Self> {
        Self::sharing_counters(Arc::default(), Arc::default())
    }

    /// Several drivers (one per plugin instance) counting concurrency together.
    fn sharing_counters(in_flight: Arc<AtomicUsize>, max: Arc<AtomicUsize>) -> Arc<Self> {
        let (health, _) = watch::channel(vec![device_health("dev0", HealthStatus::Healthy, "")]);
        Arc::new(Self {
            calls: Mutex::default(),
            script: Mutex::default(),
            in_flight,
            max_in_flight: max,
            health,
        })
    }

    fn calls(&self) -> Vec<(Op, Vec<ClaimRef>)> {
        self.calls.lock().unwrap().clone()
    }

    fn script(&self, edit: impl FnOnce(&mut Script)) {
        edit(&mut self.script.lock().unwrap());
    }

    async fn run<T>(
        &self,
        op: Op,
        claims: Vec<ClaimRef>,
        answer: impl Fn(&ClaimRef) -> T,
    ) -> Result<HashMap<ClaimUid, Result<T, String>>, DriverError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.calls.lock().unwrap().push((op, claims.clone()));
        let (delay, whole_call, omit, fail) = {
            let script = self.script.lock().unwrap();
            (
                script.delay,
                script.whole_call,
                script.omit.clone(),
                script.fail.clone(),
            )
        };
        tokio::time::sleep(delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(error) = whole_call {
            return Err(error());
        }
        Ok(claims
            .iter()
            .filter(|c| !omit.contains(&c.uid))
            .map(|c| {
                let result = if fail.contains(&c.uid) {
                    Err(format!("device for {} is down", c.name))
                } else {
                    Ok(answer(c))
                };
                (c.uid.clone(), result)
            })
            .collect())
    }
}

fn prepared(claim: &ClaimRef) -> Vec<PreparedDevice> {
    vec![PreparedDevice {
        request_names: vec!["device".into()],
        pool_name: "node-a".into(),
        device_name: "dev0".into(),
        cdi_device_ids: vec![format!("dra.example/device={}", claim.uid)],
        share_id: Some(format!("share-{}", claim.uid)),
    }]
}

impl Driver for FakeDriver {
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Result<HashMap<ClaimUid, Result<Vec<PreparedDevice>, String>>, DriverError> {
        self.run(Op::Prepare, claims, prepared).await
    }

    async fn unprepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> Result<HashMap<ClaimUid, Result<(), String>>, DriverError> {
        self.run(Op::Unprepare, claims, |_| ()).await
    }

    fn health(&self) -> watch::Receiver<Vec<DeviceHealth>> {
        self.health.subscribe()
    }
}

fn device_health(device: &str, status: HealthStatus, message: &str) -> DeviceHealth {
    DeviceHealth {
        pool: "node-a".into(),
        device: device.into(),
        status,
        message: message.into(),
    }
}

fn claim(uid: &str) -> Claim {
    Claim {
        namespace: "default".into(),
        uid: uid.into(),
        name: format!("claim-{uid}"),
    }
}

fn claim_ref(uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: "default".into(),
        uid: uid.into(),
        name: format!("claim-{uid}"),
    }
}

/// Temporary kubelet directories.
struct Dirs {
    _root: tempfile::TempDir,
    plugins: PathBuf,
    registry: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    let registry = root.path().join("plugins_registry");
    std::fs::create_dir_all(&registry).unwrap();
    Dirs {
        plugins,
        registry,
        _root: root,
    }
}

fn config(dirs: &Dirs, pod_uid: Option<&str>) -> PluginConfig {
    let mut config = PluginConfig::new(DRIVER, &dirs.plugins, &dirs.registry);
    config.pod_uid = pod_uid.map(str::to_owned);
    config.shutdown_grace = Duration::from_secs(5);
    config
}

async fn start(dirs: &Dirs, driver: &Arc<FakeDriver>) -> PluginServer {
    PluginServer::start(
        config(dirs, None),
        Arc::clone(driver),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn registration_announces_the_driver_and_records_the_kubelets_answer() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    let server = start(&dirs, &driver).await;
    let mut outcome = server.registration();
    assert_eq!(*outcome.borrow(), None);

    // A dot-file socket next to ours must be ignored, as the kubelet does.
    let _hidden = StdUnixListener::bind(dirs.registry.join(".hidden-reg.sock")).unwrap();
    let kubelet = KubeletDouble::new(&dirs.registry);
    let sockets = kubelet.registration_sockets().unwrap();
    assert_eq!(sockets, [dirs.registry.join("dra.example-reg.sock")]);

    let info = kubelet.get_info(&sockets[0]).await.unwrap();
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, DRIVER);
    let endpoint = PathBuf::from(&info.endpoint);
    assert!(endpoint.is_absolute(), "{endpoint:?}");
    assert_eq!(endpoint, dirs.plugins.join(DRIVER).join("dra.sock"));
    assert_eq!(endpoint, server.layout().service_socket);
    assert_eq!(
        info.supported_versions,
        [
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1.DRAResourceHealth",
            "v1alpha1.DRAResourceHealth"
        ]
    );

    let plugin = kubelet.register(&sockets[0]).await.unwrap();
    assert_eq!(plugin.dra_version, DraVersion::V1);
    assert_eq!(plugin.health_version, Some(HealthVersion::V1));
    outcome.changed().await.unwrap();
    assert_eq!(
        *outcome.borrow(),
        Some(RegistrationOutcome {
            registered: true,
            error: String::new()
        })
    );

    // The kubelet refuses a second registration of the same endpoint; the plugin hears it.
    let error = kubelet.register(&sockets[0]).await.unwrap_err();
    assert!(
        matches!(&error, KubeletError::Rejected(reason) if reason.contains("already registered")),
        "{error}"
    );
    let stored = outcome.borrow_and_update().clone().unwrap();
    assert!(!stored.registered);
    assert!(stored.error.contains("already registered"), "{stored:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_registration_is_stored_and_answered_with_an_error() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    let server = start(&dirs, &driver).await;
    let outcome = server.registration();

    // A kubelet that speaks no DRA version the plugin offers.
    let kubelet = KubeletDouble::new(&dirs.registry).with_dra_versions(&[]);
    let error = kubelet.register_driver(DRIVER).await.unwrap_err();
    let KubeletError::Rejected(reason) = error else {
        panic!("expected a rejection, got {error}");
    };
    assert!(reason.contains("none of services"), "{reason}");
    let stored = outcome.borrow().clone().unwrap();
    assert!(!stored.registered);
    assert_eq!(stored.error, reason);

    // The plugin itself answers a negative status with an error.
    let socket = &server.layout().registration_socket;
    let error = kubelet
        .notify(socket, false, "kubelet says no")
        .await
        .unwrap_err();
    let KubeletError::Call { status, .. } = error else {
        panic!("expected a gRPC error, got {error}");
    };
    assert!(status.message().contains("kubelet says no"), "{status:?}");
    kubelet.notify(socket, true, "").await.unwrap();
    assert_eq!(outcome.borrow().as_ref().map(|o| o.registered), Some(true));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn prepare_and_unprepare_over_v1_carry_share_ids() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    let server = start(&dirs, &driver).await;
    let plugin = KubeletDouble::new(&dirs.registry)
        .register_driver(DRIVER)
        .await
        .unwrap();
    assert_eq!(plugin.dra_version, DraVersion::V1);

    let answer = plugin
        .prepare(vec![claim("u1"), claim("u2")])
        .await
        .unwrap();
    assert_eq!(answer.claims.len(), 2);
    for uid in ["u1", "u2"] {
        let entry = &answer.claims[uid];
        assert_eq!(entry.error, "");
        assert_eq!(entry.devices.len(), 1);
        let device = &entry.devices[0];
        assert_eq!(device.request_names, ["device"]);
        assert_eq!(device.pool_name, "node-a");
        assert_eq!(device.device_name, "dev0");
        assert_eq!(device.cdi_device_ids, [format!("dra.example/device={uid}")]);
        assert_eq!(
            device.share_id.as_deref(),
            Some(format!("share-{uid}").as_str())
        );
    }

    let answer = plugin.unprepare(vec![claim("u1")]).await.unwrap();
    assert_eq!(answer.claims.len(), 1);
    assert_eq!(answer.claims["u1"].error, "");

    assert_eq!(
        driver.calls(),
        [
            (Op::Prepare, vec![claim_ref("u1"), claim_ref("u2")]),
            (Op::Unprepare, vec![claim_ref("u1")]),
        ]
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn prepare_and_unprepare_over_v1beta1_drop_share_ids() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    let server = start(&dirs, &driver).await;
    let plugin = KubeletDouble::new(&dirs.registry)
        .with_dra_versions(&[DraVersion::V1beta1])
        .register_driver(DRIVER)
        .await
        .unwrap();
    assert_eq!(plugin.dra_version, DraVersion::V1beta1);

    let answer = plugin.prepare(vec![claim("u1")]).await.unwrap();
    let entry = &answer.claims["u1"];
    assert_eq!(entry.error, "");
    assert_eq!(entry.devices.len(), 1);
    assert_eq!(entry.devices[0].device_name, "dev0");
    assert_eq!(entry.devices[0].cdi_device_ids, ["dra.example/device=u1"]);
    assert_eq!(entry.devices[0].share_id, None);

    let answer = plugin.unprepare(vec![claim("u1")]).await.unwrap();
    assert_eq!(answer.claims["u1"].error, "");
    assert_eq!(driver.calls().len(), 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn empty_requests_succeed_without_reaching_the_driver() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    let server = start(&dirs, &driver).await;
    let kubelet = KubeletDouble::new(&dirs.registry);
    let v1 = kubelet.register_driver(DRIVER).await.unwrap();
    assert!(v1.prepare(Vec::new()).await.unwrap().claims.is_empty());
    assert!(v1.unprepare(Vec::new()).await.unwrap().claims.is_empty());
    let v1beta1 = KubeletDouble::new(&dirs.registry)
        .with_dra_versions(&[DraVersion::V1beta1])
        .register_driver(DRIVER)
        .await
        .unwrap();
    assert!(v1beta1.prepare(Vec::new()).await.unwrap().claims.is_empty());
    assert!(driver.calls().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_claim_the_driver_omits_is_answered_with_an_error() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    driver.script(|s| {
        s.omit.insert("lost".into());
    });
    let server = start(&dirs, &driver).await;
    let plugin = KubeletDouble::new(&dirs.registry)
        .register_driver(DRIVER)
        .await
        .unwrap();

    let answer = plugin
        .prepare(vec![claim("kept"), claim("lost")])
        .await
        .unwrap();
    assert_eq!(answer.claims.len(), 2);
    assert_eq!(answer.claims["kept"].error, "");
    let lost = &answer.claims["lost"];
    assert!(
        lost.error.contains("no result") && lost.error.contains("claim-lost"),
        "{lost:?}"
    );
    assert!(lost.devices.is_empty());

    let answer = plugin
        .unprepare(vec![claim("kept"), claim("lost")])
        .await
        .unwrap();
    assert_eq!(answer.claims["kept"].error, "");
    assert!(answer.claims["lost"].error.contains("no result"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn per_claim_errors_stay_per_claim_and_whole_call_errors_are_grpc_errors() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    driver.script(|s| {
        s.fail.insert("bad".into());
    });
    let server = start(&dirs, &driver).await;
    let plugin = KubeletDouble::new(&dirs.registry)
        .register_driver(DRIVER)
        .await
        .unwrap();

    let answer = plugin
        .prepare(vec![claim("good"), claim("bad")])
        .await
        .unwrap();
    assert_eq!(answer.claims["good"].error, "");
    assert_eq!(answer.claims["good"].devices.len(), 1);
    assert_eq!(answer.claims["bad"].error, "device for claim-bad is down");
    assert!(answer.claims["bad"].devices.is_empty());

    driver.script(|s| {
        s.whole_call = Some(|| DriverError::Unavailable("API server unreachable".into()));
    });
    let error = plugin.prepare(vec![claim("good")]).await.unwrap_err();
    let KubeletError::Call { status, .. } = error else {
        panic!("expected a gRPC error, got {error}");
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("API server unreachable"),
        "{status:?}"
    );

    driver.script(|s| {
        s.whole_call = Some(|| DriverError::FailedPrecondition("claim was replaced".into()));
    });
    let error = plugin.unprepare(vec![claim("good")]).await.unwrap_err();
    let KubeletError::Call { status, .. } = error else {
        panic!("expected a gRPC error, got {error}");
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_never_overlap_inside_the_driver() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    driver.script(|s| s.delay = Duration::from_millis(30));
    let server = start(&dirs, &driver).await;
    let v1 = KubeletDouble::new(&dirs.registry)
        .register_driver(DRIVER)
        .await
        .unwrap();
    let v1beta1 = KubeletDouble::new(&dirs.registry)
        .with_dra_versions(&[DraVersion::V1beta1])
        .register_driver(DRIVER)
        .await
        .unwrap();

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..8 {
        let plugin = if i % 2 == 0 {
            v1.clone()
        } else {
            v1beta1.clone()
        };
        calls.spawn(async move {
            let uid = format!("c{i}");
            if i % 3 == 0 {
                plugin.unprepare(vec![claim(&uid)]).await.map(|_| ())
            } else {
                plugin.prepare(vec![claim(&uid)]).await.map(|_| ())
            }
        });
    }
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(driver.calls().len(), 8);
    assert_eq!(driver.max_in_flight.load(Ordering::SeqCst), 1);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_update_instances_coexist_and_serialise_through_the_lock_file() {
    let dirs = dirs();
    let (in_flight, max) = (Arc::default(), Arc::default());
    let old_driver = FakeDriver::sharing_counters(Arc::clone(&in_flight), Arc::clone(&max));
    let new_driver = FakeDriver::sharing_counters(in_flight, Arc::clone(&max));
    for driver in [&old_driver, &new_driver] {
        driver.script(|s| s.delay = Duration::from_millis(30));
    }
    let old = PluginServer::start(
        config(&dirs, Some("old-pod-uid")),
        Arc::clone(&old_driver),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let new = PluginServer::start(
        config(&dirs, Some("new-pod-uid")),
        Arc::clone(&new_driver),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let data_dir = dirs.plugins.join(DRIVER);
    assert_eq!(
        old.layout().service_socket,
        data_dir.join("dra-old-pod-uid.sock")
    );
    assert_eq!(
        new.layout().service_socket,
        data_dir.join("dra-new-pod-uid.sock")
    );
    assert_eq!(
        new.layout().registration_socket,
        dirs.registry.join("dra.example-new-pod-uid-reg.sock")
    );

    let kubelet = KubeletDouble::new(&dirs.registry);
    let sockets = kubelet.registration_sockets().unwrap();
    assert_eq!(sockets.len(), 2, "{sockets:?}");
    let mut plugins = Vec::new();
    for socket in &sockets {
        plugins.push(kubelet.register(socket).await.unwrap());
    }
    let endpoints: HashSet<_> = plugins.iter().map(|p| p.info.endpoint.clone()).collect();
    assert_eq!(endpoints.len(), 2);

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..8 {
        let plugin = plugins[i % 2].clone();
        calls.spawn(async move { plugin.prepare(vec![claim(&format!("c{i}"))]).await });
    }
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(old_driver.calls().len() + new_driver.calls().len(), 8);
    assert!(!old_driver.calls().is_empty() && !new_driver.calls().is_empty());
    assert_eq!(
        max.load(Ordering::SeqCst),
        1,
        "instances overlapped in the driver"
    );
    assert!(data_dir.join("serialize.lock").exists());

    // The old instance leaves; the new one's sockets stay.
    let old_layout = old.layout().clone();
    old.stop().await.unwrap();
    assert!(!old_layout.service_socket.exists());
    assert!(!old_layout.registration_socket.exists());
    assert!(new.layout().service_socket.exists());
    assert!(new.layout().registration_socket.exists());
    assert_eq!(kubelet.registration_sockets().unwrap().len(), 1);
    new.stop().await.unwrap();
}

#[tokio::test]
async fn a_stale_socket_at_our_path_is_replaced_but_other_files_are_not() {
    let dirs = dirs();
    let service = dirs.plugins.join(DRIVER).join("dra.sock");
    let registration = dirs.registry.join("dra.example-reg.sock");
    std::fs::create_dir_all(service.parent().unwrap()).unwrap();
    // Sockets left behind by a crashed instance: the files stay after the listeners close.
    drop(StdUnixListener::bind(&service).unwrap());
    drop(StdUnixListener::bind(&registration).unwrap());
    assert!(service.exists() && registration.exists());

    let driver = FakeDriver::new();
    let server = start(&dirs, &driver).await;
    let plugin = KubeletDouble::new(&dirs.registry)
        .register_driver(DRIVER)
        .await
        .unwrap();
    assert_eq!(
        plugin
            .prepare(vec![claim("u1")])
            .await
            .unwrap()
            .claims
            .len(),
        1
    );
    server.stop().await.unwrap();

    // Something that is not a socket is never deleted.
    std::fs::write(&service, "not a socket").unwrap();
    let error = PluginServer::start(config(&dirs, None), driver, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ServerError::Socket(SocketError::NotASocket { ref path }) if path == &service),
        "{error}"
    );
    assert_eq!(std::fs::read_to_string(&service).unwrap(), "not a socket");
    assert!(!registration.exists(), "nothing should be left listening");
}

#[tokio::test]
async fn sockets_are_removed_when_shutdown_is_requested() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    let shutdown = CancellationToken::new();
    let server = PluginServer::start(config(&dirs, None), driver, shutdown.clone())
        .await
        .unwrap();
    let layout = server.layout().clone();
    let plugin = KubeletDouble::new(&dirs.registry)
        .register_driver(DRIVER)
        .await
        .unwrap();
    let mut health = plugin.watch_health().await.unwrap();
    assert!(health.next().await.unwrap().is_some());
    assert!(layout.service_socket.exists() && layout.registration_socket.exists());

    let running = tokio::spawn(server.wait());
    shutdown.cancel();
    let started = Instant::now();
    running.await.unwrap().unwrap();
    // An open health stream and an idle connection must not hold the shutdown up.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!layout.service_socket.exists());
    assert!(!layout.registration_socket.exists());
    assert_eq!(
        health.next().await.unwrap(),
        None,
        "the health stream should end cleanly"
    );
    assert!(
        KubeletDouble::new(&dirs.registry)
            .registration_sockets()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn the_health_stream_reports_an_unhealthy_device_promptly() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    let server = start(&dirs, &driver).await;
    let plugin = KubeletDouble::new(&dirs.registry)
        .register_driver(DRIVER)
        .await
        .unwrap();

    for version in [HealthVersion::V1, HealthVersion::V1alpha1] {
        driver
            .health
            .send_replace(vec![device_health("dev0", HealthStatus::Healthy, "")]);
        let mut watch = plugin.watch_health_version(version).await.unwrap();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].health, WireHealth::Healthy as i32);
        assert_eq!(first[0].health_check_timeout_seconds, 30);
        let id = first[0].device.clone().unwrap();
        assert_eq!(
            (id.pool_name.as_str(), id.device_name.as_str()),
            ("node-a", "dev0")
        );

        let changed = Instant::now();
        driver.health.send_replace(vec![
            device_health("dev0", HealthStatus::Unhealthy, "link down"),
            device_health("dev1", HealthStatus::Healthy, ""),
        ]);
        let report = tokio::time::timeout(Duration::from_secs(2), watch.next())
            .await
            .expect("no report within 2 s of the change")
            .unwrap()
            .unwrap();
        let latency = changed.elapsed();
        assert_eq!(report.len(), 2, "every report is the complete list");
        assert_eq!(report[0].health, WireHealth::Unhealthy as i32);
        assert_eq!(report[0].message, "link down");
        assert_eq!(report[1].health, WireHealth::Healthy as i32);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((now - report[0].last_updated_time).abs() <= 2);
        eprintln!("{version:?}: Unhealthy delivered {latency:?} after the change");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_is_resent_while_nothing_changes() {
    let dirs = dirs();
    let driver = FakeDriver::new();
    let mut config = config(&dirs, None);
    config.health = HealthOptions {
        resend_interval: Duration::from_millis(200),
        check_timeout: Duration::from_secs(1),
    };
    let server = PluginServer::start(config, Arc::clone(&driver), CancellationToken::new())
        .await
        .unwrap();
    let plugin = KubeletDouble::new(&dirs.registry)
        .register_driver(DRIVER)
        .await
        .unwrap();
    let mut watch = plugin.watch_health().await.unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        let report = watch.next().await.unwrap().unwrap();
        assert_eq!(report[0].health_check_timeout_seconds, 1);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(350) && elapsed < Duration::from_secs(2),
        "three reports took {elapsed:?}"
    );
    server.stop().await.unwrap();
}
