//! The real daemon killed (SIGKILL) in the middle of a large NodePrepareResources and started
//! again over the same directories: the kubelet double repeats the request, as the kubelet does,
//! and everything must converge to what a daemon that never crashed leaves behind. No kernel is
//! needed: prepare never touches it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod daemon_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_doubles::apiserver::ApiServer;
use can_dra_kubelet_plugin::cdi::CdiWriter;
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::node::NodeState;
use can_dra_proto::dra::v1::{Claim, NodePrepareResourcesResponse};
use daemon_support::{Daemon, NodeDirs, temporary_files};
use serde_json::json;

/// Claims in the one request that gets interrupted.
const CLAIMS: usize = 48;

const NODE_CONFIG: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n\
physical:\n  include: []\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 64\n";

/// The hook path written into the CDI specs; nothing runs it here.
const HOOK: &str = "/opt/can-dra/bin/can-dra-cdi-hook";

fn uid(k: usize) -> String {
    format!("uid-{k:02}")
}

fn name(k: usize) -> String {
    format!("c{k:02}")
}

/// An API double holding the claims `c00..`, each allocated its own `body` slot.
async fn api_with_claims() -> ApiServer {
    let (api, _, _) = server_with_node().await;
    for k in 0..CLAIMS {
        api.insert_claim(claim(
            &name(k),
            &uid(k),
            Some((
                json!([result("a", &format!("body-m{k}"))]),
                json!([config("FromClaim", &[], json!({"interfaceName": "ecu0"}))]),
            )),
        ));
    }
    api
}

fn request() -> Vec<Claim> {
    (0..CLAIMS)
        .map(|k| Claim {
            namespace: "ns".into(),
            uid: uid(k),
            name: name(k),
        })
        .collect()
}

/// The answer per claim, comparable across daemons.
fn answers(response: &NodePrepareResourcesResponse) -> BTreeMap<String, String> {
    response
        .claims
        .iter()
        .map(|(uid, answer)| {
            (
                uid.clone(),
                format!("{:?} {:?}", answer.devices, answer.error),
            )
        })
        .collect()
}

fn checkpointed(dirs: &NodeDirs) -> NodeState {
    CheckpointStore::new(dirs.data(DRIVER).join("checkpoint.json"))
        .load()
        .unwrap()
}

/// Everything a clean daemon leaves after preparing the claims: one spec and one checkpoint
/// entry per claim, one Ready status entry per device, no temporary file anywhere.
fn assert_converged(api: &ApiServer, dirs: &NodeDirs, label: &str) {
    let uids: Vec<String> = (0..CLAIMS).map(uid).collect();
    let cdi = CdiWriter::new(&dirs.cdi, DRIVER, HOOK);
    assert_eq!(cdi.claims_with_specs().unwrap(), uids, "{label}: CDI specs");
    let files = std::fs::read_dir(&dirs.cdi).unwrap().count();
    assert_eq!(files, CLAIMS, "{label}: files in the CDI directory");
    assert_eq!(
        temporary_files(&dirs.root),
        Vec::<std::path::PathBuf>::new(),
        "{label}: temporary files"
    );
    let state = checkpointed(dirs);
    assert_eq!(
        state.claims.keys().cloned().collect::<Vec<_>>(),
        uids,
        "{label}: checkpoint entries"
    );
    for (k, uid) in uids.iter().enumerate() {
        let entry = &state.claims[uid];
        assert_eq!(entry.devices.len(), 1, "{label}: {uid}");
        assert!(!entry.status_pending, "{label}: {uid} status still pending");
        let written = api.claim("ns", &name(k)).unwrap();
        let ours: Vec<_> = written
            .status
            .and_then(|s| s.devices)
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.driver == DRIVER)
            .collect();
        assert_eq!(ours.len(), 1, "{label}: status entries of {uid}: {ours:?}");
        assert_eq!(ours[0].device, format!("body-m{k}"), "{label}");
        let interface = ours[0]
            .network_data
            .as_ref()
            .and_then(|n| n.interface_name.clone());
        assert_eq!(interface.as_deref(), Some("ecu0"), "{label}: {uid}");
    }
}

/// What a daemon that never crashed answers, and how long its prepare took.
async fn clean_run() -> (BTreeMap<String, String>, Duration) {
    let root = tempfile::tempdir().unwrap();
    let api = api_with_claims().await;
    let dirs = NodeDirs::new(root.path(), &api, NODE_CONFIG);
    let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new(HOOK)).await;
    let started = Instant::now();
    let response = daemon.plugin.prepare(request()).await.unwrap();
    let took = started.elapsed();
    assert_converged(&api, &dirs, "clean daemon");
    assert!(daemon.stop(), "the clean daemon did not stop cleanly");
    let answers = answers(&response);
    assert!(answers.values().all(|a| a.ends_with("\"\"")), "{answers:?}");
    (answers, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_during_a_large_prepare_converges_after_restart() {
    let (clean, took) = clean_run().await;
    // Kill points spread over the time a clean prepare of the same request took.
    let fractions = [0.0, 0.2, 0.4, 0.6, 0.8];
    let mut interrupted = Vec::new();
    for (round, fraction) in fractions.into_iter().enumerate() {
        let label = format!("kill at {:.0}% of {took:?}", fraction * 100.0);
        let root = tempfile::tempdir().unwrap();
        let api = api_with_claims().await;
        let dirs = NodeDirs::new(root.path(), &api, NODE_CONFIG);
        let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new(HOOK)).await;
        let plugin = daemon.plugin.clone();
        let in_flight = tokio::spawn(async move { plugin.prepare(request()).await });
        tokio::time::sleep(took.mul_f64(fraction)).await;
        let killed_pid = daemon.pid();
        daemon.kill9();
        let finished = in_flight.await.unwrap().is_ok();
        let done = checkpointed(&dirs).claims.len();
        if !finished && done < CLAIMS {
            interrupted.push(done);
        }
        if round == 1 {
            // A kill inside an atomic write leaves its temporary file; the window is too narrow
            // to hit by timing, so leave what it would leave.
            let spec = CdiWriter::new(&dirs.cdi, DRIVER, HOOK).spec_path(&uid(CLAIMS - 1));
            let spec_name = spec.file_name().unwrap().to_string_lossy().into_owned();
            std::fs::create_dir_all(&dirs.cdi).unwrap();
            std::fs::write(
                dirs.cdi.join(format!(".{spec_name}.tmp-{killed_pid}")),
                b"{\"cdiVer",
            )
            .unwrap();
            std::fs::write(
                dirs.data(DRIVER)
                    .join(format!(".checkpoint.json.tmp-{killed_pid}")),
                b"{\"apiVer",
            )
            .unwrap();
        }

        let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new(HOOK)).await;
        let response = daemon.plugin.prepare(request()).await.unwrap();
        assert_eq!(answers(&response), clean, "{label}");
        assert_converged(&api, &dirs, &label);

        // Once more: the same answer, and nothing written.
        api.clear_requests();
        let again = daemon.plugin.prepare(request()).await.unwrap();
        assert_eq!(answers(&again), clean, "{label}: repeated");
        assert!(api.writes().is_empty(), "{label}: {:?}", api.writes());
        assert!(daemon.stop(), "{label}: the daemon did not stop cleanly");
    }
    assert!(
        !interrupted.is_empty(),
        "no kill landed inside the prepare (clean prepare took {took:?})"
    );
    eprintln!(
        "clean prepare of {CLAIMS} claims took {took:?}; claims checkpointed when killed mid-way: {interrupted:?}"
    );
}
