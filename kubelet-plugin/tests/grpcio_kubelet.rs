//! The real daemon binary registered, and its claims prepared and unprepared, by a gRPC client of
//! another stack than the daemon's: Python grpcio (the gRPC C core) running
//! `grpcio_kubelet.py`, with every HTTP/2 `:authority` a kubelet's grpc-go sends
//! (`dra-conformance.md` §1.1):
//! - the registration socket's path percent-encoded: the plugin watcher dials the bare path and
//!   grpc-go's `encodeAuthority` escapes it;
//! - the raw path, as older grpc-go sent it;
//! - `localhost`, which grpc-go sends for the DRA service's `unix:` target;
//! - an empty authority, as other clients send.
//!
//! Each authority is used on both sockets, over DRA v1 and v1beta1 and on the health stream:
//! every socket must answer whatever authority a client sends. A tonic client cannot send the first two (the `http` crate
//! refuses them), which is why this test exists next to the kubelet double.
//!
//! Needs `/usr/bin/python3` with grpcio (Debian `python3-grpcio`) and `protoc` (Debian
//! `protobuf-compiler`); `cargo xtask test` installs both. The test fails, naming the packages,
//! when they are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod daemon_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_doubles::apiserver::ApiServer;
use can_dra_kubelet_plugin::cdi::CdiWriter;
use daemon_support::{Daemon, NodeDirs};
use serde_json::{Value, json};

const NODE_CONFIG: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n\
physical:\n  include: []\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 64\n";

/// The hook path written into the CDI specs; nothing runs it here.
const HOOK: &str = "/opt/can-dra/bin/can-dra-cdi-hook";

/// What the test needs from the host, and the Debian packages that provide it.
const PACKAGES: &str = "python3-grpcio protobuf-compiler";

/// Claims prepared per round.
const CLAIMS_PER_ROUND: usize = 2;

/// Debian's python packages install for the system interpreter, which need not be the first
/// `python3` on `PATH`.
fn python() -> PathBuf {
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        system.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

fn missing(what: &str) -> ! {
    panic!(
        "{what}: this test needs the Debian packages {PACKAGES} \
         (`apt-get install {PACKAGES}`, or run `cargo xtask test`, which installs them)"
    )
}

/// Generates the Python message modules from the project's protos into `out`.
fn generate_stubs(out: &Path) {
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/protos");
    let status = Command::new("protoc")
        .arg("-I")
        .arg(&protos)
        .arg(format!("--python_out={}", out.display()))
        .args([
            "dra/v1/api.proto",
            "dra/v1beta1/api.proto",
            "dra-health/v1/api.proto",
            "pluginregistration/v1/api.proto",
        ])
        .status()
        .unwrap_or_else(|e| missing(&format!("cannot run protoc ({e})")));
    assert!(status.success(), "protoc failed with {status}");
}

/// Runs the grpcio client with `plan` and returns what it saw.
fn run_grpcio(stubs: &Path, plan: &Value) -> Value {
    let check = Command::new(python())
        .args(["-c", "import grpc"])
        .output()
        .unwrap_or_else(|e| missing(&format!("cannot run {} ({e})", python().display())));
    if !check.status.success() {
        missing(&format!(
            "{} cannot import grpc: {}",
            python().display(),
            String::from_utf8_lossy(&check.stderr).trim()
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpcio_kubelet.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(stubs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(plan.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the grpcio client failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "the grpcio client printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The authorities a kubelet's grpc-go (or another client) sends, for a registration socket.
fn authorities(registration_socket: &Path) -> Vec<String> {
    let raw = registration_socket.to_string_lossy().into_owned();
    vec![
        encode_authority(&raw),
        raw,
        "localhost".to_owned(),
        String::new(),
    ]
}

/// grpc-go's `encodeAuthority` (`clientconn.go`): every byte but alphanumerics, unreserved
/// characters, sub-delims and `:[]@` becomes `%XX`; so every `/` of a path becomes `%2F`.
fn encode_authority(authority: &str) -> String {
    authority
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-_.~!$&'()*+,;=:[]@".contains(&c) {
                char::from(c).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

struct Round {
    authority: String,
    dra_version: &'static str,
    /// `(uid, name, device)` of each claim.
    claims: Vec<(String, String, String)>,
}

fn rounds(registration_socket: &Path) -> Vec<Round> {
    let mut rounds = Vec::new();
    let mut k = 0;
    for dra_version in ["v1", "v1beta1"] {
        for authority in authorities(registration_socket) {
            let claims = (0..CLAIMS_PER_ROUND)
                .map(|_| {
                    k += 1;
                    (
                        format!("uid-{k:02}"),
                        format!("c{k:02}"),
                        format!("body-m{k}"),
                    )
                })
                .collect();
            rounds.push(Round {
                authority,
                dra_version,
                claims,
            });
        }
    }
    rounds
}

async fn api_with(rounds: &[Round]) -> ApiServer {
    let (api, _, _) = server_with_node().await;
    for (uid, name, device) in rounds.iter().flat_map(|r| &r.claims) {
        api.insert_claim(claim(
            name,
            uid,
            Some((
                json!([result("a", device)]),
                json!([config("FromClaim", &[], json!({"interfaceName": "ecu0"}))]),
            )),
        ));
    }
    api
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_kubelet_registers_prepares_and_unprepares_with_every_authority() {
    let stubs = tempfile::tempdir().unwrap();
    generate_stubs(stubs.path());

    let root = tempfile::tempdir().unwrap();
    // The rounds need the registration socket's path, which depends only on the directory.
    let registration_socket = root
        .path()
        .join("registry")
        .join(format!("{DRIVER}-reg.sock"));
    let rounds = rounds(&registration_socket);
    let api = api_with(&rounds).await;
    let dirs = NodeDirs::new(root.path(), &api, NODE_CONFIG);
    let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new(HOOK)).await;
    assert_eq!(daemon.plugin.registration_socket, registration_socket);

    let endpoint = daemon.plugin.info.endpoint.clone();
    let plan = json!({
        "registration_socket": registration_socket,
        "rounds": rounds.iter().map(|r| json!({
            "authority": r.authority,
            "endpoint": endpoint,
            "dra_version": r.dra_version,
            "claims": r.claims.iter().map(|(uid, name, _)| json!({
                "namespace": "ns", "uid": uid, "name": name,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let seen = run_grpcio(stubs.path(), &plan);
    let cdi = CdiWriter::new(&dirs.cdi, DRIVER, HOOK);

    let mut failures = Vec::new();
    for (round, seen) in rounds.iter().zip(seen["rounds"].as_array().unwrap()) {
        let label = format!(
            "{} with :authority {:?}",
            round.dra_version, round.authority
        );
        let mut fail = |what: &str, got: &Value| failures.push(format!("{label}: {what}: {got}"));

        let info = &seen["get_info"]["ok"];
        if info["type"] != "DRAPlugin" || info["name"] != DRIVER || info["endpoint"] != endpoint {
            fail("GetInfo", &seen["get_info"]);
        } else if seen["notify"] != json!({"ok": {}}) {
            fail("NotifyRegistrationStatus", &seen["notify"]);
        }
        let prepared = &seen["prepare"]["ok"];
        for (uid, _, device) in &round.claims {
            let expected = json!({
                "error": "",
                "devices": [{
                    "request_names": ["a"],
                    "pool_name": NODE,
                    "device_name": device,
                    "cdi_device_ids": [format!(
                        "{}={}",
                        cdi.kind(),
                        CdiWriter::device_name(uid, NODE, device)
                    )],
                }],
            });
            if prepared[uid] != expected {
                fail(&format!("NodePrepareResources of {uid}"), &seen["prepare"]);
            }
            if seen["unprepare"]["ok"][uid] != json!({"error": ""}) {
                fail(
                    &format!("NodeUnprepareResources of {uid}"),
                    &seen["unprepare"],
                );
            }
        }
        // The health stream names the node's devices, the prepared ones among them.
        let reported = seen["health"]["ok"].as_array().cloned().unwrap_or_default();
        let named = |device: &str| {
            reported
                .iter()
                .any(|d| d["pool_name"] == NODE && d["device_name"] == device)
        };
        if !round.claims.iter().all(|(_, _, device)| named(device)) {
            fail("NodeWatchResources", &seen["health"]);
        }
    }
    assert!(
        failures.is_empty(),
        "grpcio {} (the kubelet's authorities) failed:\n{}\ndaemon log:\n{}",
        seen["grpcio_version"],
        failures.join("\n"),
        daemon.log_text()
    );
    // Everything unprepared: no CDI spec is left.
    assert_eq!(cdi.claims_with_specs().unwrap(), Vec::<String>::new());
    assert!(daemon.stop(), "the daemon did not stop cleanly");
}
