//! The container runtime's part, done the way a CDI-enabled runtime does it: resolve the fully
//! qualified CDI device ids the kubelet got from the daemon against the spec files in the CDI
//! directory, and run each `createRuntime` hook of the device with the container's OCI state on
//! stdin, within the hook's timeout. A failing hook fails the "container".

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};

/// One OCI hook from a CDI spec.
#[derive(Debug, Clone)]
pub struct Hook {
    /// The executable.
    pub path: PathBuf,
    /// `argv`, `argv[0]` included.
    pub args: Vec<String>,
    /// Seconds the runtime allows.
    pub timeout: Option<u64>,
}

/// What a hook did.
#[derive(Debug, Clone)]
pub struct HookRun {
    /// Whether it exited 0 in time.
    pub succeeded: bool,
    /// What it wrote to stderr.
    pub message: String,
}

/// Without a timeout in the spec, how long the hook may run.
const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// The `createRuntime` hooks of the device `cdi_id` (`vendor/class=name`), found in the spec files
/// of `cdi_dir`. An id that no spec defines is an error, as it is for the runtime.
pub fn create_runtime_hooks(cdi_dir: &Path, cdi_id: &str) -> anyhow::Result<Vec<Hook>> {
    let (kind, name) = cdi_id
        .split_once('=')
        .ok_or_else(|| anyhow!("{cdi_id:?} is not a qualified CDI device id"))?;
    for path in spec_files(cdi_dir)? {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let spec: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if spec["kind"] != kind {
            continue;
        }
        let devices = spec["devices"].as_array().cloned().unwrap_or_default();
        let Some(device) = devices.iter().find(|d| d["name"] == name) else {
            continue;
        };
        let hooks = device["containerEdits"]["hooks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        return hooks
            .iter()
            .filter(|hook| hook["hookName"] == "createRuntime")
            .map(|hook| parse_hook(hook, &path))
            .collect();
    }
    bail!("no CDI spec in {} defines {cdi_id}", cdi_dir.display())
}

/// The spec files (`*.json`) in the CDI directory.
pub fn spec_files(cdi_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(cdi_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).context(format!("listing {}", cdi_dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    Ok(files)
}

fn parse_hook(hook: &Value, spec: &Path) -> anyhow::Result<Hook> {
    let path = hook["path"]
        .as_str()
        .ok_or_else(|| anyhow!("{}: a hook without a path", spec.display()))?;
    let args = hook["args"]
        .as_array()
        .map(|args| {
            args.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_else(|| vec![path.to_owned()]);
    Ok(Hook {
        path: PathBuf::from(path),
        args,
        timeout: hook["timeout"].as_u64(),
    })
}

/// The OCI state of a container being created whose init process is `pid`.
pub fn oci_state(container_id: &str, pid: u32, bundle: &Path) -> Value {
    json!({
        "ociVersion": "1.2.0",
        "id": container_id,
        "status": "creating",
        "pid": pid,
        "bundle": bundle.display().to_string(),
    })
}

/// Runs `hook` as the runtime does: `path` with `args` (`args[0]` as argv[0]), an empty
/// environment, the OCI state on stdin, killed when its timeout passes.
pub fn run_hook(hook: &Hook, state: &Value) -> anyhow::Result<HookRun> {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        command.arg0(argv0).args(rest);
    }
    let mut child = command
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running the hook {}", hook.path.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        match stdin.write_all(serde_json::to_string(state)?.as_bytes()) {
            // A hook that exits without reading its stdin is judged by its exit status.
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other.context("writing the OCI state to the hook")?,
        }
    }
    let timeout = hook
        .timeout
        .map_or(DEFAULT_HOOK_TIMEOUT, Duration::from_secs);
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            // Its stderr is not read: a process the hook started could hold it open.
            return Ok(HookRun {
                succeeded: false,
                message: format!("killed after {timeout:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    Ok(HookRun {
        succeeded: output.status.success(),
        message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use can_dra_kubelet_plugin::cdi::{CdiWriter, ClaimDevice};

    fn device(device: &str) -> ClaimDevice {
        ClaimDevice {
            request: "can".into(),
            pool: "demo-node".into(),
            device: device.into(),
            interface_name: "can0".into(),
        }
    }

    #[test]
    fn ids_the_daemon_hands_out_resolve_to_the_hooks_of_its_specs() {
        let dir = tempfile::tempdir().unwrap();
        let writer = CdiWriter::new(dir.path(), "can.dra.dev", "/opt/hook")
            .with_hook_socket("/plugins/hook.sock");
        writer.write("uid-a", &[device("can0-m0")]).unwrap();
        let ids = writer.write("uid-b", &[device("can0-m1")]).unwrap();
        let hooks = create_runtime_hooks(dir.path(), &ids[0]).unwrap();
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].path, PathBuf::from("/opt/hook"));
        assert_eq!(
            hooks[0].args[1..],
            [
                "--claim",
                "uid-b",
                "--pool",
                "demo-node",
                "--device",
                "can0-m1",
                "--socket",
                "/plugins/hook.sock"
            ]
        );
        assert_eq!(hooks[0].timeout, Some(30));
        let unknown =
            create_runtime_hooks(dir.path(), "k8s.can.dra.dev/can=uid-c-demo-node-can0-m2")
                .unwrap_err();
        assert!(unknown.to_string().contains("no CDI spec"), "{unknown}");
    }

    #[test]
    fn a_hook_gets_the_state_on_stdin_and_its_failure_or_timeout_is_reported() {
        let shell = |script: &str, timeout| Hook {
            path: PathBuf::from("/bin/sh"),
            args: vec!["sh".into(), "-c".into(), script.into()],
            timeout,
        };
        let state = oci_state("ctr", 4242, Path::new("/bundle"));
        let echo = run_hook(&shell("cat >&2", None), &state).unwrap();
        assert!(echo.succeeded);
        let seen: Value = serde_json::from_str(&echo.message).unwrap();
        assert_eq!(seen["pid"], 4242);
        assert_eq!(seen["status"], "creating");

        let refused = run_hook(&shell("echo no bus >&2; exit 1", None), &state).unwrap();
        assert!(!refused.succeeded);
        assert_eq!(refused.message, "no bus");

        let started = Instant::now();
        let stuck = run_hook(&shell("exec sleep 30", Some(1)), &state).unwrap();
        assert!(!stuck.succeeded);
        assert!(
            stuck.message.contains("killed after 1s"),
            "{}",
            stuck.message
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
