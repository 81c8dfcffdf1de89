//! Runs the real `can-dra-kubelet-plugin` binary against the API server double, in a directory
//! of its own, and registers it with the kubelet double: for tests that kill and restart it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use can_dra_doubles::apiserver::ApiServer;
use can_dra_doubles::kubelet::{KubeletDouble, RegisteredPlugin};
use can_dra_testkit::daemon::{Daemon as TestDaemon, DaemonArgs};
use nix::sys::signal::Signal;

/// The directories of one node: kept across daemon restarts.
#[derive(Debug)]
pub struct NodeDirs {
    /// Holds everything below.
    pub root: PathBuf,
    /// `--kubelet-plugins-dir`.
    pub plugins: PathBuf,
    /// `--kubelet-registrar-dir`.
    pub registry: PathBuf,
    /// `--cdi-dir`.
    pub cdi: PathBuf,
    /// The node configuration file.
    pub config: PathBuf,
    /// The kubeconfig pointing at the double.
    pub kubeconfig: PathBuf,
}

impl NodeDirs {
    /// The directories below `root`, with `node_config` as the node configuration and a
    /// kubeconfig for `api`.
    pub fn new(root: &Path, api: &ApiServer, node_config: &str) -> Self {
        let dirs = Self {
            root: root.to_path_buf(),
            plugins: root.join("plugins"),
            registry: root.join("registry"),
            cdi: root.join("cdi"),
            config: root.join("node.yaml"),
            kubeconfig: root.join("kubeconfig"),
        };
        // The kubelet owns these directories; it creates them before any plugin starts.
        std::fs::create_dir_all(&dirs.plugins).unwrap();
        std::fs::create_dir_all(&dirs.registry).unwrap();
        std::fs::write(&dirs.config, node_config).unwrap();
        api.write_kubeconfig(&dirs.kubeconfig).unwrap();
        dirs
    }

    /// The daemon's data directory (checkpoint, hook socket).
    pub fn data(&self, driver: &str) -> PathBuf {
        self.plugins.join(driver)
    }
}

/// A running daemon ([`can_dra_testkit::daemon::Daemon`]), killed (SIGKILL) on drop if still
/// running.
#[derive(Debug)]
pub struct Daemon {
    process: TestDaemon,
    /// Its registration, as the kubelet double made it.
    pub plugin: RegisteredPlugin,
    /// Its log file.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon for `node` over `dirs` (its log goes to `<root>/daemon-<n>.log`, at
    /// `info`) and waits until the kubelet double has registered it.
    pub async fn start(dirs: &NodeDirs, node: &str, driver: &str, hook: &Path) -> Self {
        let binary = Path::new(env!("CARGO_BIN_EXE_can-dra-kubelet-plugin"));
        Self::start_binary(binary, dirs, node, driver, hook, Some("info")).await
    }

    /// [`start`](Self::start) with another build of the daemon, and `RUST_LOG` set to
    /// `rust_log` (`None` leaves the environment as it is).
    pub async fn start_binary(
        binary: &Path,
        dirs: &NodeDirs,
        node: &str,
        driver: &str,
        hook: &Path,
        rust_log: Option<&str>,
    ) -> Self {
        let log = (0..)
            .map(|n| dirs.root.join(format!("daemon-{n}.log")))
            .find(|p| !p.exists())
            .unwrap();
        let args = DaemonArgs {
            node: node.to_owned(),
            driver: Some(driver.to_owned()),
            kubeconfig: dirs.kubeconfig.clone(),
            config: dirs.config.clone(),
            registrar_dir: dirs.registry.clone(),
            plugins_dir: dirs.plugins.clone(),
            cdi_dir: dirs.cdi.clone(),
            hook: hook.to_path_buf(),
        };
        let env: Vec<(&str, &str)> = rust_log.map(|f| ("RUST_LOG", f)).into_iter().collect();
        let mut process = TestDaemon::spawn(binary, &args, &env, &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.exited().unwrap() {
                panic!(
                    "the daemon exited with {status} before registering: {}",
                    process.log_text()
                );
            }
            // A fresh kubelet each time: a restarted daemon registers anew.
            if let Ok(plugin) = KubeletDouble::new(&dirs.registry)
                .register_driver(driver)
                .await
            {
                return Self {
                    process,
                    plugin,
                    log,
                };
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never registered: {}",
                process.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL, then reaps it.
    pub fn kill9(mut self) {
        self.process.stop(Signal::SIGKILL, STOP_TIMEOUT).unwrap();
    }

    /// SIGTERM, then waits for it; whether it exited successfully.
    pub fn stop(mut self) -> bool {
        self.process
            .stop(Signal::SIGTERM, STOP_TIMEOUT)
            .unwrap()
            .success()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

/// How long a signalled daemon may take to exit (the VM is slow).
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// The files below `dir` (recursively) whose names mark an interrupted atomic write.
pub fn temporary_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(temporary_files(&path));
        } else if entry.file_name().to_string_lossy().contains(".tmp-") {
            found.push(path);
        }
    }
    found
}

/// Every file in `dir` (a CDI directory) with its text, by name.
pub fn cdi_files(dir: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(entry.path()).unwrap())
        })
        .collect()
}
