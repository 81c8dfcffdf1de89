//! The node driver end to end without a kernel: the kubelet double calls it over the plugin's
//! real sockets, claims come from the API server double, CDI specs and the checkpoint go to a
//! temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod node_support;

use std::path::PathBuf;
use std::sync::Arc;

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_api::Bitrate;
use can_dra_doubles::apiserver::ApiServer;
use can_dra_doubles::kubelet::{KubeletDouble, RegisteredPlugin};
use can_dra_kubelet_plugin::cdi::CdiWriter;
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::hook_socket::{AttachRequest, Attacher, Requester};
use can_dra_kubelet_plugin::inventory::Inventory;
use can_dra_kubelet_plugin::node::{NodeDriver, NodeParts, NodeState};
use can_dra_proto::dra::v1::Claim;
use dra_kubeletplugin::server::{PluginConfig, PluginServer};
use node_support::{body_bus, node_parts, prepared_claim};
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Rig {
    api: ApiServer,
    driver: Arc<NodeDriver>,
    plugin: RegisteredPlugin,
    cdi: CdiWriter,
    checkpoint: CheckpointStore,
    plugins: PathBuf,
    registry: PathBuf,
    _server: PluginServer,
    _root: tempfile::TempDir,
}

async fn rig() -> Rig {
    let root = tempfile::tempdir().unwrap();
    let (api, client, _) = server_with_node().await;
    let parts = node_parts(root.path(), &client, body_bus(4));
    let cdi = parts.cdi.clone();
    let checkpoint = CheckpointStore::new(root.path().join("plugins/checkpoint.json"));
    let driver = Arc::new(
        NodeDriver::new(NodeParts {
            checkpoint: checkpoint.clone(),
            ..parts
        })
        .unwrap(),
    );
    let plugins: PathBuf = root.path().join("plugins");
    let registry: PathBuf = root.path().join("registry");
    // The kubelet owns these directories; it creates them before any plugin starts.
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&registry).unwrap();
    let server = PluginServer::start(
        PluginConfig::new(DRIVER, &plugins, &registry),
        driver.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let plugin = KubeletDouble::new(&registry)
        .register_driver(DRIVER)
        .await
        .unwrap();
    Rig {
        api,
        driver,
        plugin,
        cdi,
        checkpoint,
        plugins,
        registry,
        _server: server,
        _root: root,
    }
}

fn wire(name: &str, uid: &str) -> Claim {
    Claim {
        namespace: "ns".into(),
        uid: uid.into(),
        name: name.into(),
    }
}

/// A claim `name` allocated one `body` slot with interface `ecu0`.
fn good_claim(
    name: &str,
    uid: &str,
    device: &str,
) -> k8s_openapi::api::resource::v1::ResourceClaim {
    claim(
        name,
        uid,
        Some((
            json!([result("a", device)]),
            json!([config("FromClaim", &[], json!({"interfaceName": "ecu0"}))]),
        )),
    )
}

fn status_writes(api: &ApiServer, name: &str) -> Vec<serde_json::Value> {
    api.writes()
        .into_iter()
        .filter(|w| w.path.ends_with(&format!("/resourceclaims/{name}/status")))
        .filter_map(|w| w.json())
        .collect()
}

#[tokio::test]
async fn prepare_writes_cdi_checkpoint_and_status_and_repeats_identically() {
    let rig = rig().await;
    rig.api.insert_claim(good_claim("c", "uid-1", "body-m0"));

    let answer = rig.plugin.prepare(vec![wire("c", "uid-1")]).await.unwrap();
    let prepared = &answer.claims["uid-1"];
    assert_eq!(prepared.error, "");
    assert_eq!(prepared.devices.len(), 1);
    let device = &prepared.devices[0];
    assert_eq!(device.pool_name, NODE);
    assert_eq!(device.device_name, "body-m0");
    assert_eq!(device.request_names, vec!["a".to_string()]);
    assert_eq!(
        device.cdi_device_ids,
        vec![format!("k8s.can.dra.dev/can=uid-1-{NODE}-body-m0")]
    );

    // The CDI spec carries the interface name and the hook.
    let spec_path = rig.cdi.spec_path("uid-1");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    let edits = &spec["devices"][0]["containerEdits"];
    let env: Vec<&str> = edits["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"CAN_DRA_INTERFACE=ecu0"), "{env:?}");
    assert_eq!(edits["hooks"][0]["hookName"], "createRuntime");
    assert_eq!(edits["hooks"][0]["path"], "/opt/can-dra/bin/hook");

    // The checkpoint has the claim, with the bus and the member's parameters.
    let state: NodeState = rig.checkpoint.load().unwrap();
    let entry = &state.claims["uid-1"];
    assert_eq!((entry.namespace.as_str(), entry.name.as_str()), ("ns", "c"));
    assert_eq!(entry.devices[0].bus, "body");
    assert_eq!(entry.devices[0].member.interface, "ecu0");
    assert_eq!(entry.devices[0].attachment, None);

    // The status patch says Ready with the interface name.
    let writes = status_writes(&rig.api, "c");
    assert_eq!(writes.len(), 1, "{writes:?}");
    let status = &writes[0]["status"]["devices"][0];
    assert_eq!(status["device"], "body-m0");
    assert_eq!(status["networkData"]["interfaceName"], "ecu0");
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");

    // A second prepare gives the same answer and writes nothing.
    let spec_before = std::fs::read(&spec_path).unwrap();
    let checkpoint_before = std::fs::read(rig.checkpoint.path()).unwrap();
    rig.api.clear_requests();
    let again = rig.plugin.prepare(vec![wire("c", "uid-1")]).await.unwrap();
    assert_eq!(again, answer);
    assert!(rig.api.writes().is_empty(), "{:?}", rig.api.writes());
    assert_eq!(std::fs::read(&spec_path).unwrap(), spec_before);
    assert_eq!(
        std::fs::read(rig.checkpoint.path()).unwrap(),
        checkpoint_before
    );
}

#[tokio::test]
async fn a_bad_claim_fails_alone_with_the_reason() {
    let rig = rig().await;
    rig.api
        .insert_claim(good_claim("good", "uid-good", "body-m0"));
    rig.api.insert_claim(claim(
        "bad",
        "uid-bad",
        Some((
            json!([result("a", "body-m1")]),
            json!([config("FromClaim", &[], json!({"interfaceNmae": "ecu0"}))]),
        )),
    ));
    rig.api
        .insert_claim(good_claim("swapped", "uid-new", "body-m2"));
    rig.api.insert_claim(claim("pending", "uid-pending", None));
    rig.api
        .insert_claim(good_claim("elsewhere", "uid-elsewhere", "body-m9"));

    let answer = rig
        .plugin
        .prepare(vec![
            wire("good", "uid-good"),
            wire("bad", "uid-bad"),
            wire("swapped", "uid-old"),
            wire("pending", "uid-pending"),
            wire("elsewhere", "uid-elsewhere"),
        ])
        .await
        .unwrap();
    assert_eq!(answer.claims["uid-good"].error, "");
    assert_eq!(answer.claims["uid-good"].devices.len(), 1);

    let bad = &answer.claims["uid-bad"].error;
    assert!(bad.contains("interfaceNmae"), "{bad}");
    let swapped = &answer.claims["uid-old"].error;
    assert!(
        swapped.contains("replaced") && swapped.contains("uid-new"),
        "{swapped}"
    );
    let pending = &answer.claims["uid-pending"].error;
    assert!(pending.contains("not allocated"), "{pending}");
    let elsewhere = &answer.claims["uid-elsewhere"].error;
    assert!(elsewhere.contains("body-m9"), "{elsewhere}");

    // Only the good claim left a trace: no status written for the others either.
    for name in ["bad", "swapped", "pending", "elsewhere"] {
        assert!(status_writes(&rig.api, name).is_empty(), "{name}");
    }
    let state: NodeState = rig.checkpoint.load().unwrap();
    assert_eq!(state.claims.keys().collect::<Vec<_>>(), vec!["uid-good"]);
    assert_eq!(
        rig.cdi.claims_with_specs().unwrap(),
        vec!["uid-good".to_string()]
    );
}

#[tokio::test]
async fn unprepare_removes_everything_and_is_idempotent() {
    let rig = rig().await;
    rig.api.insert_claim(good_claim("c", "uid-1", "body-m0"));
    let answer = rig.plugin.prepare(vec![wire("c", "uid-1")]).await.unwrap();
    assert_eq!(answer.claims["uid-1"].error, "");

    let gone = rig
        .plugin
        .unprepare(vec![wire("c", "uid-1")])
        .await
        .unwrap();
    assert_eq!(gone.claims["uid-1"].error, "");
    assert!(!rig.cdi.spec_path("uid-1").exists());
    let state: NodeState = rig.checkpoint.load().unwrap();
    assert!(state.claims.is_empty(), "{state:?}");
    let stored = rig.api.claim("ns", "c").unwrap();
    let ours = stored
        .status
        .and_then(|s| s.devices)
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.driver == DRIVER)
        .count();
    assert_eq!(ours, 0, "status entries of the driver remain");

    // Again, and for a claim never prepared (and absent from the API server): success.
    let again = rig
        .plugin
        .unprepare(vec![wire("c", "uid-1"), wire("never", "uid-x")])
        .await
        .unwrap();
    assert_eq!(again.claims["uid-1"].error, "");
    assert_eq!(again.claims["uid-x"].error, "");
}

#[tokio::test]
async fn attaching_an_unprepared_claim_is_refused() {
    let rig = rig().await;
    let refused = rig
        .driver
        .attach(
            AttachRequest {
                claim_uid: "uid-unknown".into(),
                pool: NODE.into(),
                device: "body-m0".into(),
                pid: std::process::id(),
                container_id: "ctr".into(),
                deadline_unix_ms: None,
            },
            Requester::default(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("not prepared"), "{refused}");
    assert!(refused.contains("uid-unknown"), "{refused}");
}

/// Runs `can-dra-kubelet-plugin --health-probe` against the given directories.
async fn probe(plugins: PathBuf, registry: PathBuf) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_can-dra-kubelet-plugin"))
            .args(["--node-name", NODE, "--health-probe"])
            .arg("--kubelet-plugins-dir")
            .arg(plugins)
            .arg("--kubelet-registrar-dir")
            .arg(registry)
            .env_remove("KUBECONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_health_probe_passes_against_a_running_plugin_and_fails_without_one() {
    let rig = rig().await;
    let healthy = probe(rig.plugins.clone(), rig.registry.clone()).await;
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    assert!(String::from_utf8_lossy(&healthy.stdout).contains("healthy: can.dra.dev"));

    let empty = tempfile::tempdir().unwrap();
    let down = probe(empty.path().join("plugins"), empty.path().join("registry")).await;
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("connecting to"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

#[tokio::test]
async fn the_daemon_publishes_serves_and_stops_on_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let (api, _, _) = server_with_node().await;
    let kubeconfig = root.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let config = root.path().join("node.yaml");
    std::fs::write(
        &config,
        "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 2\n",
    )
    .unwrap();
    let plugins = root.path().join("plugins");
    let registry = root.path().join("registry");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&registry).unwrap();
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_can-dra-kubelet-plugin"))
        .args(["--node-name", NODE])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--config")
        .arg(&config)
        .arg("--kubelet-plugins-dir")
        .arg(&plugins)
        .arg("--kubelet-registrar-dir")
        .arg(&registry)
        .arg("--cdi-dir")
        .arg(root.path().join("cdi"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();

    // Serving once the probe passes.
    let mut healthy = false;
    for _ in 0..100 {
        if probe(plugins.clone(), registry.clone())
            .await
            .status
            .success()
        {
            healthy = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let devices: Vec<String> = api
        .slices()
        .iter()
        .flat_map(|s| s.spec.devices.clone().unwrap_or_default())
        .map(|d| d.name)
        .collect();
    assert!(plugins.join("can.dra.dev/hook.sock").exists());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || daemon.wait().unwrap())
        .await
        .unwrap();
    assert!(healthy, "the daemon never answered the probe");
    assert_eq!(devices, vec!["body-m0".to_string(), "body-m1".to_string()]);
    assert!(status.success(), "{status:?}");
    assert!(!plugins.join("can.dra.dev/hook.sock").exists());
}

#[tokio::test]
async fn bus_off_or_unplugged_controllers_make_their_slots_unhealthy() {
    use can_dra_kubelet_plugin::inventory::{CanState, PhysicalController};
    use dra_kubeletplugin::driver::{DeviceHealth, Driver, HealthStatus};

    let root = tempfile::tempdir().unwrap();
    let (_api, client, _) = server_with_node().await;
    let can0 = |state| PhysicalController {
        interface: "can0".into(),
        controller: "gs_usb".into(),
        bitrate: Bitrate::from_bits_per_second(500_000),
        data_bitrate: None,
        fd: false,
        state,
        slots: 2,
    };
    let inventory = Inventory {
        physical: vec![can0(Some(CanState::ErrorActive))],
        virtual_buses: Vec::new(),
    };
    let driver = NodeDriver::new(node_parts(root.path(), &client, inventory)).unwrap();
    let health = driver.health();
    let statuses = |rx: &tokio::sync::watch::Receiver<Vec<DeviceHealth>>| {
        rx.borrow()
            .iter()
            .map(|h| (h.device.clone(), h.status))
            .collect::<Vec<_>>()
    };
    let all = |status| {
        vec![
            ("can0-m0".to_string(), status),
            ("can0-m1".to_string(), status),
        ]
    };
    assert_eq!(statuses(&health), all(HealthStatus::Healthy));

    driver.update_controllers(&[can0(Some(CanState::BusOff))]);
    assert_eq!(statuses(&health), all(HealthStatus::Unhealthy));
    assert!(health.borrow()[0].message.contains("bus-off"));

    driver.update_controllers(&[]);
    assert_eq!(statuses(&health), all(HealthStatus::Unhealthy));
    assert!(health.borrow()[0].message.contains("gone"));

    driver.update_controllers(&[can0(Some(CanState::ErrorWarning))]);
    assert_eq!(statuses(&health), all(HealthStatus::Healthy));
}

/// A driver over the `body` bus whose checkpoint, written before it starts, holds claim
/// `uid-r` with one member attached as `attachment` (or not attached).
async fn restarted_driver(
    root: &std::path::Path,
    attachment: Option<can_dra_kubelet_plugin::node::Attachment>,
) -> (NodeDriver, CheckpointStore, NodeState) {
    let (_api, client, _) = server_with_node().await;
    let mut state = NodeState::default();
    state.claims.insert(
        "uid-r".into(),
        prepared_claim(
            "r",
            "a",
            ("body-m0", "body", "ecu0"),
            "k8s.can.dra.dev/can=uid-r-a",
            attachment,
        ),
    );
    let parts = node_parts(root, &client, body_bus(2));
    let checkpoint = parts.checkpoint.clone();
    checkpoint.save(&state).unwrap();
    let driver = NodeDriver::new(parts).unwrap();
    (driver, checkpoint, state)
}

fn own_attachment() -> can_dra_kubelet_plugin::node::Attachment {
    let pid = std::process::id();
    let id = can_dra_dataplane::netns::Netns::from_pid(pid).unwrap().id();
    can_dra_kubelet_plugin::node::Attachment {
        pid,
        netns_dev: id.dev,
        netns_ino: id.ino,
    }
}

/// Recovery dropped exactly the `uid-r/a` attachment, without opening the kernel, and both the
/// driver and the checkpoint file now hold the claim unattached.
async fn assert_dropped_only_attachment(
    driver: &NodeDriver,
    checkpoint: &CheckpointStore,
    before: &NodeState,
    reason: &str,
) {
    use can_dra_kubelet_plugin::node::HostCan;

    let report = driver.recover_on(HostCan::Absent).await.unwrap();
    assert_eq!(report.dropped.len(), 1, "{report:?}");
    assert_eq!(report.dropped[0].claim_uid, "uid-r");
    assert_eq!(report.dropped[0].request, "a");
    assert!(
        report.dropped[0].reason.contains(reason),
        "{}",
        report.dropped[0].reason
    );
    assert!(report.reconciled.is_none());
    assert!(!driver.data_plane_open());

    let mut expected = before.clone();
    for claim in expected.claims.values_mut() {
        for device in &mut claim.devices {
            device.attachment = None;
        }
    }
    assert_eq!(driver.state().await, expected);
    let on_disk: NodeState = checkpoint.load().unwrap();
    assert_eq!(on_disk, expected);
}

#[tokio::test]
async fn recover_drops_an_attachment_whose_pod_process_is_gone() {
    let root = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let attachment = can_dra_kubelet_plugin::node::Attachment {
        pid: dead_pid,
        ..own_attachment()
    };
    let (driver, checkpoint, before) = restarted_driver(root.path(), Some(attachment)).await;
    assert_dropped_only_attachment(&driver, &checkpoint, &before, "gone").await;
}

#[tokio::test]
async fn recover_drops_an_attachment_whose_pid_lives_in_another_namespace() {
    let root = tempfile::tempdir().unwrap();
    let mut attachment = own_attachment();
    attachment.netns_ino += 1;
    let (driver, checkpoint, before) = restarted_driver(root.path(), Some(attachment)).await;
    assert_dropped_only_attachment(&driver, &checkpoint, &before, "now lives in").await;
}

#[tokio::test]
async fn recover_drops_an_attachment_in_the_nodes_own_namespace() {
    // Recorded by a version that let a hostNetwork pod join: its pod end sits among the node's
    // links. The test process stands for the node.
    let root = tempfile::tempdir().unwrap();
    let (driver, checkpoint, before) = restarted_driver(root.path(), Some(own_attachment())).await;
    assert_dropped_only_attachment(&driver, &checkpoint, &before, "hostNetwork").await;
}

#[tokio::test]
async fn recover_without_attachments_on_a_host_without_can_leaves_the_kernel_alone() {
    use can_dra_kubelet_plugin::node::HostCan;

    let root = tempfile::tempdir().unwrap();
    let (driver, checkpoint, before) = restarted_driver(root.path(), None).await;

    let report = driver.recover_on(HostCan::Absent).await.unwrap();

    assert!(report.dropped.is_empty());
    assert!(report.reconciled.is_none());
    assert!(!driver.data_plane_open());
    assert_eq!(driver.state().await, before);
    assert_eq!(checkpoint.load::<NodeState>().unwrap(), before);
}

#[test]
fn a_node_with_can_controllers_counts_as_having_can() {
    use can_dra_kubelet_plugin::inventory::{CanState, PhysicalController};
    use can_dra_kubelet_plugin::node::HostCan;

    let inventory = Inventory {
        physical: vec![PhysicalController {
            interface: "can0".into(),
            controller: "gs_usb".into(),
            bitrate: Bitrate::from_bits_per_second(500_000),
            data_bitrate: None,
            fd: false,
            state: Some(CanState::ErrorActive),
            slots: 1,
        }],
        virtual_buses: Vec::new(),
    };
    assert_eq!(HostCan::probe(&inventory), HostCan::Present);
}
