//! Host tools the harness needs, the Debian packages that provide them, and installing what is missing.
//!
//! As root with apt-get the missing packages are installed (non-interactively, after one `apt-get update`);
//! otherwise the error names exactly which packages to install.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use crate::process;

/// A host tool and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// The executable looked up on `PATH` (plus the sbin directories).
    pub command: &'static str,
    /// The Debian package to install when it is missing.
    pub package: &'static str,
    /// Extra requirement beyond existing on `PATH`.
    pub requirement: Requirement,
}

/// What a found executable must also satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// Nothing beyond being found.
    Present,
    /// Statically linked (it runs inside an initramfs that has no libc).
    Static,
    /// The Debian system interpreter `/usr/bin/python3` imports this module (Debian's
    /// `python3-*` packages install for that interpreter, not for others on `PATH`).
    PythonModule(&'static str),
}

const fn tool(command: &'static str, package: &'static str) -> Tool {
    Tool {
        command,
        package,
        requirement: Requirement::Present,
    }
}

/// What booting the VM needs.
pub const VM: &[Tool] = &[
    tool("qemu-system-x86_64", "qemu-system-x86"),
    Tool {
        command: "busybox",
        package: "busybox-static",
        requirement: Requirement::Static,
    },
    tool("modprobe", "kmod"),
    tool("depmod", "kmod"),
    tool("dpkg-deb", "dpkg"),
    tool("apt-get", "apt"),
];

/// Independent observers the kernel tests use to check what the driver did.
pub const OBSERVERS: &[Tool] = &[
    tool("cangw", "can-utils"),
    tool("candump", "can-utils"),
    tool("cansend", "can-utils"),
    tool("ip", "iproute2"),
    tool("tc", "iproute2"),
];

/// The real CDI consumer of the kubelet plugin's kernel tests: podman with crun as the OCI runtime and
/// conmon as its container monitor (Debian's podman only recommends crun). Running as root needs no
/// `uidmap`, and `--network none` needs no network backend.
pub const CONTAINER_RUNTIME: &[Tool] = &[
    tool("podman", "podman"),
    tool("crun", "crun"),
    tool("conmon", "conmon"),
];

/// The kubelet-plugin's grpcio client test (`kubelet-plugin/tests/grpcio_kubelet.rs`): a gRPC stack
/// other than the daemon's, and protoc to generate its message modules from `proto/protos`.
pub const GRPCIO_CLIENT: &[Tool] = &[
    tool("protoc", "protobuf-compiler"),
    Tool {
        command: "python3",
        package: "python3-grpcio",
        requirement: Requirement::PythonModule("grpc"),
    },
];

/// Decompressors for compressed kernel modules (only needed when the kernel package ships them).
pub const XZ: Tool = tool("xz", "xz-utils");
/// See [`XZ`].
pub const ZSTD: Tool = tool("zstd", "zstd");
/// See [`XZ`].
pub const GZIP: Tool = tool("gzip", "gzip");

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Makes sure every tool in `tools` is usable, installing missing packages when we can.
pub fn ensure(tools: &[Tool]) -> Result<()> {
    let missing = missing_packages(tools);
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !nix::unistd::geteuid().is_root() || find("apt-get").is_none() {
        bail!(
            "missing host packages: {list}; install them with `apt-get install {list}` (as root)"
        );
    }
    eprintln!("==> installing missing host packages: {list}");
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        process::run_quiet(apt().args(["update", "-q"])).context("apt-get update failed")?;
    }
    process::run_quiet(
        apt()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("apt-get install {list} failed"))?;
    let still = missing_packages(tools);
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// The packages to install for the tools in `tools` that are missing or unsuitable, each package once.
fn missing_packages(tools: &[Tool]) -> Vec<&'static str> {
    let mut packages = Vec::new();
    for tool in tools {
        let ok = match find(tool.command) {
            None => false,
            Some(path) => match tool.requirement {
                Requirement::Present => true,
                Requirement::Static => is_static_executable(&path).unwrap_or(false),
                Requirement::PythonModule(module) => python_imports(module),
            },
        };
        if !ok && !packages.contains(&tool.package) {
            packages.push(tool.package);
        }
    }
    packages
}

/// Finds `command` on `PATH`, also trying the sbin directories that non-root `PATH`s often lack.
pub fn find(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(command))
        .find(|candidate| is_executable(candidate))
}

fn python_imports(module: &str) -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True when the ELF file at `path` has no program interpreter (i.e. needs no dynamic loader).
pub fn is_static_executable(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    elf_has_interpreter(&bytes).map(|has| !has)
}

/// Looks for a `PT_INTERP` program header in a 64-bit little-endian ELF image.
fn elf_has_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    if elf[4] != 2 || elf[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let truncated = || anyhow::anyhow!("truncated ELF header");
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(truncated)?)?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(truncated)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(truncated)?);
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize).context("truncated program header table")?;
        if p_type == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal ELF64 header with the given program header types.
    fn elf_with(types: &[u32]) -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&u16::try_from(types.len()).unwrap().to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            elf.extend(ph);
        }
        elf
    }

    #[test]
    fn interpreter_header_marks_a_dynamic_executable() {
        assert!(elf_has_interpreter(&elf_with(&[6, 3, 1])).unwrap());
        assert!(!elf_has_interpreter(&elf_with(&[1, 1, 2])).unwrap());
        assert!(elf_has_interpreter(b"#!/bin/sh\n").is_err());
        let mut truncated = elf_with(&[1, 3]);
        truncated.truncate(100);
        assert!(elf_has_interpreter(&truncated).is_err());
    }

    #[test]
    fn host_shell_is_dynamic() {
        // Any Debian host's /bin/sh is dynamically linked; this guards the check against always saying "static".
        if Path::new("/bin/sh").exists() {
            assert!(!is_static_executable(Path::new("/bin/sh")).unwrap());
        }
    }

    #[test]
    fn missing_tools_are_reported_by_package_once() {
        let tools = [
            tool("xtask-no-such-tool-a", "pkg-a"),
            tool("xtask-no-such-tool-b", "pkg-a"),
            tool("sh", "dash"),
            tool("xtask-no-such-tool-c", "pkg-c"),
        ];
        assert_eq!(missing_packages(&tools), ["pkg-a", "pkg-c"]);
    }

    #[test]
    fn a_python_module_the_system_python_lacks_is_missing() {
        let tools = [Tool {
            command: "sh",
            package: "pkg-py",
            requirement: Requirement::PythonModule("xtask_no_such_module"),
        }];
        assert_eq!(missing_packages(&tools), ["pkg-py"]);
    }
}
