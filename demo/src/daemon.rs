//! The node daemon, `can-dra-kubelet-plugin`, run as a child process with the demo's directories:
//! started, waited for, stopped with SIGTERM, and killed if the demo ends early.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The directories and files the daemon is pointed at.
#[derive(Debug, Clone)]
pub struct DaemonPaths {
    /// The kubeconfig for the API server double.
    pub kubeconfig: PathBuf,
    /// The node configuration file.
    pub config: PathBuf,
    /// The kubelet's plugin registration directory.
    pub registrar_dir: PathBuf,
    /// The kubelet's plugin data directory.
    pub plugins_dir: PathBuf,
    /// Where CDI specs go.
    pub cdi_dir: PathBuf,
    /// The CDI hook binary the specs reference.
    pub hook: PathBuf,
    /// Where the daemon's log goes.
    pub log: PathBuf,
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `binary` for `node` with `paths`; its output goes to the log file.
    pub fn start(binary: &Path, node: &str, paths: &DaemonPaths) -> anyhow::Result<Self> {
        let log = File::create(&paths.log)
            .with_context(|| format!("creating {}", paths.log.display()))?;
        let child = Command::new(binary)
            .args(["--node-name", node])
            .arg("--kubeconfig")
            .arg(&paths.kubeconfig)
            .arg("--config")
            .arg(&paths.config)
            .arg("--kubelet-registrar-dir")
            .arg(&paths.registrar_dir)
            .arg("--kubelet-plugins-dir")
            .arg(&paths.plugins_dir)
            .arg("--cdi-dir")
            .arg(&paths.cdi_dir)
            .arg("--hook-path")
            .arg(&paths.hook)
            .env("RUST_LOG", "info")
            // The log is a file, read by people: no colour codes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child,
            log: paths.log.clone(),
        })
    }

    /// Fails if the daemon has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the daemon exited ({status})");
        }
        Ok(())
    }

    /// Sends SIGTERM and waits at most `timeout` for the daemon to exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        kill(pid, Signal::SIGTERM).context("sending SIGTERM to the daemon")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the daemon did not stop within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
