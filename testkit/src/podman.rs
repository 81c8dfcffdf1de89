//! podman + crun as a real CDI consumer, set up for kernel tests.
//!
//! A [`Podman`] keeps all of podman's state in one directory the test owns, so nothing is left
//! on the machine and nothing of the machine's podman set-up is needed:
//! - storage (`--root`, `--runroot`) under that directory, with the `vfs` driver: containers
//!   run from a [`Podman::rootfs`] directory (`--rootfs`), so no image and no registry is
//!   needed, and `vfs` works on any file system (the VM's root is an overlay on 9p);
//! - a `containers.conf` of its own (`CONTAINERS_CONF`): `crun` as the runtime, `cgroupfs` as
//!   the cgroup manager and a file events logger (there is no systemd in the VM);
//! - CDI specs are read from [`CDI_SPEC_DIR`]: Debian's podman 4.3 ignores `cdi_spec_dirs` in
//!   `containers.conf` and only reads `/etc/cdi` and `/var/run/cdi`. In the VM `/run` is a fresh
//!   tmpfs; natively, tests must remove the specs they cause;
//! - the rootfs is an almost empty directory (the `usr`-merged symlinks and mount points) into
//!   which the host's `/usr` is bound read-only, so containers run the host's can-utils and
//!   iproute2. It is a directory of its own rather than `/` because crun's `pivot_root` fails
//!   on the root a chroot (the VM's `/init`) gave it.
//!
//! The OCI hooks' stderr of each container is kept ([`Podman::hook_log`]): podman reports only
//! a failed hook's exit code.
//!
//! A [`Container`] is a [`Namespace`]: commands run in it with `podman exec`, so the
//! [`Candump`](crate::Candump) and [`cansend`](crate::cansend) helpers work inside containers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::command::{TestkitError, describe, run};
use crate::namespace::Namespace;

/// Where podman finds CDI specs written at run time (it also reads `/etc/cdi`).
pub const CDI_SPEC_DIR: &str = "/var/run/cdi";

/// The search path inside containers: the host's `/usr` is all they have.
const CONTAINER_PATH: &str = "PATH=/usr/sbin:/usr/bin";

/// A private podman installation rooted in a test-owned directory. Dropping it removes its
/// containers (also when the test panics), so no container outlives the test.
#[derive(Debug)]
pub struct Podman {
    installation: Installation,
}

/// Where an installation keeps its state; what commands need to address it.
#[derive(Debug, Clone)]
struct Installation {
    state: PathBuf,
    rootfs: PathBuf,
    config: PathBuf,
}

impl Installation {
    fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", &self.config)
            .arg("--root")
            .arg(self.state.join("storage"))
            .arg("--runroot")
            .arg(self.state.join("run"))
            .args(["--storage-driver", "vfs", "--runtime", "crun"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--tmpdir")
            .arg(self.state.join("tmp"));
        command
    }
}

impl Podman {
    /// Prepares `state` (storage, run root, rootfs, `containers.conf`) for podman with crun.
    /// `state` must be on a file system that allows bind mounts (not under a 9p share).
    pub fn new(state: &Path) -> Result<Self, TestkitError> {
        let io = |path: &Path| {
            let command = format!("preparing {}", path.display());
            move |source| TestkitError::Spawn { command, source }
        };
        let rootfs = state.join("rootfs");
        for dir in ["usr", "etc", "proc", "sys", "dev", "tmp", "run"] {
            let path = rootfs.join(dir);
            std::fs::create_dir_all(&path).map_err(io(&path))?;
        }
        for link in ["bin", "sbin", "lib", "lib64"] {
            let path = rootfs.join(link);
            if !path.exists() {
                std::os::unix::fs::symlink(format!("usr/{link}"), &path).map_err(io(&path))?;
            }
        }
        let config = state.join("containers.conf");
        let text = "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"crun\"\n";
        std::fs::write(&config, text).map_err(io(&config))?;
        Ok(Self {
            installation: Installation {
                state: state.to_path_buf(),
                rootfs,
                config,
            },
        })
    }

    /// The directory containers use as their root file system.
    pub fn rootfs(&self) -> &Path {
        &self.installation.rootfs
    }

    /// `podman` with this installation's storage and configuration; add a subcommand.
    pub fn command(&self) -> Command {
        self.installation.command()
    }

    /// `podman run` of a detached container named `name` from [`Podman::rootfs`], running
    /// `sleep` until it is stopped, in the network `network` (`none`, `container:<name>`)
    /// with the given CDI devices. Returns the output, whatever the outcome, so tests can
    /// check failures too.
    pub fn run_sleeper(
        &self,
        name: &str,
        network: &str,
        cdi_devices: &[&str],
    ) -> Result<Output, TestkitError> {
        let mut command = self.command();
        command.args(["run", "--detach", "--name", name, "--network", network]);
        for device in cdi_devices {
            command.args(["--device", device]);
        }
        // crun sends the hooks' stderr here; podman itself only reports a hook's exit code.
        let hook_log = format!(
            "run.oci.hooks.stderr={}",
            self.hook_log_path(name).display()
        );
        command.args(["--annotation", &hook_log]);
        command
            .args([
                "--volume",
                "/usr:/usr:ro",
                "--env",
                CONTAINER_PATH,
                "--rootfs",
            ])
            .arg(self.rootfs())
            .args(["sleep", "100000"]);
        let line = describe(&command);
        command.output().map_err(|source| TestkitError::Spawn {
            command: line,
            source,
        })
    }

    fn hook_log_path(&self, name: &str) -> PathBuf {
        self.installation.state.join(format!("hooks-{name}.log"))
    }

    /// What the OCI hooks of container `name` wrote on stderr (empty when nothing was).
    pub fn hook_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.hook_log_path(name)).unwrap_or_default()
    }

    /// Like [`Podman::run_sleeper`], but a failure to start is an error.
    pub fn start(
        &self,
        name: &str,
        network: &str,
        cdi_devices: &[&str],
    ) -> Result<Container, TestkitError> {
        let output = self.run_sleeper(name, network, cdi_devices)?;
        if !output.status.success() {
            return Err(TestkitError::Failed {
                command: format!("podman run --name {name} --network {network} {cdi_devices:?}"),
                status: output.status,
                stderr: format!(
                    "{}; hooks said: {}",
                    String::from_utf8_lossy(&output.stderr).trim(),
                    self.hook_log(name).trim()
                ),
            });
        }
        Ok(Container {
            installation: self.installation.clone(),
            name: name.to_string(),
        })
    }

    /// Stops and removes the named containers one by one, in the given order: list dependants
    /// first (`--network container:` ones must go before the container whose namespace they
    /// share). Names that do not exist are skipped.
    pub fn remove(&self, names: &[&str]) -> Result<(), TestkitError> {
        for name in names {
            let mut command = self.command();
            command.args(["rm", "--force", "--ignore", "--time", "0", name]);
            run(&mut command)?;
        }
        Ok(())
    }

    /// Names of all containers of this installation, running or not.
    pub fn containers(&self) -> Result<Vec<String>, TestkitError> {
        let text = run(self
            .command()
            .args(["ps", "--all", "--format", "{{.Names}}"]))?;
        Ok(text.lines().map(str::to_string).collect())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // With --all podman removes dependants before the containers they depend on.
        let _ = self
            .command()
            .args(["rm", "--all", "--force", "--time", "0"])
            .output();
    }
}

/// A running container of a [`Podman`]; commands run in it with `podman exec`.
#[derive(Debug, Clone)]
pub struct Container {
    installation: Installation,
    name: String,
}

impl Container {
    /// The container's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid of the container's init process, as seen from the host.
    pub fn pid(&self) -> Result<u32, TestkitError> {
        let mut command = self.installation.command();
        command.args(["inspect", "--format", "{{.State.Pid}}", &self.name]);
        let text = run(&mut command)?;
        text.trim().parse().map_err(|_| TestkitError::Parse {
            command: describe(&command),
            detail: format!("not a pid: {text:?}"),
        })
    }
}

impl Namespace for Container {
    fn command(&self, program: &str) -> Command {
        let mut command = self.installation.command();
        command.args(["exec", &self.name, program]);
        command
    }

    fn label(&self) -> String {
        format!("container {}", self.name)
    }
}
