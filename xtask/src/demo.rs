//! `cargo xtask demo`, the README's main command: builds the local demo together with the node daemon and the CDI
//! hook it runs, and runs it on the real kernel, natively when the host kernel has CAN and in the VM otherwise, the
//! same choice the kernel tests make.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::suite::{self, Mode};
use crate::vm;

/// The demo's package and binary.
const DEMO: &str = "can-dra-demo";
/// The package of the node daemon and the CDI hook.
const PLUGIN_PACKAGE: &str = "can-dra-kubelet-plugin";
/// The binaries the demo runs, besides itself.
const PLUGIN: &str = "can-dra-kubelet-plugin";
const HOOK: &str = "can-dra-cdi-hook";

#[derive(Debug, Deserialize)]
struct Artifact {
    reason: String,
    #[serde(default)]
    executable: Option<PathBuf>,
    #[serde(default)]
    target: Option<Target>,
}

#[derive(Debug, Deserialize)]
struct Target {
    name: String,
}

/// Builds the demo, the daemon and the hook, and runs the demo; returns whether it succeeded.
pub fn run(vm_options: &vm::Options) -> Result<bool> {
    let root = suite::workspace_root()?;
    let (mode, _) = suite::prepare_kernel("the demo")?;
    eprintln!(
        "==> building {DEMO}, {PLUGIN} and {HOOK} (cargo build -p {DEMO} -p {PLUGIN_PACKAGE})"
    );
    let output = suite::cargo()
        .current_dir(&root)
        .args([
            "build",
            "-p",
            DEMO,
            "-p",
            PLUGIN_PACKAGE,
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !output.status.success() {
        bail!("building the demo failed");
    }
    let artifacts = String::from_utf8_lossy(&output.stdout);
    let [demo, plugin, hook] = [DEMO, PLUGIN, HOOK].map(|name| executable(&artifacts, name));
    let command = vec![
        demo?.display().to_string(),
        "--plugin".to_owned(),
        plugin?.display().to_string(),
        "--hook".to_owned(),
        hook?.display().to_string(),
    ];
    match mode {
        Mode::Native => {
            eprintln!("==> running the demo on this host's kernel");
            let status = std::process::Command::new(&command[0])
                .args(&command[1..])
                .status()
                .with_context(|| format!("running {}", command[0]))?;
            Ok(status.success())
        }
        Mode::Vm => {
            eprintln!("==> running the demo in the VM; its output follows as it comes");
            let script = vm::command_script(&root, &[], &command);
            let started = Instant::now();
            let run = vm::run(vm_options, &script)?;
            eprintln!(
                "==> the VM ran the demo in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            Ok(matches!(run.outcome, vm::Outcome::Exited(0)))
        }
    }
}

/// The executable cargo reported for the binary target `name`.
fn executable(artifacts: &str, name: &str) -> Result<PathBuf> {
    artifacts
        .lines()
        .filter_map(|line| serde_json::from_str::<Artifact>(line).ok())
        .filter(|artifact| artifact.reason == "compiler-artifact")
        .filter(|artifact| artifact.target.as_ref().is_some_and(|t| t.name == name))
        .find_map(|artifact| artifact.executable)
        .with_context(|| format!("cargo did not report the {name} executable"))
}
