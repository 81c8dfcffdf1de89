//! Throw-away network namespaces, and running commands inside a namespace.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

use crate::command::{TestkitError, describe, run};

/// Somewhere commands can run: a [`TestNetns`] or the [`Host`] namespace.
pub trait Namespace {
    /// A command that runs `program` inside the namespace.
    fn command(&self, program: &str) -> Command;
    /// A short description for messages.
    fn label(&self) -> String;
}

/// The namespace the test process runs in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Namespace for Host {
    fn command(&self, program: &str) -> Command {
        Command::new(program)
    }

    fn label(&self) -> String {
        "the host namespace".to_string()
    }
}

/// A uniquely named network namespace (`ip netns add`), deleted when dropped, also when the
/// test panics. Its loopback is up.
///
/// Open it in Rust with `Netns::from_path(ns.path())`.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestNetns {
    /// Creates a namespace named `cdt-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<Self, TestkitError> {
        let serial = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("cdt-{tag}-{}-{serial}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Self { name };
        run(&mut netns.command_args("ip", &["link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    /// The namespace's name under `/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command running `program args...` inside the namespace.
    pub fn command_args(&self, program: &str, args: &[&str]) -> Command {
        let mut command = self.command(program);
        command.args(args);
        command
    }

    /// Runs `program args...` inside the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, TestkitError> {
        run(&mut self.command_args(program, args))
    }

    /// Moves the calling thread into the namespace. Threads and processes it starts afterwards
    /// (a tokio runtime built later, spawned daemons) live there too, so a whole test can use
    /// the namespace as its node's host namespace, loopback included, and leave the machine's
    /// own links alone. The namespace outlives [`Drop`] while such threads remain.
    pub fn enter(&self) -> Result<(), TestkitError> {
        let path = self.path();
        let failed = |detail: String| TestkitError::Spawn {
            command: format!("setns {}", path.display()),
            source: std::io::Error::other(detail),
        };
        let file = std::fs::File::open(&path).map_err(|error| failed(error.to_string()))?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| failed(errno.to_string()))
    }

    /// Starts a process (`sleep`) inside the namespace and returns once it is there, for code
    /// that finds a network namespace through a pid (`/proc/<pid>/ns/net`), as the CDI hook
    /// path does. The process is killed when the [`Resident`] is dropped.
    pub fn resident(&self) -> Result<Resident, TestkitError> {
        let mut command = self.command_args("sleep", &["100000"]);
        command.stdin(Stdio::null());
        let line = describe(&command);
        let child = command.spawn().map_err(|source| TestkitError::Spawn {
            command: line.clone(),
            source,
        })?;
        let resident = Resident { child };
        let inode = |path: &str| std::fs::metadata(path).map(|m| m.ino()).ok();
        let want = inode(&self.path().to_string_lossy());
        // `ip netns exec` enters the namespace before it execs sleep in place: wait for that.
        let deadline = Instant::now() + Duration::from_secs(20);
        while inode(&format!("/proc/{}/ns/net", resident.pid())) != want || want.is_none() {
            if Instant::now() >= deadline {
                return Err(TestkitError::Timeout(format!(
                    "`{line}` did not enter {}",
                    self.label()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(resident)
    }
}

/// A process living in a [`TestNetns`] (see [`TestNetns::resident`]), killed on drop.
#[derive(Debug)]
pub struct Resident {
    child: Child,
}

impl Resident {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Namespace for TestNetns {
    fn command(&self, program: &str) -> Command {
        // `ip netns exec` execs the program in place, so the child's pid is the program's.
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    fn label(&self) -> String {
        format!("netns {}", self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(error) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("cleanup of netns {} failed: {error}", self.name);
        }
    }
}

/// The pid of a process that has already exited (and been reaped): its namespace is gone.
pub fn exited_pid() -> Result<u32, TestkitError> {
    let mut child = Command::new("true")
        .spawn()
        .map_err(|source| TestkitError::Spawn {
            command: "true".to_string(),
            source,
        })?;
    let pid = child.id();
    child.wait().map_err(|source| TestkitError::Spawn {
        command: "true".to_string(),
        source,
    })?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exited_pids_have_no_namespace_file() {
        let pid = exited_pid().unwrap();
        assert!(!std::path::Path::new(&format!("/proc/{pid}/ns/net")).exists());
    }

    #[test]
    fn host_commands_run_directly() {
        let mut command = Host.command("echo");
        command.arg("x");
        assert_eq!(run(&mut command).unwrap(), "x\n");
    }
}
