//! What the hook hands the daemon comes from outside it (the OCI state, the CDI spec): none of
//! it may forge a line of the real daemon's text log. A container id with a newline and a
//! terminal escape is logged escaped; a claim uid with one is refused. No kernel is needed: the
//! claims are not prepared, so the attach fails before any link is made.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;
mod daemon_support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use api_support::{DRIVER, NODE, server_with_node};
use can_dra_kubelet_plugin::hook_socket::HOOK_SOCKET_NAME;
use daemon_support::{Daemon, NodeDirs};
use serde_json::json;

const NODE_CONFIG: &str = "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\n\
physical:\n  include: []\nvirtualBuses:\n- name: body\n  bitrate: 500k\n  slots: 2\n";

/// A line that, if it reached the log as written, would look like one of the daemon's own.
const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO can_dra_kubelet_plugin: FORGED attached";

fn ask(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(format!("{request}\n").as_bytes()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_input_cannot_forge_a_log_line() {
    let root = tempfile::tempdir().unwrap();
    let (api, _, _) = server_with_node().await;
    let dirs = NodeDirs::new(root.path(), &api, NODE_CONFIG);
    let daemon = Daemon::start(&dirs, NODE, DRIVER, Path::new("/opt/hook")).await;
    let socket = dirs.data(DRIVER).join(HOOK_SOCKET_NAME);

    let container = format!("ctr-1\n{FORGED}\u{1b}[2K");
    let answer = ask(
        &socket,
        &json!({"claimUid": "uid-1", "pool": NODE, "device": "body-m0", "pid": 1,
                "containerId": container}),
    );
    assert_eq!(answer["attached"], false, "{answer}");
    let answer = ask(
        &socket,
        &json!({"claimUid": format!("uid-2\n{FORGED}"), "pool": NODE, "device": "body-m0",
                "pid": 1, "containerId": "ctr-2"}),
    );
    assert_eq!(answer["attached"], false, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("control character"),
        "{answer}"
    );
    // The decoder's message quotes an unknown field's name.
    let mut request = json!({"claimUid": "uid-3", "pool": NODE, "device": "body-m0", "pid": 1,
                             "containerId": "ctr-3"});
    request[format!("x\n{FORGED}")] = json!(1);
    let answer = ask(&socket, &request);
    assert_eq!(answer["attached"], false, "{answer}");

    let log_path = daemon.log.clone();
    assert!(daemon.stop(), "the daemon did not stop cleanly");

    let log = std::fs::read_to_string(&log_path).unwrap();
    let forged: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("2026-01-01T00:00:00"))
        .collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}\n{log}");
    // The daemon colours its own output; the injected erase-line sequence must not pass.
    assert!(
        !log.contains("\u{1b}[2K"),
        "a terminal escape reached the log\n{log}"
    );
    // The attempt itself is visible, escaped.
    assert!(log.contains("ctr-1\\n2026-01-01"), "{log}");
}
