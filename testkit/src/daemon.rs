//! The node daemon binary (`can-dra-kubelet-plugin`) as a child process, for the demo and the
//! tests that run it: started with its directories, its output in a log file, waited for until
//! it serves a socket, stopped with a signal, and killed when dropped while still running.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::command::{TestkitError, describe};

/// What the daemon is started with: its node, driver name and directories.
#[derive(Debug, Clone)]
pub struct DaemonArgs {
    /// `--node-name`.
    pub node: String,
    /// `--driver-name`, when not the daemon's default.
    pub driver: Option<String>,
    /// `--kubeconfig`.
    pub kubeconfig: PathBuf,
    /// `--config`: the node configuration file.
    pub config: PathBuf,
    /// `--kubelet-registrar-dir`.
    pub registrar_dir: PathBuf,
    /// `--kubelet-plugins-dir`.
    pub plugins_dir: PathBuf,
    /// `--cdi-dir`.
    pub cdi_dir: PathBuf,
    /// `--hook-path`: the CDI hook binary the specs reference.
    pub hook: PathBuf,
}

impl DaemonArgs {
    /// The command-line arguments.
    ///
    /// ```
    /// use can_dra_testkit::daemon::DaemonArgs;
    /// let args = DaemonArgs {
    ///     node: "n1".into(),
    ///     driver: None,
    ///     kubeconfig: "/k".into(),
    ///     config: "/c".into(),
    ///     registrar_dir: "/r".into(),
    ///     plugins_dir: "/p".into(),
    ///     cdi_dir: "/cdi".into(),
    ///     hook: "/hook".into(),
    /// };
    /// assert_eq!(args.to_args()[..2], ["--node-name", "n1"]);
    /// ```
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--node-name".into(), self.node.clone().into()];
        if let Some(driver) = &self.driver {
            args.extend(["--driver-name".into(), driver.clone().into()]);
        }
        for (flag, path) in [
            ("--kubeconfig", &self.kubeconfig),
            ("--config", &self.config),
            ("--kubelet-registrar-dir", &self.registrar_dir),
            ("--kubelet-plugins-dir", &self.plugins_dir),
            ("--cdi-dir", &self.cdi_dir),
            ("--hook-path", &self.hook),
        ] {
            args.extend([flag.into(), path.clone().into_os_string()]);
        }
        args
    }
}

/// A running daemon; killed (SIGKILL) and reaped on drop if still running.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `binary` with `args` and the extra environment `env`; its stdout and stderr go
    /// to the file `log` (created or truncated).
    pub fn spawn(
        binary: &Path,
        args: &DaemonArgs,
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self, TestkitError> {
        let mut command = Command::new(binary);
        command.args(args.to_args()).stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let line = describe(&command);
        let spawn_error = |source| TestkitError::Spawn {
            command: line.clone(),
            source,
        };
        let out = File::create(log).map_err(spawn_error)?;
        let err = out.try_clone().map_err(spawn_error)?;
        let child = command
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(spawn_error)?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// How the daemon exited, or `None` while it runs.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>, TestkitError> {
        self.child
            .try_wait()
            .map_err(|source| TestkitError::Process {
                action: format!("checking on the daemon (pid {})", self.child.id()),
                source,
            })
    }

    /// Waits at most `timeout` until `dir` holds a Unix socket (the daemon's registration
    /// socket, in the kubelet's registrar directory); fails at once if the daemon exits.
    pub fn wait_for_socket(&mut self, dir: &Path, timeout: Duration) -> Result<(), TestkitError> {
        use std::os::unix::fs::FileTypeExt;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Err(TestkitError::Process {
                    action: format!("waiting for a socket in {}", dir.display()),
                    source: std::io::Error::other(format!(
                        "the daemon exited ({status}): {}",
                        self.log_tail(30)
                    )),
                });
            }
            let socket = std::fs::read_dir(dir)
                .ok()
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_type().is_ok_and(|t| t.is_socket()));
            if socket {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Timeout(format!(
                    "the daemon created no socket in {} within {timeout:?}",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` and waits at most `timeout` for the daemon to exit.
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> Result<ExitStatus, TestkitError> {
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        let action = format!("sending {signal} to the daemon (pid {pid})");
        kill(Pid::from_raw(pid), signal).map_err(|errno| TestkitError::Process {
            action,
            source: errno.into(),
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Timeout(format!(
                    "the daemon did not stop within {timeout:?} of {signal}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
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
