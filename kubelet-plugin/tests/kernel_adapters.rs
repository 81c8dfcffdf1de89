//! The real daemon following the node's adapters against a real kernel: vcan links stand in
//! for physical controllers (the node configuration selects them by name), and iproute2 adds,
//! downs and deletes them while the test watches what the daemon publishes to the API server
//! double and reports on the kubelet's health stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod daemon_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_doubles::apiserver::ApiServer;
use can_dra_doubles::kubelet::HealthWatch;
use can_dra_proto::dra::v1::Claim;
use can_dra_proto::health::v1::HealthStatus;
use can_dra_testkit::command::run;
use daemon_support::{Daemon, NodeDirs};
use serde_json::json;

/// vcan links named `cdtvc*` are published as controllers, two slots each.
const NODE_CONFIG: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n\
physical:\n  include: [\"cdtvc*\"]\n  slots: 2\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 1\n";

/// Well below the daemon's periodic relisting (10 s): a change seen within this came from the
/// link notifications.
const REACT: Duration = Duration::from_secs(5);

/// How long nothing must change for the pool to count as settled.
const QUIET: Duration = Duration::from_millis(1500);

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap();
}

/// The published devices with their attributes (as strings), and the pool generation.
fn published(api: &ApiServer) -> (BTreeMap<String, BTreeMap<String, String>>, i64) {
    let slices = api.slices();
    let generation = slices
        .iter()
        .map(|s| s.spec.pool.generation)
        .max()
        .unwrap_or(0);
    let devices = slices
        .iter()
        .flat_map(|s| s.spec.devices.clone().unwrap_or_default())
        .map(|d| {
            let attributes = d
                .attributes
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    let value = v
                        .string
                        .or(v.int.map(|i| i.to_string()))
                        .or(v.bool.map(|b| b.to_string()))
                        .unwrap_or_default();
                    (k, value)
                })
                .collect();
            (d.name, attributes)
        })
        .collect();
    (devices, generation)
}

/// Waits (up to [`REACT`]) until the published pool satisfies `check`, then for the pool to stay
/// unchanged for [`QUIET`]; returns it.
async fn settled(
    api: &ApiServer,
    what: &str,
    check: impl Fn(&BTreeMap<String, BTreeMap<String, String>>) -> bool,
) -> (BTreeMap<String, BTreeMap<String, String>>, i64) {
    let deadline = Instant::now() + REACT;
    let mut pool = published(api);
    while !check(&pool.0) {
        assert!(
            Instant::now() < deadline,
            "{what}: not published in {REACT:?}: {pool:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool = published(api);
    }
    tokio::time::sleep(QUIET).await;
    let after = published(api);
    assert_eq!(after, pool, "{what}: the pool kept changing");
    pool
}

/// Reads the health stream until `device` reports `status` (`None`: is no longer reported);
/// returns its message.
async fn health_turns(
    watch: &mut HealthWatch,
    device: &str,
    status: Option<HealthStatus>,
) -> String {
    let wait = async {
        loop {
            let report = watch.next().await.unwrap().unwrap();
            let found = report
                .into_iter()
                .find(|h| h.device.as_ref().is_some_and(|d| d.device_name == device));
            match (found, status) {
                (Some(h), Some(status)) if h.health == status as i32 => return h.message,
                (None, None) => return String::new(),
                _ => {}
            }
        }
    };
    tokio::time::timeout(REACT, wait)
        .await
        .unwrap_or_else(|_| panic!("{device} never turned {status:?}"))
}

/// The `state` attribute of a published device.
fn state_of<'a>(
    devices: &'a BTreeMap<String, BTreeMap<String, String>>,
    device: &str,
) -> Option<&'a str> {
    devices.get(device)?.get("state").map(String::as_str)
}

fn slots_of<'a>(
    devices: &'a BTreeMap<String, BTreeMap<String, String>>,
    interface: &str,
) -> Vec<&'a String> {
    devices
        .keys()
        .filter(|d| d.starts_with(&format!("{interface}-m")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn slices_and_health_follow_an_adapter_that_appears_goes_down_and_goes_away() {
    let hook = Path::new(env!("CARGO_BIN_EXE_can-dra-cdi-hook"));
    let root = tempfile::tempdir().unwrap();
    let (api, _, _) = server_with_node().await;
    api.insert_claim(claim(
        "held",
        "uid-held",
        Some((
            json!([result("a", "cdtvc0-m0")]),
            json!([config("FromClaim", &[], json!({"interfaceName": "can0"}))]),
        )),
    ));
    let dirs = NodeDirs::new(root.path(), &api, NODE_CONFIG);
    let daemon = Daemon::start(&dirs, NODE, DRIVER, hook).await;
    let mut health = daemon.plugin.watch_health().await.unwrap();
    let (devices, start) = settled(&api, "start", |d| d.contains_key("body-m0")).await;
    assert_eq!(devices.keys().collect::<Vec<_>>(), ["body-m0"]);

    // Appears, still down: published as stopped.
    ip(&["link", "add", "cdtvc0", "type", "vcan"]);
    let (devices, generation) = settled(&api, "added", |d| slots_of(d, "cdtvc0").len() == 2).await;
    assert_eq!(generation, start + 1, "one new generation for one change");
    let m0 = &devices["cdtvc0-m0"];
    for (key, want) in [
        ("type", "physical"),
        ("interface", "cdtvc0"),
        ("bus", "cdtvc0"),
        ("state", "stopped"),
        // A vcan is created with the CAN FD MTU.
        ("fd", "true"),
        ("slot", "0"),
    ] {
        assert_eq!(m0.get(key).map(String::as_str), Some(want), "{key}: {m0:?}");
    }
    assert_eq!(devices["body-m0"], published(&api).0["body-m0"]);

    // Up: a vcan reports no CAN state.
    ip(&["link", "set", "cdtvc0", "up"]);
    let (_, generation) =
        settled(&api, "up", |d| state_of(d, "cdtvc0-m0") == Some("unknown")).await;
    assert_eq!(generation, start + 2);
    health_turns(&mut health, "cdtvc0-m0", Some(HealthStatus::Healthy)).await;
    let wire = vec![Claim {
        namespace: "ns".into(),
        uid: "uid-held".into(),
        name: "held".into(),
    }];
    let prepared = daemon.plugin.prepare(wire.clone()).await.unwrap();
    assert_eq!(prepared.claims["uid-held"].error, "", "{prepared:?}");

    // Links the configuration does not select, and member-like vxcan pairs: nothing churns.
    ip(&["link", "add", "cdtother0", "type", "vcan"]);
    ip(&[
        "link", "add", "cdtx0", "type", "vxcan", "peer", "name", "cdtx1",
    ]);
    ip(&["link", "set", "cdtx0", "up"]);
    let (_, generation) = settled(&api, "unrelated links", |_| true).await;
    assert_eq!(generation, start + 2, "unrelated links changed the pool");
    ip(&["link", "del", "cdtother0"]);
    ip(&["link", "del", "cdtx0"]);

    // Down: republished as stopped, and the slots turn Unhealthy.
    ip(&["link", "set", "cdtvc0", "down"]);
    let (_, generation) = settled(&api, "down", |d| {
        state_of(d, "cdtvc0-m0") == Some("stopped")
    })
    .await;
    assert_eq!(generation, start + 3);
    let message = health_turns(&mut health, "cdtvc0-m0", Some(HealthStatus::Unhealthy)).await;
    assert!(message.contains("down"), "{message}");

    // Gone: its slots leave the pool; the prepared one stays reported Unhealthy.
    ip(&["link", "del", "cdtvc0"]);
    let (devices, generation) =
        settled(&api, "deleted", |d| slots_of(d, "cdtvc0").is_empty()).await;
    assert_eq!(generation, start + 4);
    assert_eq!(devices.keys().collect::<Vec<_>>(), ["body-m0"]);
    let message = health_turns(&mut health, "cdtvc0-m0", Some(HealthStatus::Unhealthy)).await;
    assert!(message.contains("gone"), "{message}");

    let gone = daemon.plugin.unprepare(wire).await.unwrap();
    assert_eq!(gone.claims["uid-held"].error, "", "{gone:?}");
    // Unprepared, the slot of the vanished adapter is no longer reported at all.
    health_turns(&mut health, "cdtvc0-m0", None).await;
    let log = daemon.log_text();
    assert!(log.contains("cdtvc0 appeared"), "{log}");
    assert!(log.contains("cdtvc0 is gone"), "{log}");
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
