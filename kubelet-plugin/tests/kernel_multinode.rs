//! A CanBus spanning "nodes": network namespaces routed through the test's own namespace, each
//! running its own `can-dra-kubelet-plugin` process (`ip netns exec`) with its own kubelet, CDI
//! and data directories and `--tunnel-address` on its veth. The API server double listens on the
//! first node's gateway address, which every node reaches through its default route. The test
//! writes the CanBus status as the controller would; claims are prepared through the kubelet
//! double over each daemon's sockets and attached through the real CDI hook binary into "pod"
//! namespaces. can-utils in the pods check what crosses, iproute2 and `cangw -L` what is left.
//!
//! It changes the test namespace: one veth per node and `ip_forward` (restored afterwards), so
//! it runs in the VM (`cargo xtask test`) or on a disposable host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod kernel_support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_support::{DRIVER, claim, config};
use can_dra_doubles::apiserver::ApiServer;
use can_dra_doubles::kubelet::{KubeletDouble, RegisteredPlugin};
use can_dra_proto::dra::v1::Claim;
use can_dra_testkit::{Candump, Namespace, TestNetns, cangw_rules, cansend, links_in};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

const BUS: &str = "body";
const POOL: &str = "canbus/body";
const PORT: u16 = 47000;
/// The interface name every pod asks for.
const POD_IF: &str = "ecu0";
/// How long links and namespaces get to settle.
const WAIT: Duration = Duration::from_secs(30);
/// How long a daemon may take to serve: a debug build started under QEMU/TCG takes ~40 s.
const START: Duration = Duration::from_secs(240);

fn ip(args: &[&str]) -> String {
    can_dra_testkit::run(Command::new("ip").args(args)).unwrap()
}

/// A daemon process in a node's namespace; killed (SIGTERM) on drop, its log printed when the
/// test failed.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- {} (last lines) ---", self.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// One node: its namespace, address, directories and daemon.
struct Node {
    name: String,
    ns: TestNetns,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    dir: tempfile::TempDir,
    daemon: Option<Daemon>,
    plugin: Option<RegisteredPlugin>,
}

impl Node {
    fn registry(&self) -> PathBuf {
        self.dir.path().join("registry")
    }
    fn plugins(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }
    fn cdi(&self) -> PathBuf {
        self.dir.path().join("cdi")
    }

    /// Starts the daemon; [`Node::register`] waits for it.
    fn spawn(&mut self, kubeconfig: &Path) {
        for dir in [self.registry(), self.plugins(), self.cdi()] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let log = self.dir.path().join("daemon.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut command = self
            .ns
            .command(env!("CARGO_BIN_EXE_can-dra-kubelet-plugin"));
        command
            .arg("--node-name")
            .arg(&self.name)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--kubelet-registrar-dir")
            .arg(self.registry())
            .arg("--kubelet-plugins-dir")
            .arg(self.plugins())
            .arg("--cdi-dir")
            .arg(self.cdi())
            .arg("--hook-path")
            .arg(env!("CARGO_BIN_EXE_can-dra-cdi-hook"))
            .arg("--tunnel-address")
            .arg(self.ip.to_string())
            .arg("--tunnel-resync")
            .arg("200ms")
            .env(
                "RUST_LOG",
                "info,can_dra_kubelet_plugin=debug,can_dra_tunnel=debug",
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        self.daemon = Some(Daemon {
            child: command.spawn().unwrap(),
            log,
        });
    }

    /// Registers the daemon with a kubelet double, once it serves.
    async fn register(&mut self) {
        let kubelet = KubeletDouble::new(self.registry());
        let deadline = Instant::now() + START;
        loop {
            match kubelet.register_driver(DRIVER).await {
                Ok(plugin) => {
                    self.plugin = Some(plugin);
                    return;
                }
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "daemon of {} never registered: {error}",
                        self.name
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// The interface names in the node's namespace.
    fn links(&self) -> Vec<String> {
        links_in(&self.ns)
            .unwrap()
            .into_iter()
            .map(|link| link.name)
            .collect()
    }

    fn has_link(&self, name: &str) -> bool {
        self.links().iter().any(|l| l == name)
    }
}

/// Nodes routed through the test's namespace; node i has 192.0.2.(4i+2)/30 behind the gateway
/// 192.0.2.(4i+1).
struct Lan {
    nodes: Vec<Node>,
    forward_before: String,
}

impl Lan {
    fn new(count: u8) -> Self {
        let forward_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        let mut nodes = Vec::new();
        for i in 0..count {
            let ns = TestNetns::new(&format!("mn{i}")).unwrap();
            let outer = format!("cdmn{}-{i}", std::process::id() % 100_000);
            let gateway = Ipv4Addr::new(192, 0, 2, 4 * i + 1);
            let node_ip = Ipv4Addr::new(192, 0, 2, 4 * i + 2);
            ip(&[
                "link",
                "add",
                &outer,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ]);
            ip(&["addr", "add", &format!("{gateway}/30"), "dev", &outer]);
            ip(&["link", "set", &outer, "up"]);
            let inside = |args: &[&str]| ns.exec("ip", args).unwrap();
            inside(&["addr", "add", &format!("{node_ip}/30"), "dev", "eth0"]);
            inside(&["link", "set", "eth0", "up"]);
            inside(&["route", "add", "default", "via", &gateway.to_string()]);
            nodes.push(Node {
                name: format!("node-{}", char::from(b'a' + i)),
                ns,
                ip: node_ip,
                gateway,
                dir: tempfile::tempdir().unwrap(),
                daemon: None,
                plugin: None,
            });
        }
        Self {
            nodes,
            forward_before,
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Daemons first (they hold links), then the namespaces (their veth ends go with them).
        for node in &mut self.nodes {
            node.plugin = None;
            node.daemon = None;
        }
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", self.forward_before.trim());
    }
}

/// A "pod": a namespace with a process in it that stands for the container.
struct Pod {
    ns: TestNetns,
    sleeper: Child,
}

impl Pod {
    fn new(tag: &str) -> Self {
        let ns = TestNetns::new(tag).unwrap();
        let sleeper = ns
            .command_args("sleep", &["600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // `ip netns exec` enters the namespace and then execs sleep: wait until it is there.
        let want = std::fs::metadata(ns.path()).unwrap().ino();
        let deadline = Instant::now() + WAIT;
        while std::fs::metadata(format!("/proc/{}/ns/net", sleeper.id()))
            .map(|m| m.ino())
            .ok()
            != Some(want)
        {
            assert!(
                Instant::now() < deadline,
                "the sleeper never entered {}",
                ns.name()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { ns, sleeper }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.sleeper.kill();
        let _ = self.sleeper.wait();
    }
}

fn canbuses(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("can.dra.dev", "v1alpha1", "CanBus");
    let resource = ApiResource {
        plural: "canbuses".into(),
        ..ApiResource::from_gvk(&gvk)
    };
    Api::all_with(client, &resource)
}

/// Writes `status.endpoints` (and the port) as the controller would, for `nodes`.
async fn set_endpoints(api: &Api<DynamicObject>, all: &[Node], nodes: &[&str]) {
    let endpoints: serde_json::Map<String, Value> = all
        .iter()
        .map(|node| {
            let value = if nodes.contains(&node.name.as_str()) {
                json!(format!("{}:{PORT}", node.ip))
            } else {
                Value::Null
            };
            (node.name.clone(), value)
        })
        .collect();
    let status = json!({"status": {"tunnelPort": PORT, "endpoints": endpoints}});
    api.patch_status(BUS, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

fn wire(i: usize) -> Claim {
    Claim {
        namespace: "ns".into(),
        uid: format!("uid-m{i}"),
        name: format!("member-{i}"),
    }
}

/// Prepares member `i` on `node` through its kubelet double and attaches it into `pod` by running
/// the hook the CDI spec names, as the runtime would.
async fn prepare_and_attach(api: &ApiServer, node: &Node, pod: &Pod, i: usize) {
    let wire = wire(i);
    api.insert_claim(claim(
        &wire.name,
        &wire.uid,
        Some((
            json!([{"request": "a", "driver": DRIVER, "pool": POOL, "device": format!("m{i}")}]),
            json!([config("FromClaim", &[], json!({"interfaceName": POD_IF}))]),
        )),
    ));
    let answer = node
        .plugin
        .as_ref()
        .unwrap()
        .prepare(vec![wire.clone()])
        .await
        .unwrap();
    let result = &answer.claims[&wire.uid];
    assert!(result.error.is_empty(), "{}: {}", node.name, result.error);

    let spec_path = node
        .cdi()
        .join(format!("k8s.can.dra.dev-can_{}.json", wire.uid));
    let socket = node.plugins().join(DRIVER).join("hook.sock");
    let (ok, stderr) = kernel_support::run_cdi_hook(&spec_path, &socket, pod.sleeper.id());
    assert!(ok, "hook on {}: {stderr}", node.name);
}

/// Waits until `check` holds, or fails with `what`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends one frame from each `(pod, id)` and returns, per pod index, how often each id was seen.
fn exchange(
    pods: &[Pod],
    senders: &[(usize, u32)],
    expected: &[usize],
) -> Vec<BTreeMap<u32, usize>> {
    let dumps: Vec<Candump> = pods
        .iter()
        .map(|pod| Candump::start(&pod.ns, POD_IF).unwrap())
        .collect();
    for (pod, id) in senders {
        cansend(&pods[*pod].ns, POD_IF, &format!("{id:03X}#C0FFEE")).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    dumps
        .into_iter()
        .zip(expected)
        .map(|(dump, want)| {
            dump.wait_for(*want, Duration::from_secs(15));
            let mut seen = BTreeMap::new();
            for frame in dump.stop().unwrap() {
                *seen.entry(frame.id).or_insert(0) += 1;
            }
            seen
        })
        .collect()
}

fn once(ids: &[u32]) -> BTreeMap<u32, usize> {
    ids.iter().map(|id| (*id, 1)).collect()
}

/// Nothing of the driver is left on the node: no member, tunnel or stray links, no gw rules.
fn assert_clean(node: &Node) {
    let ours: Vec<String> = node
        .links()
        .into_iter()
        .filter(|l| l.starts_with("cdra") || l.starts_with("vxt"))
        .collect();
    assert!(ours.is_empty(), "{} still has {ours:?}", node.name);
    let rules = cangw_rules(&node.ns).unwrap();
    assert!(
        rules.is_empty(),
        "{} still has gw rules {rules:?}",
        node.name
    );
}

/// A CanBus on `count` nodes, each running a daemon, with one pod member per node.
/// Fields drop in order: the pods first, the nodes (daemons, namespaces) last.
struct Cluster {
    pods: Vec<Pod>,
    names: Vec<String>,
    kubeconfig: PathBuf,
    buses: Api<DynamicObject>,
    server: ApiServer,
    lan: Lan,
}

/// Creates the bus with `spec`, writes its endpoints on every node as the controller would (and
/// `status`, merged), starts the daemons and attaches one member per node.
async fn cluster(count: u8, spec: Value, status: Value) -> Cluster {
    let mut lan = Lan::new(count);
    let server = ApiServer::start_on(&format!("{}:0", lan.nodes[0].gateway))
        .await
        .unwrap();
    let kubeconfig = lan.nodes[0].dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    for node in &lan.nodes {
        server.insert_node(
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name}}))
            .unwrap(),
        );
    }
    let buses = canbuses(server.client().unwrap());
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "can.dra.dev/v1alpha1", "kind": "CanBus",
        "metadata": {"name": BUS},
        "spec": spec,
    }))
    .unwrap();
    buses.create(&PostParams::default(), &object).await.unwrap();
    let names: Vec<String> = lan.nodes.iter().map(|n| n.name.clone()).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    set_endpoints(&buses, &lan.nodes, &all).await;
    if !status.is_null() {
        buses
            .patch_status(
                BUS,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
            .unwrap();
    }

    for node in &mut lan.nodes {
        node.spawn(&kubeconfig);
    }
    for node in &mut lan.nodes {
        node.register().await;
    }
    let pods: Vec<Pod> = (0..lan.nodes.len())
        .map(|i| Pod::new(&format!("mnpod{i}")))
        .collect();
    for (i, (node, pod)) in lan.nodes.iter().zip(&pods).enumerate() {
        prepare_and_attach(&server, node, pod, i).await;
    }
    for node in &lan.nodes {
        eventually(&format!("the tunnel pair on {}", node.name), || {
            node.has_link("vxtm-body") && node.has_link("vxtt-body")
        })
        .await;
    }
    // The endpoint starts right after its links, in the same pass.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Cluster {
        lan,
        server,
        buses,
        kubeconfig,
        names,
        pods,
    }
}

async fn scenario(count: u8, leave_and_return: bool) {
    let Cluster {
        mut lan,
        server: _server,
        buses,
        kubeconfig,
        names,
        pods,
    } = cluster(
        count,
        json!({"bitrate": "500k", "maxMembers": 8}),
        Value::Null,
    )
    .await;
    let all: Vec<&str> = names.iter().map(String::as_str).collect();

    // Every frame reaches every pod exactly once (the sender sees its own through loopback).
    let n = pods.len();
    let ids: Vec<u32> = (0..n as u32).map(|i| 0x100 + i).collect();
    let senders: Vec<(usize, u32)> = ids.iter().enumerate().map(|(i, id)| (i, *id)).collect();
    let seen = exchange(&pods, &senders, &vec![n; n]);
    for (i, seen) in seen.iter().enumerate() {
        assert_eq!(seen, &once(&ids), "pod on {}", lan.nodes[i].name);
    }

    if !leave_and_return {
        // A restarted daemon adopts its tunnel pair and members: the rules come back once, and
        // frames still cross exactly once.
        let node = &mut lan.nodes[0];
        let rules = cangw_rules(&node.ns).unwrap().len();
        node.plugin = None;
        node.daemon = None;
        node.spawn(&kubeconfig);
        node.register().await;
        let node = &lan.nodes[0];
        eventually("the rules after the restart", || {
            cangw_rules(&node.ns).unwrap().len() == rules
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            cangw_rules(&node.ns).unwrap().len(),
            rules,
            "rules duplicated"
        );
        let ids: Vec<u32> = (0..n as u32).map(|i| 0x400 + i).collect();
        let senders: Vec<(usize, u32)> = ids.iter().enumerate().map(|(i, id)| (i, *id)).collect();
        let seen = exchange(&pods, &senders, &vec![n; n]);
        for (i, seen) in seen.iter().enumerate() {
            assert_eq!(
                seen,
                &once(&ids),
                "pod on {} after a restart",
                lan.nodes[i].name
            );
        }
    }

    if leave_and_return {
        let last = n - 1;
        // The last node leaves the status: the others stop sending to it and drop what it
        // sends; it keeps its endpoint (it still has a member) but has no peers.
        set_endpoints(&buses, &lan.nodes, &all[..last]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let seen = exchange(&pods, &[(0, 0x200), (last, 0x2ff)], &vec![1; n]);
        for (i, seen) in seen.iter().enumerate().take(last) {
            assert_eq!(seen, &once(&[0x200]), "pod on {}", lan.nodes[i].name);
        }
        assert_eq!(seen[last], once(&[0x2ff]), "the node that left");

        set_endpoints(&buses, &lan.nodes, &all).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let seen = exchange(&pods, &[(0, 0x300), (last, 0x3ff)], &vec![2; n]);
        for (i, seen) in seen.iter().enumerate() {
            assert_eq!(
                seen,
                &once(&[0x300, 0x3ff]),
                "pod on {} after the return",
                lan.nodes[i].name
            );
        }
    }

    // Unprepare everything and drop the bus: nothing is left on any node.
    for (i, node) in lan.nodes.iter().enumerate() {
        let answer = node
            .plugin
            .as_ref()
            .unwrap()
            .unprepare(vec![wire(i)])
            .await
            .unwrap();
        let error = &answer.claims[&wire(i).uid].error;
        assert!(error.is_empty(), "{}: {error}", node.name);
    }
    buses.delete(BUS, &DeleteParams::default()).await.unwrap();
    for node in &lan.nodes {
        eventually(&format!("{} to remove its tunnel", node.name), || {
            !node.links().iter().any(|l| l.starts_with("vxt"))
        })
        .await;
        assert_clean(node);
    }
    drop(pods);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "kernel test: needs CAN modules, veth and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn two_daemons_join_one_bus_survive_a_restart_and_clean_up() {
    scenario(2, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "kernel test: needs CAN modules, veth and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn three_daemons_follow_a_node_that_leaves_and_returns() {
    scenario(3, true).await;
}

/// The external peer's address: the test's own end of node-a's veth (the Python peer runs in
/// the test's namespace) and cannelloni's default port.
const EXTERNAL: &str = "192.0.2.1:20000";
const EXTERNAL_ID: u32 = 0x1E0;

/// Sends frames `id#<seq>` for every `seq` in `seqs` from `pod`, in order.
fn send_numbered(pod: &Pod, id: u32, seqs: std::ops::Range<u8>) {
    for seq in seqs {
        cansend(&pod.ns, POD_IF, &format!("{id:03X}#{seq:02X}")).unwrap();
    }
}

/// Per CAN id, the sequence numbers (first data byte) in the order they were seen.
fn sequences(frames: impl IntoIterator<Item = (u32, u8)>) -> BTreeMap<u32, Vec<u8>> {
    let mut out: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for (id, seq) in frames {
        out.entry(id).or_default().push(seq);
    }
    out
}

/// A cannelloni-format peer (`tunnel/tests/cannelloni_peer.py`, written from the format
/// description, not with the project's encoder) on [`EXTERNAL`], sending `id#<seq>` for `seqs`
/// to node-a, one frame per datagram; it prints what it receives until it has `expect` frames and
/// two seconds more.
struct PythonPeer {
    child: Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl PythonPeer {
    fn start(to: Ipv4Addr, seqs: std::ops::Range<u8>, expect: usize) -> Self {
        use std::io::BufRead;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tunnel/tests/cannelloni_peer.py"
        );
        let send: Vec<Value> = seqs
            .map(|seq| json!({"id": EXTERNAL_ID, "data": format!("{seq:02x}")}))
            .collect();
        let mut child = Command::new("/usr/bin/python3")
            .args([
                script,
                "--bind",
                EXTERNAL,
                "--to",
                &format!("{to}:{PORT}"),
                "--send",
                &Value::Array(send).to_string(),
                "--per-datagram",
                "1",
                "--interval",
                "0.02",
                "--expect",
                &expect.to_string(),
                "--linger",
                "2",
                "--timeout",
                "60",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "READY");
        assert_eq!(lines.next().unwrap().unwrap(), "SENT");
        Self { child, lines }
    }

    /// Waits for the peer to exit; returns (id, seq) of every frame it received, in order.
    fn received(mut self) -> Vec<(u32, u8)> {
        let frames = self
            .lines
            .by_ref()
            .map(|line| {
                let frame: Value = serde_json::from_str(&line.unwrap()).unwrap();
                let id = u32::try_from(frame["id"].as_u64().unwrap()).unwrap();
                let data = frame["data"].as_str().unwrap();
                (id, u8::from_str_radix(&data[..2], 16).unwrap())
            })
            .collect();
        assert!(self.child.wait().unwrap().success());
        frames
    }
}

/// Captures on every pod while `act` runs; each dump waits for `want` frames, then two seconds
/// more so that a duplicate or a looping frame would show. Returns (id, seq) per pod, in order.
fn capture(pods: &[Pod], want: usize, act: impl FnOnce()) -> Vec<Vec<(u32, u8)>> {
    let dumps: Vec<Candump> = pods
        .iter()
        .map(|pod| Candump::start(&pod.ns, POD_IF).unwrap())
        .collect();
    act();
    dumps
        .into_iter()
        .map(|dump| {
            dump.wait_for(want, Duration::from_secs(30));
            std::thread::sleep(Duration::from_secs(2));
            dump.stop()
                .unwrap()
                .into_iter()
                .map(|frame| (frame.id, frame.data.first().copied().unwrap_or(0xff)))
                .collect()
        })
        .collect()
}

/// Every pod saw exactly `want`: these sequence numbers per id, in this order.
fn assert_every_pod_saw(cluster: &Cluster, seen: &[Vec<(u32, u8)>], want: &BTreeMap<u32, Vec<u8>>) {
    for (name, seen) in cluster.names.iter().zip(seen) {
        assert_eq!(&sequences(seen.iter().copied()), want, "pod on {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "kernel test: needs CAN modules, veth and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn an_external_cannelloni_peer_joins_a_bus_of_two_daemons_without_loops() {
    // node-a serves the external peer, as the controller would record it; node-b does not know
    // it: it gets the peer's frames only through node-a's relay.
    let (address, port) = EXTERNAL.split_once(':').unwrap();
    let spec = json!({"bitrate": "500k", "maxMembers": 8, "externalPeers": [
        {"name": "rack", "address": address, "port": port.parse::<u16>().unwrap()}]});
    let status = json!({"externalPeers": [{"name": "rack", "node": "node-a"}]});
    let cluster = cluster(2, spec, status).await;
    let (pods, node_a) = (&cluster.pods, cluster.lan.nodes[0].ip);
    const A: u32 = 0x1A0;
    const B: u32 = 0x1B0;

    // Ten numbered frames from each of the three parties.
    let mut peer = None;
    let seen = capture(pods, 30, || {
        peer = Some(PythonPeer::start(node_a, 0..10, 20));
        send_numbered(&pods[0], A, 0..10);
        send_numbered(&pods[1], B, 0..10);
    });
    let numbered: Vec<u8> = (0..10).collect();
    let every = BTreeMap::from([
        (A, numbered.clone()),
        (B, numbered.clone()),
        (EXTERNAL_ID, numbered.clone()),
    ]);
    // Each pod sees every frame once and in order: its own through the local loopback, the
    // others' through the tunnel (an echo or a loop would show a frame twice).
    assert_every_pod_saw(&cluster, &seen, &every);
    // The external peer gets both nodes' frames once and in order, and never its own back.
    let external = peer.take().unwrap().received();
    assert_eq!(
        sequences(external),
        BTreeMap::from([(A, numbered.clone()), (B, numbered)]),
        "the external peer"
    );

    // The external peer goes silent (its process is gone; node-a's datagrams to it now draw
    // ICMP port unreachable). The nodes still reach each other, unslowed and exactly once.
    let seen = capture(pods, 6, || {
        send_numbered(&pods[0], A, 10..13);
        send_numbered(&pods[1], B, 10..13);
    });
    let during = BTreeMap::from([(A, vec![10, 11, 12]), (B, vec![10, 11, 12])]);
    assert_every_pod_saw(&cluster, &seen, &during);

    // It comes back on the same address and port: frames flow both ways again, with nothing
    // restarted.
    let mut peer = None;
    let seen = capture(pods, 9, || {
        peer = Some(PythonPeer::start(node_a, 20..23, 6));
        send_numbered(&pods[0], A, 20..23);
        send_numbered(&pods[1], B, 20..23);
    });
    let after = BTreeMap::from([
        (A, vec![20, 21, 22]),
        (B, vec![20, 21, 22]),
        (EXTERNAL_ID, vec![20, 21, 22]),
    ]);
    assert_every_pod_saw(&cluster, &seen, &after);
    assert_eq!(
        sequences(peer.take().unwrap().received()),
        BTreeMap::from([(A, vec![20, 21, 22]), (B, vec![20, 21, 22])]),
        "the external peer after its return"
    );
    drop(cluster);
}
