//! The CDI hook binary against a daemon-side hook server over a real unix socket. The daemon's
//! attach logic is replaced by a recording attacher: what is tested here is the hook's contract
//! (read the OCI state, ask, fail closed with a message, bounded in time).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use can_dra_kubelet_plugin::hook_socket::{self, AttachRequest, Attacher, Requester};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Default)]
struct RecordingAttacher {
    requests: Mutex<Vec<AttachRequest>>,
    refuse_with: Option<String>,
    delay: Option<Duration>,
    /// What `Requester::gone` said once the delay was over.
    gone_after_delay: Mutex<Vec<Option<String>>>,
}

impl Attacher for RecordingAttacher {
    type Error = String;

    async fn attach(&self, request: AttachRequest, requester: Requester) -> Result<String, String> {
        self.requests.lock().unwrap().push(request);
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
            self.gone_after_delay.lock().unwrap().push(requester.gone());
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
    let socket = dir
        .path()
        .join("plugin")
        .join(hook_socket::HOOK_SOCKET_NAME);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let attacher = Arc::new(attacher);
    let listener = runtime
        .block_on(async { hook_socket::bind(&socket) })
        .unwrap();
    let served = attacher.clone();
    runtime.spawn(hook_socket::serve(listener, served, std::future::pending()));
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
    let deadline = requests[0]
        .deadline_unix_ms
        .expect("the hook sends its deadline");
    let now = hook_socket::unix_ms(std::time::SystemTime::now());
    assert!(
        deadline > now && deadline <= now + hook_socket::ATTACH_TIMEOUT.as_millis() as u64,
        "deadline {deadline}, now {now}"
    );
    assert_eq!(
        *requests,
        vec![AttachRequest {
            claim_uid: "uid-1".into(),
            pool: "node-a".into(),
            device: "can0-m2".into(),
            pid: 4242,
            container_id: "ctr-9".into(),
            deadline_unix_ms: Some(deadline),
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

#[test]
fn a_stdin_that_is_never_closed_is_bounded_by_the_timeout() {
    let daemon = daemon(RecordingAttacher::default());
    let mut child = Command::new(env!("CARGO_BIN_EXE_can-dra-cdi-hook"))
        .args([
            "--claim", "uid-1", "--pool", "node-a", "--device", "can0-m2",
        ])
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--timeout", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The state is written, but stdin stays open (held by `stdin` until the end of the test).
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&state("4242")).unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = status.expect("the hook still ran 15 s after a 2 s timeout");
    assert!(!status.success());
    let mut message = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut message).unwrap();
    assert!(
        message.contains("stdin was not closed within 2s"),
        "{message}"
    );
    assert!(
        message.contains("refusing to start the container"),
        "{message}"
    );
    assert!(daemon.attacher.requests.lock().unwrap().is_empty());
    drop(stdin);
}

#[test]
fn the_attacher_learns_that_a_hook_gave_up() {
    let daemon = daemon(RecordingAttacher {
        delay: Some(Duration::from_secs(3)),
        ..RecordingAttacher::default()
    });
    let output = run_hook(&daemon.socket, &state("4242"), &["--timeout", "1"]);
    assert!(!output.status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.attacher.gone_after_delay.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the attacher never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = daemon.attacher.gone_after_delay.lock().unwrap()[0].clone();
    let why = gone.expect("the attacher was not told that the hook gave up");
    assert!(why.contains("given up"), "{why}");
}

/// Sends one raw request line and returns the answer.
fn exchange(daemon: &Daemon, line: &str) -> serde_json::Value {
    let answer = daemon.runtime.block_on(async {
        let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        stream.write_all(line.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await.unwrap();
        line
    });
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn an_expired_request_is_refused_without_attaching() {
    let daemon = daemon(RecordingAttacher::default());
    let past = hook_socket::unix_ms(std::time::SystemTime::now()) - 5_000;
    let answer = exchange(
        &daemon,
        &format!(
            "{{\"claimUid\":\"uid-1\",\"pool\":\"node-a\",\"device\":\"can0-m2\",\"pid\":4242,\
             \"containerId\":\"c\",\"deadlineUnixMs\":{past}}}\n"
        ),
    );
    assert_eq!(answer["attached"], false, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("deadline passed"),
        "{answer}"
    );
    assert!(daemon.attacher.requests.lock().unwrap().is_empty());
}

#[test]
fn control_characters_in_the_device_fields_are_refused() {
    let daemon = daemon(RecordingAttacher::default());
    for (field, value) in [
        ("claimUid", "uid\\n1"),
        ("pool", "a\\u001b[2J"),
        ("device", "m\\r0"),
    ] {
        let mut request = serde_json::json!({
            "claimUid": "uid-1", "pool": "node-a", "device": "can0-m2", "pid": 4242,
            "containerId": "c",
        });
        request[field] = serde_json::from_str(&format!("\"{value}\"")).unwrap();
        let answer = exchange(&daemon, &format!("{request}\n"));
        assert_eq!(answer["attached"], false, "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains("control character"), "{message}");
        assert!(!message.contains(['\n', '\r', '\u{1b}']), "{message:?}");
    }
    assert!(daemon.attacher.requests.lock().unwrap().is_empty());
}

#[test]
fn a_closed_connection_counts_as_given_up() {
    let daemon = daemon(RecordingAttacher {
        delay: Some(Duration::from_secs(1)),
        ..RecordingAttacher::default()
    });
    // No deadline (an older hook): only the closed connection tells.
    daemon.runtime.block_on(async {
        let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        stream
            .write_all(
                b"{\"claimUid\":\"uid-1\",\"pool\":\"node-a\",\"device\":\"can0-m2\",\"pid\":4242,\"containerId\":\"c\"}\n",
            )
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        // Half-closed: still waiting; then gone entirely.
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.attacher.gone_after_delay.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the attacher never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = daemon.attacher.gone_after_delay.lock().unwrap()[0].clone();
    let why = gone.expect("a closed connection was not noticed");
    assert!(why.contains("closed its connection"), "{why}");
}

#[test]
fn a_half_closed_connection_still_waits() {
    let daemon = daemon(RecordingAttacher {
        delay: Some(Duration::from_millis(500)),
        ..RecordingAttacher::default()
    });
    let answer = exchange(
        &daemon,
        "{\"claimUid\":\"uid-1\",\"pool\":\"node-a\",\"device\":\"can0-m2\",\"pid\":4242,\"containerId\":\"c\"}\n",
    );
    assert_eq!(answer["attached"], true, "{answer}");
    assert_eq!(
        *daemon.attacher.gone_after_delay.lock().unwrap(),
        vec![None]
    );
}
