//! `cargo xtask demo`, the README's main command: builds the local demo and runs it on the real kernel,
//! natively when the host kernel has CAN and in the VM otherwise, the same choice the kernel tests make.

use std::process::Stdio;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::suite::{self, Mode};
use crate::vm;

/// The demo's package and binary.
const DEMO: &str = "can-dra-demo";

#[derive(Debug, Deserialize)]
struct Artifact {
    reason: String,
    #[serde(default)]
    executable: Option<std::path::PathBuf>,
    #[serde(default)]
    target: Option<Target>,
}

#[derive(Debug, Deserialize)]
struct Target {
    name: String,
}

/// Builds and runs the demo; returns whether it succeeded.
pub fn run(vm_options: &vm::Options) -> Result<bool> {
    let root = suite::workspace_root()?;
    let (mode, _) = suite::prepare_kernel_tests()?;
    eprintln!("==> building the demo (cargo build -p {DEMO})");
    let output = suite::cargo()
        .current_dir(&root)
        .args([
            "build",
            "-p",
            DEMO,
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !output.status.success() {
        bail!("building {DEMO} failed");
    }
    let executable = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Artifact>(line).ok())
        .filter(|artifact| artifact.reason == "compiler-artifact")
        .filter(|artifact| artifact.target.as_ref().is_some_and(|t| t.name == DEMO))
        .find_map(|artifact| artifact.executable)
        .context("cargo did not report the demo executable")?;
    let command = vec![executable.display().to_string()];
    match mode {
        Mode::Native => {
            eprintln!("==> running the demo on this host's kernel");
            let status = std::process::Command::new(&executable)
                .status()
                .with_context(|| format!("running {}", executable.display()))?;
            Ok(status.success())
        }
        Mode::Vm => {
            let script = vm::command_script(&root, &[], &command);
            let run = vm::run(vm_options, &script)?;
            Ok(matches!(run.outcome, vm::Outcome::Exited(0)))
        }
    }
}
