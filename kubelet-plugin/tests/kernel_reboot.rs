//! A node reboot against a real kernel: members attached through the real CDI hook, then the
//! power goes out. After it the checkpoint survives, while the CDI directory (a tmpfs), the
//! pods' namespaces, the vxcan pairs and the can-gw rules are gone; the kubelet does not call
//! NodePrepareResources again for claims it believes prepared (kubernetes #141433). The real
//! daemon, restarted with no prepare call, must put every CDI spec back as it was, and the
//! kubelet's new sandboxes must get their members by running the real hook from those specs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod daemon_support;
mod kernel_support;

use std::path::Path;

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_kubelet_plugin::cdi::CdiWriter;
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::hook_socket::HOOK_SOCKET_NAME;
use can_dra_kubelet_plugin::node::NodeState;
use can_dra_proto::dra::v1::Claim;
use can_dra_testkit::command::run;
use daemon_support::{Daemon, NodeDirs, cdi_files};
use kernel_support::{Pod, assert_frames_flow, host_member_links, host_rules, run_cdi_hook};
use serde_json::json;

const NODE_CONFIG: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n\
physical:\n  include: []\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 4\n";

/// The claims: name, uid, device; each member is `can0` in its pod.
const CLAIMS: [(&str, &str, &str); 2] =
    [("ecu-a", "uid-a", "body-m0"), ("ecu-b", "uid-b", "body-m1")];

fn request() -> Vec<Claim> {
    CLAIMS
        .iter()
        .map(|(name, uid, _)| Claim {
            namespace: "ns".into(),
            uid: (*uid).into(),
            name: (*name).into(),
        })
        .collect()
}

fn attach(cdi: &CdiWriter, socket: &Path, pods: &[Pod; 2], daemon: &Daemon) {
    for ((_, uid, _), pod) in CLAIMS.iter().zip(pods) {
        let (ok, stderr) = run_cdi_hook(&cdi.spec_path(uid), socket, pod.pid());
        assert!(ok, "hook for {uid}: {stderr}\n{}", daemon.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn after_a_reboot_the_cdi_specs_return_and_new_sandboxes_join_their_bus() {
    let hook = Path::new(env!("CARGO_BIN_EXE_can-dra-cdi-hook"));
    let root = tempfile::tempdir().unwrap();
    let (api, _, _) = server_with_node().await;
    for (name, uid, device) in CLAIMS {
        api.insert_claim(claim(
            name,
            uid,
            Some((
                json!([result("a", device)]),
                json!([config("FromClaim", &[], json!({"interfaceName": "can0"}))]),
            )),
        ));
    }
    let dirs = NodeDirs::new(root.path(), &api, NODE_CONFIG);
    let socket = dirs.data(DRIVER).join(HOOK_SOCKET_NAME);
    let cdi = CdiWriter::new(&dirs.cdi, DRIVER, hook);
    let checkpoint = CheckpointStore::new(dirs.data(DRIVER).join("checkpoint.json"));
    let rules_before = host_rules();
    let links_before = host_member_links();

    let daemon = Daemon::start(&dirs, NODE, DRIVER, hook).await;
    let prepared = daemon.plugin.prepare(request()).await.unwrap();
    assert!(
        prepared.claims.values().all(|c| c.error.is_empty()),
        "{prepared:?}"
    );
    let pods = [Pod::new("rbt-a"), Pod::new("rbt-b")];
    attach(&cdi, &socket, &pods, &daemon);
    assert_frames_flow(&pods[0], &pods[1], "before the reboot");
    let specs = cdi_files(&dirs.cdi);
    assert_eq!(specs.len(), CLAIMS.len());
    let attached: NodeState = checkpoint.load().unwrap();
    assert!(
        attached
            .claims
            .values()
            .all(|c| c.devices.iter().all(|d| d.attachment.is_some()))
    );

    // The reboot: the daemon dies with the machine, and nothing of the kernel's state nor of
    // the tmpfs survives; the checkpoint (on disk) does.
    daemon.kill9();
    drop(pods);
    // The kernel tears the pods' namespaces (and the pairs with them) down in the background:
    // delete what is left, tolerating links that vanish meanwhile.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while host_member_links() != links_before {
        assert!(
            std::time::Instant::now() < deadline,
            "member links stay: {:?}",
            host_member_links()
        );
        for link in host_member_links() {
            let _ = run(std::process::Command::new("ip").args(["link", "del", &link]));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    run(std::process::Command::new("cangw").arg("-F")).unwrap();
    std::fs::remove_dir_all(&dirs.cdi).unwrap();
    std::fs::create_dir_all(&dirs.cdi).unwrap();
    assert_eq!(host_rules(), rules_before);

    // Started again; the kubelet sends no prepare.
    let daemon = Daemon::start(&dirs, NODE, DRIVER, hook).await;
    assert_eq!(
        cdi_files(&dirs.cdi),
        specs,
        "the CDI specs after the reboot differ from the prepared ones\n{}",
        daemon.log_text()
    );
    let state: NodeState = checkpoint.load().unwrap();
    assert_eq!(
        state.claims.keys().collect::<Vec<_>>(),
        attached.claims.keys().collect::<Vec<_>>()
    );
    assert!(
        state
            .claims
            .values()
            .all(|c| c.devices.iter().all(|d| d.attachment.is_none())),
        "attachments of the old sandboxes survived: {state:?}"
    );

    // The kubelet starts new sandboxes; the runtime runs the hook from the restored specs.
    let pods = [Pod::new("rbt-c"), Pod::new("rbt-d")];
    attach(&cdi, &socket, &pods, &daemon);
    assert_frames_flow(&pods[0], &pods[1], "after the reboot");

    let gone = daemon.plugin.unprepare(request()).await.unwrap();
    assert!(gone.claims.values().all(|c| c.error.is_empty()), "{gone:?}");
    assert_eq!(host_rules(), rules_before, "can-gw rules left behind");
    assert_eq!(
        host_member_links(),
        links_before,
        "member links left behind"
    );
    assert!(cdi.claims_with_specs().unwrap().is_empty());
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
