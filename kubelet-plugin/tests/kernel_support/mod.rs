//! Kernel-test helpers for the daemon run as a binary: a "pod" (a network namespace with a
//! process living in it), the CDI hook run as an OCI runtime would run it, and what the host
//! holds of the driver, as iproute2 and can-utils see it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use can_dra_testkit::candump::{Candump, cansend};
use can_dra_testkit::namespace::{Host, TestNetns};
use can_dra_testkit::observe::{cangw_rules, links_in};

/// A pod stand-in: a namespace with `sleep` living in it, whose pid the hook reports.
#[derive(Debug)]
pub struct Pod {
    /// The namespace.
    pub netns: TestNetns,
    sleeper: Child,
}

impl Pod {
    /// A new namespace and its process, once the process lives in the namespace.
    pub fn new(tag: &str) -> Self {
        let netns = TestNetns::new(tag).unwrap();
        let sleeper = netns.command_args("sleep", &["300"]).spawn().unwrap();
        let pod = Self { netns, sleeper };
        // `ip netns exec` enters the namespace before it execs sleep in place.
        let want = std::fs::metadata(pod.netns.path()).unwrap().ino();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(format!("/proc/{}/ns/net", pod.pid()))
            .map(|m| m.ino())
            .ok()
            != Some(want)
        {
            assert!(
                Instant::now() < deadline,
                "the sleeper never entered {}",
                pod.netns.name()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pod
    }

    /// The pid of the process in the namespace.
    pub fn pid(&self) -> u32 {
        self.sleeper.id()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.sleeper.kill();
        let _ = self.sleeper.wait();
    }
}

/// Runs the `createRuntime` hook of the claim's CDI spec (path and arguments as written there)
/// with the OCI state of a container whose process is `pid` on stdin; the spec must name the
/// daemon's hook socket `socket`. Returns whether it succeeded and its stderr.
pub fn run_cdi_hook(spec_path: &Path, socket: &Path, pid: u32) -> (bool, String) {
    run_cdi_hook_with(spec_path, socket, pid, &[])
}

/// [`run_cdi_hook`] with `extra` arguments after the spec's own (say `--timeout 3`).
pub fn run_cdi_hook_with(
    spec_path: &Path,
    socket: &Path,
    pid: u32,
    extra: &[&str],
) -> (bool, String) {
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spec_path).unwrap()).unwrap();
    let hook = &spec["devices"][0]["containerEdits"]["hooks"][0];
    assert_eq!(hook["hookName"], "createRuntime", "{spec}");
    let args: Vec<String> = hook["args"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert!(
        args.windows(2)
            .any(|pair| pair[0] == "--socket" && Path::new(&pair[1]) == socket),
        "the CDI spec does not name the hook socket {}: {args:?}",
        socket.display()
    );
    let mut child = Command::new(hook["path"].as_str().unwrap())
        .args(&args)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = format!(
        r#"{{"ociVersion":"1.2.0","id":"ctr-{pid}","status":"creating","pid":{pid},"bundle":"/run/b"}}"#
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(state.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The host's can-gw rules without their counters, so listings before and after traffic compare.
pub fn host_rules() -> Vec<String> {
    cangw_rules(&Host)
        .unwrap()
        .iter()
        .map(|line| line.split('#').next().unwrap_or(line).trim().to_owned())
        .collect()
}

/// The host links the driver owns (the data plane's `cdra` prefix).
pub fn host_member_links() -> Vec<String> {
    links_in(&Host)
        .unwrap()
        .into_iter()
        .map(|link| link.name)
        .filter(|name| name.starts_with(can_dra_dataplane::bus::naming::HOST_PREFIX))
        .collect()
}

/// Sends one frame from `from`'s `can0` and checks that `to`'s `can0` receives it exactly once.
pub fn assert_one_frame(from: &Pod, to: &Pod, frame: &str, label: &str) {
    let dump = Candump::start(&to.netns, "can0").unwrap();
    cansend(&from.netns, "can0", frame).unwrap();
    dump.wait_for(1, Duration::from_secs(10));
    let frames = dump.stop().unwrap();
    assert_eq!(frames.len(), 1, "{label}: {frame} arrived {frames:?}");
}

/// One frame each way between the `can0` of two pods, each arriving exactly once.
pub fn assert_frames_flow(a: &Pod, b: &Pod, label: &str) {
    assert_one_frame(a, b, "123#DEADBEEF", label);
    assert_one_frame(b, a, "456#0102", label);
}
