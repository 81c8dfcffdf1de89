//! The real daemon and the real CDI hook against a real kernel, given what a hostile pod or a
//! stalled node produce:
//! - a container in the node's own network namespace (a hostNetwork pod, or any host process
//!   whose pid reaches the hook) is refused through the hook, and nothing is made;
//! - an attach the hook gave up on (the daemon was stopped with SIGSTOP past the hook's
//!   timeout, then continued) leaves no link, no rule and no checkpointed attachment.
//!
//! iproute2 and can-utils (which share no code with the driver) check the kernel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod daemon_support;
mod kernel_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_kubelet_plugin::cdi::CdiWriter;
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::hook_socket::HOOK_SOCKET_NAME;
use can_dra_kubelet_plugin::node::NodeState;
use can_dra_proto::dra::v1::Claim;
use can_dra_testkit::{Candump, Host, cansend, link_in};
use daemon_support::{Daemon, NodeDirs};
use kernel_support::{Pod, host_member_links, host_rules, run_cdi_hook, run_cdi_hook_with};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

/// The chart's default include pattern, so a pod end left in the host namespace would be
/// published as a controller.
const NODE_CONFIG: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n\
physical:\n  include: [\"can*\"]\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 4\n";

/// One claim on `body-m0`, whose member is `interface` in the pod.
async fn prepared(
    interface: &str,
) -> (
    can_dra_doubles::apiserver::ApiServer,
    tempfile::TempDir,
    NodeDirs,
    Daemon,
) {
    let hook = Path::new(env!("CARGO_BIN_EXE_can-dra-cdi-hook"));
    let root = tempfile::tempdir().unwrap();
    let (api, _, _) = server_with_node().await;
    api.insert_claim(claim(
        "ecu",
        "uid-1",
        Some((
            json!([result("a", "body-m0")]),
            json!([config(
                "FromClaim",
                &[],
                json!({"interfaceName": interface})
            )]),
        )),
    ));
    let dirs = NodeDirs::new(root.path(), &api, NODE_CONFIG);
    let daemon = Daemon::start(&dirs, NODE, DRIVER, hook).await;
    let answer = daemon.plugin.prepare(request()).await.unwrap();
    assert!(
        answer.claims.values().all(|c| c.error.is_empty()),
        "{answer:?}"
    );
    (api, root, dirs, daemon)
}

fn request() -> Vec<Claim> {
    vec![Claim {
        namespace: "ns".into(),
        uid: "uid-1".into(),
        name: "ecu".into(),
    }]
}

fn attachment_recorded(dirs: &NodeDirs) -> bool {
    let state: NodeState = CheckpointStore::new(dirs.data(DRIVER).join("checkpoint.json"))
        .load()
        .unwrap();
    state.claims["uid-1"].devices[0].attachment.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn a_container_in_the_nodes_network_namespace_is_refused() {
    let rules_before = host_rules();
    let links_before = host_member_links();
    let (_api, _root, dirs, daemon) = prepared("can7").await;
    let spec = CdiWriter::new(&dirs.cdi, DRIVER, "/unused").spec_path("uid-1");
    let socket = dirs.data(DRIVER).join(HOOK_SOCKET_NAME);

    // A process of a hostNetwork pod: it shares the node's (here: the daemon's) namespace.
    let mut host_process = Command::new("sleep")
        .arg("300")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (ok, stderr) = run_cdi_hook(&spec, &socket, host_process.id());
    let _ = host_process.kill();
    let _ = host_process.wait();
    assert!(!ok, "the hook attached a member in the node's namespace");
    assert!(
        stderr.contains("hostNetwork pods cannot join a bus"),
        "{stderr}"
    );
    assert!(
        stderr.contains("refusing to start the container"),
        "{stderr}"
    );
    assert_eq!(link_in(&Host, "can7").unwrap(), None, "can7 in the host");
    assert_eq!(host_member_links(), links_before, "links left behind");
    assert_eq!(host_rules(), rules_before, "rules left behind");
    assert!(!attachment_recorded(&dirs), "the checkpoint records it");

    // A real pod on the same claim still joins.
    let pod = Pod::new("hns");
    let (ok, stderr) = run_cdi_hook(&spec, &socket, pod.pid());
    assert!(ok, "{stderr}\n{}", daemon.log_text());
    assert!(link_in(&pod.netns, "can7").unwrap().is_some());
    let gone = daemon.plugin.unprepare(request()).await.unwrap();
    assert!(gone.claims.values().all(|c| c.error.is_empty()), "{gone:?}");
    assert_eq!(host_member_links(), links_before);
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn an_attach_the_hook_gave_up_on_leaves_nothing_behind() {
    let rules_before = host_rules();
    let links_before = host_member_links();
    let (_api, _root, dirs, daemon) = prepared("can0").await;
    let spec = CdiWriter::new(&dirs.cdi, DRIVER, "/unused").spec_path("uid-1");
    let socket = dirs.data(DRIVER).join(HOOK_SOCKET_NAME);
    let pod = Pod::new("gaveup");
    let daemon_pid = Pid::from_raw(i32::try_from(daemon.pid()).unwrap());

    // The daemon stalls; the hook's time runs out and the runtime refuses the container.
    kill(daemon_pid, Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let (ok, stderr) = run_cdi_hook_with(&spec, &socket, pod.pid(), &["--timeout", "3"]);
    let waited = started.elapsed();
    kill(daemon_pid, Signal::SIGCONT).unwrap();
    assert!(!ok, "the hook succeeded against a stopped daemon: {stderr}");
    assert!(stderr.contains("did not answer within 3s"), "{stderr}");
    assert!(waited < Duration::from_secs(10), "the hook took {waited:?}");

    // The daemon goes on with the request it finds; wait until it has dealt with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log_text().contains("given up") && link_in(&pod.netns, "can0").unwrap().is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the daemon never handled the request\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        link_in(&pod.netns, "can0").unwrap(),
        None,
        "can0 made for a container that never ran\n{}",
        daemon.log_text()
    );
    assert_eq!(host_member_links(), links_before, "host links left behind");
    assert_eq!(host_rules(), rules_before, "rules left behind");
    assert!(
        !attachment_recorded(&dirs),
        "the checkpoint records an attachment for a container that never ran"
    );

    // The runtime tries again (a new container of the pod): it joins, and frames flow.
    let (ok, stderr) = run_cdi_hook(&spec, &socket, pod.pid());
    assert!(ok, "{stderr}\n{}", daemon.log_text());
    assert!(attachment_recorded(&dirs));
    let peer = host_member_links();
    assert_eq!(peer.len(), links_before.len() + 1, "{peer:?}");
    // A frame sent by the pod reaches its own vxcan peer on the host.
    let host_end = peer
        .iter()
        .find(|l| !links_before.contains(l))
        .unwrap()
        .clone();
    let host_dump = Candump::start(&Host, &host_end).unwrap();
    cansend(&pod.netns, "can0", "123#CAFE").unwrap();
    host_dump.wait_for(1, Duration::from_secs(10));
    assert_eq!(host_dump.stop().unwrap().len(), 1, "the pod's frame");

    let gone = daemon.plugin.unprepare(request()).await.unwrap();
    assert!(gone.claims.values().all(|c| c.error.is_empty()), "{gone:?}");
    assert_eq!(host_member_links(), links_before);
    assert_eq!(host_rules(), rules_before);
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
