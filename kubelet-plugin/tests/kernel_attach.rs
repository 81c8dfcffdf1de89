//! The node daemon's attach path against a real kernel: two claims on one virtual bus are
//! prepared through the driver, attached to processes in their own network namespaces as the CDI
//! hook would, and checked with iproute2 and can-utils, which share no code with the driver.
//!
//! The observers are run here with `ip netns exec`; the host side of the bus lives in the test
//! process's namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_api::Bitrate;
use can_dra_kubelet_plugin::cdi::CdiWriter;
use can_dra_kubelet_plugin::checkpoint::CheckpointStore;
use can_dra_kubelet_plugin::claims::ClaimReader;
use can_dra_kubelet_plugin::driver::{ClaimRef, Driver};
use can_dra_kubelet_plugin::hook::{AttachRequest, Attacher};
use can_dra_kubelet_plugin::inventory::{Inventory, VirtualBus};
use can_dra_kubelet_plugin::node::{NodeDriver, NodeParts, NodeState};
use can_dra_kubelet_plugin::status::StatusWriter;
use serde_json::{Value, json};

/// Runs a command and returns its stdout, panicking with its stderr when it fails.
fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace made with `ip netns add`, deleted on drop, with a process (`sleep`)
/// living in it to stand for the pod's container.
struct PodNetns {
    name: String,
    sleeper: Child,
}

impl PodNetns {
    fn new(tag: &str) -> Self {
        let name = format!("cdt-attach-{tag}-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let sleeper = Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "60"])
            .spawn()
            .unwrap();
        let pod = Self { name, sleeper };
        // `ip netns exec` joins the namespace before it execs sleep in place: wait until the
        // child's pid lives there, so the daemon opens the right namespace.
        let want = std::fs::metadata(format!("/run/netns/{}", pod.name))
            .unwrap()
            .ino();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = std::fs::metadata(format!("/proc/{}/ns/net", pod.pid())).map(|m| m.ino());
            if now.ok() == Some(want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sleeper never entered {}",
                pod.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pod
    }

    fn pid(&self) -> u32 {
        self.sleeper.id()
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// `ip -d -j link` inside the namespace.
    fn links(&self) -> Vec<Value> {
        let text = run(self.command("ip").args(["-d", "-j", "link", "show"]));
        serde_json::from_str::<Value>(&text)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap()
    }

    /// How many sockets receive everything on `interface` (rows of `/proc/net/can/rcvlist_all`).
    fn receivers(&self, interface: &str) -> usize {
        let output = self
            .command("cat")
            .arg("/proc/net/can/rcvlist_all")
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.split_whitespace().next() == Some(interface))
            .count()
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = self.sleeper.kill();
        let _ = self.sleeper.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `candump -L` on one interface of a namespace, its output collected by a thread.
struct Dump {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Dump {
    fn start(pod: &PodNetns, interface: &str) -> Self {
        let before = pod.receivers(interface);
        let mut child = pod
            .command("stdbuf")
            .args(["-oL", "candump", "-L", interface])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        // Frames sent before candump's socket is bound would be missed: wait for it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while pod.receivers(interface) <= before {
            assert!(Instant::now() < deadline, "candump never bound {interface}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, lines }
    }

    /// Waits until `count` lines arrived (or a timeout), then a little longer so that extra
    /// copies would show, and stops.
    fn stop_after(mut self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.lines.lock().unwrap().len() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines.lock().unwrap().clone()
    }
}

/// The rules of `cangw -L` in the test's namespace, without their frame counters (the text
/// after `#`), so that listings taken before and after traffic compare equal.
fn cangw_rules() -> Vec<String> {
    // can-utils exits non-zero after a successful listing; a failed one says so on stderr.
    let output = Command::new("cangw").arg("-L").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.trim().is_empty(), "cangw -L: {stderr}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("cangw "))
        .map(|line| line.split('#').next().unwrap_or(line).trim().to_owned())
        .collect()
}

/// Names of the links in the test's namespace that the driver owns (`cdra` prefix).
fn host_member_links() -> Vec<String> {
    let text = run(Command::new("ip").args(["-j", "link", "show"]));
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|link| link["ifname"].as_str())
        .filter(|name| name.starts_with("cdra"))
        .map(str::to_owned)
        .collect()
}

fn claim_ref(name: &str, uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: "ns".into(),
        uid: uid.into(),
        name: name.into(),
    }
}

fn attach_request(uid: &str, device: &str, pid: u32) -> AttachRequest {
    AttachRequest {
        claim_uid: uid.into(),
        pool: NODE.into(),
        device: device.into(),
        pid,
        container_id: format!("ctr-{uid}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kernel test: needs CAN modules and CAP_NET_ADMIN; run by `cargo xtask test`"]
async fn two_pods_attached_to_one_bus_exchange_frames_and_unprepare_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (api, client, _) = server_with_node().await;
    let inventory = Inventory {
        physical: Vec::new(),
        virtual_buses: vec![VirtualBus {
            name: "body".into(),
            bitrate: Bitrate::from_bits_per_second(500_000).unwrap(),
            fd: false,
            data_bitrate: None,
            slots: 4,
        }],
    };
    let cdi = CdiWriter::new(root.path().join("cdi"), DRIVER, "/opt/can-dra/bin/hook");
    let checkpoint = CheckpointStore::new(root.path().join("plugins/checkpoint.json"));
    let driver = NodeDriver::new(NodeParts {
        driver: DRIVER.into(),
        node: NODE.into(),
        inventory,
        claims: ClaimReader::new(client.clone(), DRIVER),
        status: StatusWriter::new(client, DRIVER),
        cdi: cdi.clone(),
        checkpoint: checkpoint.clone(),
    })
    .unwrap();
    for (name, uid, device, interface) in [
        ("ecu-a", "uid-a", "body-m0", "can0"),
        ("ecu-b", "uid-b", "body-m1", "bus"),
    ] {
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
    let rules_before = cangw_rules();
    let links_before = host_member_links();

    let claims = vec![claim_ref("ecu-a", "uid-a"), claim_ref("ecu-b", "uid-b")];
    let prepared = driver.prepare(claims.clone()).await.unwrap();
    for uid in ["uid-a", "uid-b"] {
        let devices = prepared[uid].as_ref().unwrap();
        assert_eq!(devices.len(), 1, "{uid}: {devices:?}");
    }
    // Prepare alone touches no kernel state.
    assert_eq!(cangw_rules(), rules_before);

    let pod_a = PodNetns::new("a");
    let pod_b = PodNetns::new("b");
    let attached_a = driver
        .attach(attach_request("uid-a", "body-m0", pod_a.pid()))
        .await
        .unwrap();
    assert!(attached_a.contains("attached"), "{attached_a}");
    let attached_b = driver
        .attach(attach_request("uid-b", "body-m1", pod_b.pid()))
        .await
        .unwrap();
    assert!(attached_b.contains("attached"), "{attached_b}");

    // Each pod sees its member under the name its claim asked for, as a vxcan end.
    for (pod, interface) in [(&pod_a, "can0"), (&pod_b, "bus")] {
        let links = pod.links();
        let link = links
            .iter()
            .find(|l| l["ifname"] == interface)
            .unwrap_or_else(|| panic!("no {interface} in {}: {links:?}", pod.name));
        assert_eq!(link["linkinfo"]["info_kind"], "vxcan", "{link}");
        let up = link["flags"]
            .as_array()
            .is_some_and(|flags| flags.iter().any(|f| f == "UP"));
        assert!(up, "{interface} is not up: {link}");
    }
    let host_links = host_member_links();
    assert_eq!(
        host_links.len(),
        links_before.len() + 2,
        "one host end per member: {host_links:?}"
    );
    let rules_attached = cangw_rules();
    // A full mesh of two members: one rule each way.
    assert_eq!(
        rules_attached.len(),
        rules_before.len() + 2,
        "{rules_attached:?}"
    );

    // A frame from pod A reaches pod B exactly once, and the other way round.
    for (from, from_if, to, to_if, frame, logged) in [
        (
            &pod_a,
            "can0",
            &pod_b,
            "bus",
            "123#DEADBEEF",
            "123#DEADBEEF",
        ),
        (&pod_b, "bus", &pod_a, "can0", "456#0102", "456#0102"),
    ] {
        let dump = Dump::start(to, to_if);
        run(from.command("cansend").args([from_if, frame]));
        let lines = dump.stop_after(1);
        let seen: Vec<&String> = lines.iter().filter(|l| l.ends_with(logged)).collect();
        assert_eq!(
            seen.len(),
            1,
            "{frame} from {from_if} seen {} times on {to_if}: {lines:?}",
            seen.len()
        );
        assert_eq!(lines.len(), 1, "unexpected frames on {to_if}: {lines:?}");
    }

    // The hook runs again for a second container of the pod: nothing changes.
    let again = driver
        .attach(attach_request("uid-a", "body-m0", pod_a.pid()))
        .await
        .unwrap();
    assert!(again.contains("already attached"), "{again}");
    assert_eq!(
        cangw_rules(),
        rules_attached,
        "a repeated attach added rules"
    );
    assert_eq!(host_member_links(), host_links);
    let state: NodeState = checkpoint.load().unwrap();
    for uid in ["uid-a", "uid-b"] {
        assert!(
            state.claims[uid].devices[0].attachment.is_some(),
            "{uid} not attached in the checkpoint"
        );
    }

    let gone = driver.unprepare(claims).await.unwrap();
    for uid in ["uid-a", "uid-b"] {
        assert_eq!(gone[uid], Ok(()), "{uid}");
    }
    assert_eq!(
        host_member_links(),
        links_before,
        "member links left behind"
    );
    assert_eq!(cangw_rules(), rules_before, "can-gw rules left behind");
    for (pod, interface) in [(&pod_a, "can0"), (&pod_b, "bus")] {
        let links = pod.links();
        assert!(
            !links.iter().any(|l| l["ifname"] == interface),
            "{interface} left in {}: {links:?}",
            pod.name
        );
    }
    assert!(cdi.claims_with_specs().unwrap().is_empty());
    let state: NodeState = checkpoint.load().unwrap();
    assert!(state.claims.is_empty(), "{:?}", state.claims);
}
