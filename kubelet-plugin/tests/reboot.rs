//! A node reboot as the daemon sees it: the checkpoint (on the kubelet's disk) survives, the CDI
//! directory (`/var/run/cdi`, a tmpfs) comes back empty, and the kubelet does not call
//! NodePrepareResources again for claims it believes prepared (kubernetes #141433). The real
//! daemon, started again over the same directories with no new prepare call, must put back the
//! CDI spec of every checkpointed claim exactly as prepare wrote it, or the pods' containers
//! could never start. No kernel is needed: no member is attached here (`kernel_reboot` covers
//! the attached case and the container start).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod daemon_support;

use std::path::{Path, PathBuf};

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::node::NodeState;
use can_dra_proto::dra::v1::Claim;
use daemon_support::{Daemon, NodeDirs, cdi_files};
use serde_json::json;

const NODE_CONFIG: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n\
physical:\n  include: []\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 8\n";

/// The hook path written into the CDI specs; nothing runs it here.
const HOOK: &str = "/opt/can-dra/bin/can-dra-cdi-hook";

/// name, uid, device, interface in the pod.
const CLAIMS: [(&str, &str, &str, &str); 3] = [
    ("ecu-a", "uid-a", "body-m0", "can0"),
    ("ecu-b", "0c1f-uid-b", "body-m3", "ecu1"),
    ("ecu-c", "uid-c", "body-m5", "vehicle"),
];

/// What a reboot does to the CDI directory: a fresh, empty tmpfs.
fn wipe(dir: &PathBuf) {
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::create_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reboot_every_checkpointed_claim_gets_its_cdi_spec_back_without_a_prepare() {
    let root = tempfile::tempdir().unwrap();
    let (api, _, _) = server_with_node().await;
    for (name, uid, device, interface) in CLAIMS {
        api.insert_claim(claim(
            name,
            uid,
            Some((
                json!([result("a", device)]),
                json!([config(
                    "FromClaim",
                    &[],
                    json!({"interfaceName": interface})
                )]),
            )),
        ));
    }
    let dirs = NodeDirs::new(root.path(), &api, NODE_CONFIG);
    let checkpoint = CheckpointStore::new(dirs.data(DRIVER).join("checkpoint.json"));

    let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new(HOOK)).await;
    let request: Vec<Claim> = CLAIMS
        .iter()
        .map(|(name, uid, _, _)| Claim {
            namespace: "ns".into(),
            uid: (*uid).into(),
            name: (*name).into(),
        })
        .collect();
    let prepared = daemon.plugin.prepare(request).await.unwrap();
    assert!(
        prepared.claims.values().all(|c| c.error.is_empty()),
        "{prepared:?}"
    );
    let specs = cdi_files(&dirs.cdi);
    assert_eq!(specs.len(), CLAIMS.len(), "{:?}", specs.keys());
    let state: NodeState = checkpoint.load().unwrap();
    // The power goes out: no clean shutdown.
    daemon.kill9();

    wipe(&dirs.cdi);
    let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new(HOOK)).await;
    assert_eq!(
        cdi_files(&dirs.cdi),
        specs,
        "the CDI specs after the reboot differ from what prepare wrote\n{}",
        daemon.log_text()
    );
    assert_eq!(checkpoint.load::<NodeState>().unwrap(), state);
    assert!(
        daemon
            .log_text()
            .contains("CDI spec of a checkpointed claim re-created"),
        "{}",
        daemon.log_text()
    );

    // A plain restart (specs in place) rewrites nothing.
    let modified: Vec<_> = std::fs::read_dir(&dirs.cdi)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().modified().unwrap())
        .collect();
    daemon.kill9();
    let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new(HOOK)).await;
    let again: Vec<_> = std::fs::read_dir(&dirs.cdi)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().modified().unwrap())
        .collect();
    assert_eq!(again, modified, "specs already in place were rewritten");
    assert_eq!(cdi_files(&dirs.cdi), specs);
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
