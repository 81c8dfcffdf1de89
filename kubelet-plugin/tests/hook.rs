//! The CDI hook binary against a daemon-side hook server over a real unix socket. The daemon's
//! attach logic is replaced by a recording attacher: what is tested here is the hook's contract
//! (read the OCI state, ask, fail closed with a message, bounded in time).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use can_dra_kubelet_plugin::hook::{self, AttachRequest, Attacher};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Default)]
struct RecordingAttacher {
    requests: Mutex<Vec<AttachRequest>>,
    refuse_with: Option<String>,
    delay: Option<Duration>,
}

impl Attacher for RecordingAttacher {
    async fn attach(&self, request: AttachRequest) -> Result<String, String> {
        self.requests.lock().unwrap().push(request);
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        match &self.refuse_with {
            Some(message) => Err(message.clone()),
            None => Ok("member created".to_string()),
        }
    }
}

struct Daemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    attacher: Arc<RecordingAttacher>,
    runtime: tokio::runtime::Runtime,
}

fn daemon(attacher: RecordingAttacher) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("plugin").join(hook::HOOK_SOCKET_NAME);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let attacher = Arc::new(attacher);
    let listener = runtime.block_on(async { hook::bind(&socket) }).unwrap();
    let served = attacher.clone();
    runtime.spawn(hook::serve(listener, served, std::future::pending()));
    Daemon {
        _dir: dir,
        socket,
        attacher,
        runtime,
    }
}

fn run_hook(socket: &Path, stdin: &[u8], extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_can-dra-cdi-hook"))
        .args([
            "--claim", "uid-1", "--pool", "node-a", "--device", "can0-m2",
        ])
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn state(pid: &str) -> Vec<u8> {
    format!(
        r#"{{"ociVersion":"1.2.0","id":"ctr-9","status":"creating","pid":{pid},"bundle":"/run/b"}}"#
    )
    .into_bytes()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_valid_state_is_forwarded_and_the_hook_succeeds() {
    let daemon = daemon(RecordingAttacher::default());
    let output = run_hook(&daemon.socket, &state("4242"), &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("member created"));
    let requests = daemon.attacher.requests.lock().unwrap();
    assert_eq!(
        *requests,
        vec![AttachRequest {
            claim_uid: "uid-1".into(),
            pool: "node-a".into(),
            device: "can0-m2".into(),
            pid: 4242,
            container_id: "ctr-9".into(),
        }]
    );
}

#[test]
fn garbage_on_stdin_fails_closed_without_asking_the_daemon() {
    let daemon = daemon(RecordingAttacher::default());
    for (input, expected) in [
        (&b"\x00\xffnot json"[..], "invalid OCI state"),
        (&b""[..], "stdin is empty"),
        (&state("0")[..], "pid 0 is not a process id"),
        (&state("-5")[..], "pid -5 is not a process id"),
        (&br#"{"id":"c","status":"creating"}"#[..], "no pid"),
    ] {
        let output = run_hook(&daemon.socket, input, &[]);
        assert!(!output.status.success());
        let message = stderr(&output);
        assert!(message.contains(expected), "{message}");
        assert!(
            message.contains("refusing to start the container"),
            "{message}"
        );
    }
    assert!(daemon.attacher.requests.lock().unwrap().is_empty());
}

#[test]
fn no_daemon_is_a_clear_failure() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_hook(&dir.path().join("absent.sock"), &state("4242"), &[]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("cannot reach the can-dra node daemon"),
        "{message}"
    );
    assert!(message.contains("absent.sock"), "{message}");
}

#[test]
fn a_refusal_reaches_the_runtime_with_the_daemons_reason() {
    let daemon = daemon(RecordingAttacher {
        refuse_with: Some("claim uid-1 is not prepared on this node".to_string()),
        ..RecordingAttacher::default()
    });
    let output = run_hook(&daemon.socket, &state("4242"), &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("claim uid-1 is not prepared on this node"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_daemon_that_never_answers_is_bounded_in_time() {
    let daemon = daemon(RecordingAttacher {
        delay: Some(Duration::from_secs(60)),
        ..RecordingAttacher::default()
    });
    let started = Instant::now();
    let output = run_hook(&daemon.socket, &state("4242"), &["--timeout", "1"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("did not answer within 1s"),
        "{}",
        stderr(&output)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_malformed_request_is_answered_and_the_server_keeps_serving() {
    let daemon = daemon(RecordingAttacher::default());
    let answer = daemon.runtime.block_on(async {
        let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        stream.write_all(b"{\"claimUid\": 7}\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.unwrap();
        line
    });
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["attached"], false);
    assert!(
        answer["message"].as_str().unwrap().contains("malformed"),
        "{answer}"
    );
    let output = run_hook(&daemon.socket, &state("4242"), &[]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn the_socket_is_private_to_root() {
    use std::os::unix::fs::PermissionsExt;
    let daemon = daemon(RecordingAttacher::default());
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
