//! The whole node path with a real CDI consumer: the real `can-dra-kubelet-plugin` binary, fed by
//! the API server double and driven by the kubelet double over its real sockets, writes CDI
//! specs that podman + crun (Debian's) apply; the specs' `createRuntime` hook (the real
//! `can-dra-cdi-hook` binary) attaches each member inside the container's network namespace.
//! can-utils run inside the containers (`podman exec`) and on the wire side, iproute2 and
//! `cangw -L` in the node namespace, check the result; none of them shares code with the driver.
//!
//! The test runs in a namespace of its own that stands for the node's host namespace (the
//! daemon, the API double's loopback and the physical stand-in live there), so it neither sees
//! nor touches the machine's links, and "nothing left" means exactly that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_doubles::kubelet::{KubeletDouble, RegisteredPlugin};
use can_dra_kubelet_plugin::cdi::CdiWriter;
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::node::NodeState;
use can_dra_proto::dra::v1::Claim;
use can_dra_testkit::{
    Candump, CapturedFrame, Container, Host, Namespace, Podman, TestNetns, cangw_rules_uncounted,
    cansend, links_in, podman::CDI_SPEC_DIR, tc_qdiscs,
};
use serde_json::json;
use tokio::runtime::Runtime;

/// The physical stand-in in the node namespace: a vxcan whose peer, in an "ECU" namespace, is
/// the wire.
const WIRE: &str = "cdtwire0";
/// The wire end of the stand-in, in the ECU namespace.
const ECU: &str = "ecu0";

/// One claim of the test: who asks, for which device, under which name inside the pod.
struct Member {
    name: &'static str,
    uid: &'static str,
    device: &'static str,
    interface: &'static str,
}

/// Two members of the node-local bus `body` and a tap on the physical stand-in. The UIDs look
/// like the API server's (they start with a digit), which needs CDI 0.5.0 device names.
const MEMBERS: [Member; 3] = [
    Member {
        name: "ecu-a",
        uid: "1a2b3c4d-0000-4000-8000-00000000000a",
        device: "body-m0",
        interface: "can0",
    },
    Member {
        name: "ecu-b",
        uid: "1a2b3c4d-0000-4000-8000-00000000000b",
        device: "body-m1",
        interface: "bus",
    },
    Member {
        name: "tap",
        uid: "1a2b3c4d-0000-4000-8000-00000000000c",
        device: "cdtwire0-m0",
        interface: "wire",
    },
];

fn kubelet_claim(member: &Member) -> Claim {
    Claim {
        namespace: "ns".into(),
        uid: member.uid.into(),
        name: member.name.into(),
    }
}

/// The CDI spec files of the test's claims in the directory podman reads (the machine's own
/// when the test runs natively), removed on drop so that a failed run leaves none behind.
struct Specs {
    paths: Vec<PathBuf>,
}

impl Specs {
    fn new() -> Self {
        let writer = CdiWriter::new(CDI_SPEC_DIR, DRIVER, "/unused");
        Self {
            paths: MEMBERS.iter().map(|m| writer.spec_path(m.uid)).collect(),
        }
    }

    fn present(&self) -> Vec<&PathBuf> {
        self.paths.iter().filter(|path| path.exists()).collect()
    }
}

impl Drop for Specs {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The daemon, running as its own process; stopped with SIGTERM on drop. Its log goes to a
/// file that failing assertions can show.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(root: &Path, kubeconfig: &Path, config: &Path) -> Self {
        let log = root.join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_can-dra-kubelet-plugin"))
            .args(["--node-name", NODE, "--driver-name", DRIVER])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--config")
            .arg(config)
            .arg("--kubelet-plugins-dir")
            .arg(root.join("plugins"))
            .arg("--kubelet-registrar-dir")
            .arg(root.join("registry"))
            .arg("--cdi-dir")
            .arg(CDI_SPEC_DIR)
            .arg("--hook-path")
            .arg(env!("CARGO_BIN_EXE_can-dra-cdi-hook"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM and checks it exits cleanly.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "daemon exit {status:?}: {}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Registers with the daemon once it serves (it publishes its slices first).
fn register(runtime: &Runtime, kubelet: &KubeletDouble, daemon: &Daemon) -> RegisteredPlugin {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match runtime.block_on(kubelet.register_driver(DRIVER)) {
            Ok(plugin) => return plugin,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(error) => panic!("the daemon never registered: {error}\n{}", daemon.log()),
        }
    }
}

/// Names of the vxcan links in the node namespace other than the stand-in.
fn member_links() -> Vec<String> {
    links_in(&Host)
        .unwrap()
        .into_iter()
        .filter(|link| link.kind.as_deref() == Some("vxcan") && link.name != WIRE)
        .map(|link| link.name)
        .collect()
}

/// Sends `frame` from `from` and returns what `to` captured meanwhile.
fn deliver(
    from: &dyn Namespace,
    from_if: &str,
    to: &dyn Namespace,
    to_if: &str,
    frame: &str,
) -> Vec<CapturedFrame> {
    let dump = Candump::start(to, to_if).unwrap();
    cansend(from, from_if, frame).unwrap();
    dump.wait_for(1, Duration::from_secs(20));
    dump.stop().unwrap()
}

/// Asserts that `captured` is exactly one frame with `id` and `data`.
fn assert_once(captured: &[CapturedFrame], id: u32, data: &[u8], what: &str) {
    let matching = captured
        .iter()
        .filter(|frame| frame.id == id && frame.data == data)
        .count();
    assert_eq!(matching, 1, "{what}: {captured:?}");
    assert_eq!(captured.len(), 1, "{what}: unexpected frames {captured:?}");
}

/// The inode of a container's network namespace.
fn netns_of(container: &Container) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{}/ns/net", container.pid().unwrap()))
        .unwrap()
        .ino()
}

#[test]
#[ignore = "kernel test: needs CAN modules, CAP_NET_ADMIN, podman, crun and conmon; run by `cargo xtask test`"]
fn podman_containers_get_their_members_through_cdi_and_unprepare_leaves_nothing() {
    let started = Instant::now();
    let node = TestNetns::new("podnode").unwrap();
    node.enter().unwrap();
    // Built after entering the namespace: its threads, and everything they spawn, live there.
    let runtime = Runtime::new().unwrap();
    let ecu = TestNetns::new("podecu").unwrap();
    let link_add = format!(
        "link add {WIRE} mtu 16 type vxcan peer name {ECU} netns {}",
        ecu.name()
    );
    can_dra_testkit::run(Host.command("ip").args(link_add.split_whitespace())).unwrap();
    can_dra_testkit::run(Host.command("ip").args(["link", "set", WIRE, "up"])).unwrap();
    ecu.exec("ip", &["link", "set", ECU, "up"]).unwrap();
    let wire_qdiscs = tc_qdiscs(&Host, WIRE).unwrap();

    let root = tempfile::tempdir().unwrap();
    let (api, _, _) = runtime.block_on(server_with_node());
    let kubeconfig = root.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let node_config = root.path().join("node.yaml");
    std::fs::write(
        &node_config,
        format!(
            "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\nphysical:\n  include: [\"{WIRE}\"]\n  slots: 2\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 4\n"
        ),
    )
    .unwrap();
    for dir in ["plugins", "registry", "podman"] {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
    }
    let specs = Specs::new();
    for member in &MEMBERS {
        api.insert_claim(claim(
            member.name,
            member.uid,
            Some((
                json!([result("a", member.device)]),
                json!([config(
                    "FromClaim",
                    &[],
                    json!({"interfaceName": member.interface})
                )]),
            )),
        ));
    }

    let daemon = Daemon::start(root.path(), &kubeconfig, &node_config);
    let kubelet = KubeletDouble::new(root.path().join("registry"));
    let plugin = register(&runtime, &kubelet, &daemon);
    let claims: Vec<Claim> = MEMBERS.iter().map(kubelet_claim).collect();
    let prepared = runtime.block_on(plugin.prepare(claims.clone())).unwrap();
    let cdi_ids: Vec<String> = MEMBERS
        .iter()
        .map(|member| {
            let answer = &prepared.claims[member.uid];
            assert!(answer.error.is_empty(), "{}: {}", member.name, answer.error);
            assert_eq!(answer.devices.len(), 1, "{}: {answer:?}", member.name);
            assert_eq!(answer.devices[0].cdi_device_ids.len(), 1, "{answer:?}");
            answer.devices[0].cdi_device_ids[0].clone()
        })
        .collect();
    // Prepare alone leaves the kernel alone: the hook attaches when a container exists.
    assert!(member_links().is_empty(), "{:?}", member_links());
    assert!(cangw_rules_uncounted(&Host).unwrap().is_empty());

    assert_eq!(specs.present().len(), 3, "one CDI spec per claim");
    let podman = Podman::new(&root.path().join("podman")).unwrap();
    let start = |name: &str, network: &str, cdi_id: &str| {
        podman
            .start(name, network, &[cdi_id])
            .unwrap_or_else(|error| panic!("{error}\ndaemon log:\n{}", daemon.log()))
    };
    let pod_a = start("pod-a", "none", &cdi_ids[0]);
    let pod_b = start("pod-b", "none", &cdi_ids[1]);
    let pod_c = start("pod-c", "none", &cdi_ids[2]);
    let mut containers = 3;

    // Each container has its member under the name its claim asked for, up, as a vxcan end.
    for (pod, member) in [&pod_a, &pod_b, &pod_c].into_iter().zip(&MEMBERS) {
        let links = links_in(pod).unwrap();
        let link = links
            .iter()
            .find(|link| link.name == member.interface)
            .unwrap_or_else(|| panic!("no {} in {}: {links:?}", member.interface, pod.name()));
        assert_eq!(link.kind.as_deref(), Some("vxcan"), "{link:?}");
        assert!(link.up, "{link:?}");
    }
    let host_links = member_links();
    assert_eq!(
        host_links.len(),
        3,
        "one host end per member: {host_links:?}"
    );
    let rules = cangw_rules_uncounted(&Host).unwrap();
    // Two meshes: body (a <-> b) and the stand-in's bus (c <-> wire), one rule each way.
    assert_eq!(rules.len(), 4, "{rules:?}");

    // Frames flow between the two members of `body`, exactly once, both ways.
    let seen = deliver(&pod_a, "can0", &pod_b, "bus", "123#DEADBEEF");
    assert_once(&seen, 0x123, &[0xde, 0xad, 0xbe, 0xef], "pod-a -> pod-b");
    let seen = deliver(&pod_b, "bus", &pod_a, "can0", "456#0102");
    assert_once(&seen, 0x456, &[1, 2], "pod-b -> pod-a");
    // And between the tap and the wire, which candump on the ECU side observes.
    let seen = deliver(&pod_c, "wire", &ecu, ECU, "321#CAFE");
    assert_once(&seen, 0x321, &[0xca, 0xfe], "pod-c -> wire");
    let seen = deliver(&ecu, ECU, &pod_c, "wire", "654#07");
    assert_once(&seen, 0x654, &[7], "wire -> pod-c");

    // A second container in pod-a's network namespace, with the same device: the hook finds
    // the member there and changes nothing.
    let pod_a2 = start("pod-a2", "container:pod-a", &cdi_ids[0]);
    containers += 1;
    assert_eq!(netns_of(&pod_a2), netns_of(&pod_a));
    let said = podman.hook_log("pod-a2");
    assert!(said.contains("already attached"), "{said}");
    let link = can_dra_testkit::link_in(&pod_a2, "can0").unwrap();
    assert!(link.is_some_and(|link| link.up), "pod-a2 lacks can0");
    assert_eq!(
        member_links(),
        host_links,
        "a second container doubled links"
    );
    assert_eq!(
        cangw_rules_uncounted(&Host).unwrap(),
        rules,
        "a second container added rules"
    );
    let seen = deliver(&pod_a2, "can0", &pod_b, "bus", "124#AA");
    assert_once(&seen, 0x124, &[0xaa], "pod-a2 -> pod-b");

    // Keep one spec to show that a container whose claim is no longer prepared fails closed.
    let stale_spec = specs.paths[0].clone();
    let stale_bytes = std::fs::read(&stale_spec).unwrap();

    podman
        .remove(&["pod-a2", "pod-a", "pod-b", "pod-c"])
        .unwrap();
    let unprepared = runtime.block_on(plugin.unprepare(claims)).unwrap();
    for member in &MEMBERS {
        let error = &unprepared.claims[member.uid].error;
        assert!(error.is_empty(), "{}: {error}", member.name);
    }

    // Nothing is left: links, rules, qdiscs, CDI specs, checkpoint entries.
    assert!(
        member_links().is_empty(),
        "links left: {:?}",
        member_links()
    );
    assert_eq!(
        cangw_rules_uncounted(&Host).unwrap(),
        Vec::<String>::new(),
        "can-gw rules left"
    );
    assert_eq!(
        tc_qdiscs(&Host, WIRE).unwrap(),
        wire_qdiscs,
        "qdiscs left on {WIRE}"
    );
    for link in links_in(&Host).unwrap() {
        let qdiscs = tc_qdiscs(&Host, &link.name).unwrap();
        let ours: Vec<_> = qdiscs
            .iter()
            .filter(|qdisc| !matches!(qdisc["kind"].as_str(), Some("noqueue" | "noop")))
            .collect();
        if link.name != WIRE {
            assert!(ours.is_empty(), "qdiscs left on {}: {ours:?}", link.name);
        }
    }
    assert!(
        specs.present().is_empty(),
        "CDI specs left: {:?}",
        specs.present()
    );
    let checkpoint = root
        .path()
        .join("plugins")
        .join(DRIVER)
        .join("checkpoint.json");
    let state: NodeState = CheckpointStore::new(checkpoint).load().unwrap();
    assert!(
        state.claims.is_empty(),
        "checkpoint entries left: {:?}",
        state.claims
    );

    // A spec left behind for an unprepared claim: the hook refuses, the container never runs.
    std::fs::write(&stale_spec, &stale_bytes).unwrap();
    let refused = podman
        .run_sleeper("pod-stale", "none", &[&cdi_ids[0]])
        .unwrap();
    containers += 1;
    std::fs::remove_file(&stale_spec).unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success(),
        "a container started without its bus"
    );
    assert!(stderr.contains("can-dra-cdi-hook"), "{stderr}");
    let said = podman.hook_log("pod-stale");
    assert!(said.contains("refusing to start the container"), "{said}");
    assert!(said.contains("not prepared"), "{said}");
    let running = podman.containers().unwrap();
    podman
        .remove(&running.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    assert!(
        member_links().is_empty(),
        "the refused container left {:?}",
        member_links()
    );

    daemon.stop();
    drop(ecu);
    eprintln!(
        "kernel_podman: {containers} containers, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
