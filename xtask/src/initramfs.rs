//! The VM's initramfs: static busybox, the kernel modules the tests need (in dependency order) and an `/init`
//! that boots into the host's own root filesystem and runs one command.
//!
//! Archives are cached next to the kernel, keyed by a hash of everything that goes into them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cpio::Archive;
use crate::kernel::{self, Kernel, ModuleStep};
use crate::prerequisites;

/// The modules the kernel tests rely on, plus what the harness itself needs (9p, overlay, virtio).
///
/// Transport modules come first so that the 9p device is bound by the time `/init` mounts it.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "can",
    "can-raw",
    "can-bcm",
    "can-gw",
    "can-dev",
    "vcan",
    "vxcan",
    "sch_netem",
    "sch_tbf",
    "sch_prio",
    "sch_ingress",
    "cls_basic",
    "cls_u32",
    "em_canid",
    "act_gact",
    "veth",
];

/// The 9p mount tag of the host's root filesystem (read-only).
pub const HOST_ROOT_TAG: &str = "hostroot";
/// The 9p mount tag of the per-run directory where the command script lives and the exit status is written.
pub const RUN_TAG: &str = "xtaskout";
/// Where the run directory appears inside the guest (after the chroot).
pub const GUEST_RUN_DIR: &str = "/run/xtask";
/// The file (in the run directory) that holds the command's exit status.
pub const STATUS_FILE: &str = "status";
/// The script (in the run directory) that the guest runs.
pub const SCRIPT_FILE: &str = "run.sh";
/// The file (in the run directory) listing, one per line, the host directories under `/tmp` or `/run` that the guest
/// shows at their own paths over its fresh tmpfs (see [`crate::vm::hidden_roots`]).
pub const BINDS_FILE: &str = "binds";
/// Printed on the console right before the command starts; its arrival marks the end of boot.
pub const READY_MARKER: &str = "xtask-init: ready";
/// Prefix of every message `/init` prints about its own failures.
pub const INIT_PREFIX: &str = "xtask-init:";

/// Returns the path of an initramfs for `kernel`, building and caching it when needed.
pub fn ensure(kernel: &Kernel) -> Result<PathBuf> {
    let busybox =
        prerequisites::find("busybox").context("busybox not found (package busybox-static)")?;
    let busybox_bytes =
        fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let steps = kernel::load_order(kernel, MODULES)?;
    let order: Vec<String> = steps
        .iter()
        .filter_map(|s| match s {
            ModuleStep::Insert(path) => Some(module_file_name(path)),
            ModuleStep::Builtin(_) => None,
        })
        .collect::<Result<_>>()?;
    let init = init_script(&order);

    let mut key = Fnv64::new();
    key.write(kernel.version.as_bytes());
    key.write(init.as_bytes());
    for step in &steps {
        key.write(format!("{step:?}").as_bytes());
    }
    key.write(&busybox_bytes);
    let path = kernel
        .dir
        .join(format!("initramfs-{:016x}.cpio", key.finish()));
    if path.is_file() {
        return Ok(path);
    }

    eprintln!(
        "==> building initramfs ({} modules) for {}",
        order.len(),
        kernel.version
    );
    let mut archive = Archive::new(Vec::new());
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "mnt", "modules", "tmp",
    ] {
        archive.directory(dir, 0o755)?;
    }
    archive.char_device("dev/console", 0o600, 5, 1)?;
    archive.char_device("dev/null", 0o666, 1, 3)?;
    archive.file("bin/busybox", 0o755, &busybox_bytes)?;
    archive.file("init", 0o755, init.as_bytes())?;
    archive.file("modules/order", 0o644, order.join("\n").as_bytes())?;
    for step in &steps {
        if let ModuleStep::Insert(source) = step {
            let name = module_file_name(source)?;
            archive.file(&format!("modules/{name}"), 0o644, &read_module(source)?)?;
        }
    }
    let bytes = archive.finish()?;

    let mut staging = tempfile::NamedTempFile::new_in(&kernel.dir)?;
    staging.write_all(&bytes)?;
    staging
        .persist(&path)
        .with_context(|| format!("saving {}", path.display()))?;
    Ok(path)
}

/// The name a module gets inside the initramfs: its file name without any compression suffix.
fn module_file_name(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("bad module path {}", path.display()))?;
    let name = name
        .strip_suffix(".xz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(name);
    let name = name.strip_suffix(".gz").unwrap_or(name);
    if !name.ends_with(".ko") {
        bail!("unexpected module file {}", path.display());
    }
    Ok(name.to_owned())
}

/// Reads a module file, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` on the host: busybox's insmod only takes plain
/// ELF objects.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let decompressor = if name.ends_with(".xz") {
        Some(prerequisites::XZ)
    } else if name.ends_with(".zst") {
        Some(prerequisites::ZSTD)
    } else if name.ends_with(".gz") {
        Some(prerequisites::GZIP)
    } else {
        None
    };
    match decompressor {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            prerequisites::ensure(&[tool])?;
            let out = Command::new(tool.command)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {}", tool.command))?;
            if !out.status.success() {
                bail!(
                    "{} -dc {} failed: {}",
                    tool.command,
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(out.stdout)
        }
    }
}

/// The `/init` script: loads `modules` (file names under `/modules`, in order), mounts the host root read-only
/// over 9p with a tmpfs overlay, moves it onto `/` and chroots into it (as `switch_root` does) and runs the run
/// directory's script with stdout on ttyS1 and stderr on ttyS2, then records the exit status and powers off.
///
/// The move matters to container runtimes: a process that joins a mount namespace (`setns`, as `crun exec`
/// does) gets the namespace's root and the mounts stacked on it. With a plain chroot that root is the
/// initramfs, and `podman exec` would run the initramfs's busybox instead of the container's programs.
fn init_script(modules: &[String]) -> String {
    let module_list = modules.join(" ");
    format!(
        r#"#!/bin/busybox sh
# can-dra test VM init: boot into the host's root filesystem and run one command.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
die() {{ echo "{INIT_PREFIX} $*" >/dev/console; poweroff -f; sleep 60; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || die "cannot mount devtmpfs"
for m in {module_list}; do
    insmod /modules/$m || die "insmod $m failed"
done
mkdir -p /mnt/host /mnt/rw /mnt/root
tries=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 {HOST_ROOT_TAG} /mnt/host; do
    tries=$((tries + 1))
    [ $tries -lt 20 ] || die "cannot mount the host root over 9p (tag {HOST_ROOT_TAG})"
    sleep 0.1
done
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /mnt/root \
    || die "cannot mount the overlay root"
R=/mnt/root
mount -t proc proc $R/proc || die "cannot mount /proc"
mount -t sysfs sysfs $R/sys || die "cannot mount /sys"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || die "cannot mount cgroup2"
mount -t devtmpfs devtmpfs $R/dev || die "cannot mount /dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
# The host's /tmp and /run stay reachable (outside the new root) for the binds below.
mkdir -p /mnt/hidden/tmp /mnt/hidden/run
mount --bind $R/tmp /mnt/hidden/tmp || die "cannot keep the host's /tmp"
mount --bind $R/run /mnt/hidden/run || die "cannot keep the host's /run"
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || die "cannot mount /tmp"
mount -t tmpfs -o mode=0755 tmpfs $R/run || die "cannot mount /run"
mkdir -p $R/run/netns $R{GUEST_RUN_DIR}
mount -t 9p -o trans=virtio,version=9p2000.L {RUN_TAG} $R{GUEST_RUN_DIR} \
    || die "cannot mount the run directory over 9p (tag {RUN_TAG})"
# Host directories the command needs (checkout, target dir) that live under /tmp or /run: at their own paths.
if [ -f $R{GUEST_RUN_DIR}/{BINDS_FILE} ]; then
    while IFS= read -r p; do
        [ -n "$p" ] || continue
        mkdir -p "$R$p" && mount --bind "/mnt/hidden$p" "$R$p" || die "cannot show the host's $p"
    done <$R{GUEST_RUN_DIR}/{BINDS_FILE}
fi
ip link set lo up
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
echo "{READY_MARKER}" >/dev/console
# From here on the new root is reached through the working directory: `/` is still the initramfs for us.
cd $R && mount --move $R / || die "cannot move the root onto /"
chroot . /bin/sh {GUEST_RUN_DIR}/{SCRIPT_FILE} </dev/null >/dev/ttyS1 2>/dev/ttyS2
rc=$?
# stty sets the line with TCSADRAIN: it returns once the command's output has left the UARTs.
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
echo $rc >.{GUEST_RUN_DIR}/{STATUS_FILE}
sync
poweroff -f
sleep 60
"#
    )
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change between Rust releases).
#[derive(Debug)]
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_module_names_lose_their_suffix() {
        assert_eq!(
            module_file_name(Path::new("/x/can-gw.ko")).unwrap(),
            "can-gw.ko"
        );
        assert_eq!(
            module_file_name(Path::new("/x/vxcan.ko.xz")).unwrap(),
            "vxcan.ko"
        );
        assert_eq!(
            module_file_name(Path::new("/x/9p.ko.zst")).unwrap(),
            "9p.ko"
        );
        assert!(module_file_name(Path::new("/x/README")).is_err());
    }

    #[test]
    fn init_loads_modules_in_the_given_order_before_mounting_the_root() {
        let script = init_script(&["virtio.ko".into(), "9pnet.ko".into(), "9p.ko".into()]);
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        let insmod_loop = script
            .find("for m in virtio.ko 9pnet.ko 9p.ko; do")
            .unwrap();
        let root_mount = script.find(HOST_ROOT_TAG).unwrap();
        assert!(insmod_loop < root_mount);
        let kept = script.find("mount --bind $R/tmp /mnt/hidden/tmp").unwrap();
        let tmpfs = script.find("tmpfs $R/tmp").unwrap();
        let binds = script
            .find(&format!("<$R{GUEST_RUN_DIR}/{BINDS_FILE}"))
            .unwrap();
        assert!(kept < tmpfs && tmpfs < binds);
        let moved = script.find("mount --move $R /").unwrap();
        assert!(binds < moved);
        let command = script.find("chroot . /bin/sh").unwrap();
        assert!(root_mount < moved && moved < command);
        assert!(script.contains(&format!("echo $rc >.{GUEST_RUN_DIR}/{STATUS_FILE}")));
        assert!(script.trim_end().ends_with("sleep 60"));
    }

    #[test]
    fn fnv_matches_the_published_test_vectors() {
        let hash = |s: &str| {
            let mut h = Fnv64::new();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
