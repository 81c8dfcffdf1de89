//! The demo's network namespaces: the "node" (the demo process's own, fresh namespace, which the
//! daemon and the hook inherit), the "wire" (held by a parked thread) and the "pods" (each one a
//! process living in its own namespace, the way a container's init process does).
//!
//! Everything lives exactly as long as the demo: the node namespace goes with the last process
//! in it, a wire namespace with its [`DemoNetns`] value, and a pod process exits as soon as its
//! stdin closes, which happens when the demo drops it or dies.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{Context, anyhow, bail};
use can_dra_dataplane::link::Links;
use can_dra_dataplane::netns::Netns;
use nix::sched::{CloneFlags, unshare};

/// What a pod process prints once it lives in its own namespace.
const POD_READY: &str = "ready";

/// Moves the calling thread, and with it every thread and process started later, into a fresh
/// network namespace with its loopback up: the demo's "node". Call it before anything spawns a
/// thread.
pub fn enter_node_namespace() -> anyhow::Result<()> {
    unshare(CloneFlags::CLONE_NEWNET)
        .context("creating the node's network namespace (are you root?)")?;
    // The API server double listens on 127.0.0.1 in here, and the daemon connects to it.
    let mut links = Links::open().context("opening netlink in the node namespace")?;
    let lo = links
        .by_name("lo")?
        .ok_or_else(|| anyhow!("the new namespace has no loopback"))?;
    links.set_up(lo.index, true).context("bringing lo up")?;
    Ok(())
}

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

/// A "pod": a process of the demo's own binary (`can-dra-demo pod`) that moved into a network
/// namespace of its own, standing for a pod sandbox's init process. Its pid is what a runtime
/// hands to a `createRuntime` hook.
#[derive(Debug)]
pub struct PodProcess {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl PodProcess {
    /// Starts the process and waits until it lives in its own namespace.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the demo's own executable")?;
        let mut child = Command::new(exe)
            .arg("pod")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the process of {name}"))?;
        let stdin = child.stdin.take();
        let mut pod = Self {
            name: name.to_string(),
            child,
            stdin,
        };
        let stdout = pod
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: stdout was not piped"))?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .with_context(|| format!("waiting for {name} to enter its namespace"))?;
        if line.trim() != POD_READY {
            bail!("{name} did not start: it said {line:?}");
        }
        Ok(pod)
    }

    /// The process id (in the demo's pid namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An open handle on the pod's network namespace.
    pub fn netns(&self) -> anyhow::Result<Netns> {
        Netns::from_pid(self.pid())
            .with_context(|| format!("opening the namespace of {}", self.name))
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of `can-dra-demo pod`: unshare the network namespace, say so, and live until stdin
/// closes.
pub fn pod_main() -> anyhow::Result<()> {
    unshare(CloneFlags::CLONE_NEWNET).context("creating the pod's network namespace")?;
    println!("{POD_READY}");
    let mut rest = Vec::new();
    // EOF (the demo dropped the pod, or died) ends the pod.
    let _ = std::io::stdin().read_to_end(&mut rest);
    Ok(())
}
