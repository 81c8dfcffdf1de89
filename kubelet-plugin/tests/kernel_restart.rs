//! The real daemon killed (SIGKILL) between prepare and container start, and again after the
//! members were attached, against a real kernel: the members are attached through the real CDI
//! hook binary, and can-utils and iproute2 (which share no code with the driver) check that
//! frames flow and that nothing is doubled after each restart.

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
use daemon_support::{Daemon, NodeDirs};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn kills_before_and_after_container_start_converge_without_doubling() {
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

    // Prepared, then killed before any container started.
    let daemon = Daemon::start(&dirs, NODE, DRIVER, hook).await;
    let prepared = daemon.plugin.prepare(request()).await.unwrap();
    assert!(
        prepared.claims.values().all(|c| c.error.is_empty()),
        "{prepared:?}"
    );
    daemon.kill9();

    let daemon = Daemon::start(&dirs, NODE, DRIVER, hook).await;
    assert_eq!(
        host_rules(),
        rules_before,
        "prepare and restart touched can-gw"
    );
    // A dead container process: the hook fails naming it, and nothing is made.
    let dead = can_dra_testkit::namespace::exited_pid().unwrap();
    let (ok, stderr) = run_cdi_hook(&cdi.spec_path("uid-a"), &socket, dead);
    assert!(!ok, "the hook accepted dead pid {dead}");
    assert!(stderr.contains(&dead.to_string()), "{stderr}");
    assert_eq!(host_member_links(), links_before, "a dead pid left links");
    assert_eq!(host_rules(), rules_before, "a dead pid left rules");
    let state: NodeState = checkpoint.load().unwrap();
    assert!(state.claims["uid-a"].devices[0].attachment.is_none());

    let pods = [Pod::new("rst-a"), Pod::new("rst-b")];
    for ((_, uid, _), pod) in CLAIMS.iter().zip(&pods) {
        let (ok, stderr) = run_cdi_hook(&cdi.spec_path(uid), &socket, pod.pid());
        assert!(ok, "hook for {uid}: {stderr}\n{}", daemon.log_text());
    }
    assert_frames_flow(&pods[0], &pods[1], "attached after a restart");
    let rules = host_rules();
    // A full mesh of two members: one rule each way; one vxcan pair per member.
    assert_eq!(rules.len(), rules_before.len() + 2, "{rules:?}");
    let links = host_member_links();
    assert_eq!(links.len(), links_before.len() + 2, "{links:?}");

    // Killed with the members attached: the restarted daemon recovers them as they are.
    daemon.kill9();
    let daemon = Daemon::start(&dirs, NODE, DRIVER, hook).await;
    assert_eq!(host_rules(), rules, "rules after recovery");
    assert_eq!(host_member_links(), links, "member links after recovery");
    assert_frames_flow(&pods[0], &pods[1], "after recovery");
    // A second container of pod A: the hook finds the member there.
    let (ok, stderr) = run_cdi_hook(&cdi.spec_path("uid-a"), &socket, pods[0].pid());
    assert!(ok && stderr.contains("already attached"), "{stderr}");
    assert_eq!(host_rules(), rules, "a repeated hook added rules");
    let state: NodeState = checkpoint.load().unwrap();
    assert!(
        state
            .claims
            .values()
            .all(|c| c.devices.iter().all(|d| d.attachment.is_some())),
        "{state:?}"
    );

    let gone = daemon.plugin.unprepare(request()).await.unwrap();
    assert!(gone.claims.values().all(|c| c.error.is_empty()), "{gone:?}");
    assert_eq!(host_rules(), rules_before, "can-gw rules left behind");
    assert_eq!(
        host_member_links(),
        links_before,
        "member links left behind"
    );
    for pod in &pods {
        let left = can_dra_testkit::observe::link_in(&pod.netns, "can0").unwrap();
        assert!(left.is_none(), "can0 left in {}", pod.netns.name());
    }
    assert!(cdi.claims_with_specs().unwrap().is_empty());
    let state: NodeState = checkpoint.load().unwrap();
    assert!(state.claims.is_empty(), "{state:?}");
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
