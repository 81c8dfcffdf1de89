//! Throw-away network namespaces for the demo's "node", "pods" and "wire", made from Rust.
//!
//! Each namespace is held by a parked thread that unshared it; the namespace lives exactly as
//! long as the [`DemoNetns`] value, so an interrupted demo leaves nothing behind.

use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, anyhow};
use can_dra_dataplane::netns::Netns;
use nix::sched::{CloneFlags, unshare};

/// A network namespace owned by the demo.
#[derive(Debug)]
pub struct DemoNetns {
    name: String,
    path: PathBuf,
    release: Option<mpsc::Sender<()>>,
    holder: Option<JoinHandle<()>>,
}

impl DemoNetns {
    /// Creates a fresh, empty network namespace.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<PathBuf, nix::Error>>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let holder = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                let result = unshare(CloneFlags::CLONE_NEWNET).map(|()| {
                    PathBuf::from(format!(
                        "/proc/{}/task/{}/ns/net",
                        std::process::id(),
                        nix::unistd::gettid()
                    ))
                });
                let ok = result.is_ok();
                let _ = ready_tx.send(result);
                if ok {
                    // Parked until the namespace is released; then the thread (and with it the
                    // last reference to the namespace) goes away.
                    let _ = release_rx.recv();
                }
            })
            .context("spawning a namespace holder thread")?;
        let path = ready_rx
            .recv()
            .map_err(|_| anyhow!("the namespace holder for {name} died"))?
            .with_context(|| format!("creating network namespace {name} (are you root?)"))?;
        Ok(Self {
            name: name.to_string(),
            path,
            release: Some(release_tx),
            holder: Some(holder),
        })
    }

    /// A path to the namespace file, valid while this value lives.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// An open handle on the namespace.
    pub fn open(&self) -> anyhow::Result<Netns> {
        Netns::from_path(&self.path).with_context(|| format!("opening namespace {}", self.name))
    }
}

impl Drop for DemoNetns {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(holder) = self.holder.take() {
            let _ = holder.join();
        }
    }
}
