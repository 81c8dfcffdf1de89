//! Debian's stock kernel for the VM: resolving its version, downloading and caching it, and working out which
//! module files to load (in dependency order) for a list of module names.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{prerequisites, process};

/// The meta-package whose dependency names the current Debian kernel.
const META_PACKAGE: &str = "linux-image-amd64";

/// A kernel unpacked in the cache: `vmlinuz` plus `lib/modules/<version>` (after `depmod`).
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// The cache directory of this version (`<cache>/<version>`).
    pub dir: PathBuf,
}

impl Kernel {
    /// The compressed image as Debian ships it.
    pub fn image(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The image to boot: the uncompressed ELF `vmlinux` when the kernel supports PVH entry (QEMU then skips
    /// the decompressor, which costs about 3 s under TCG), else `vmlinuz`.
    pub fn boot_image(&self) -> PathBuf {
        let elf = self.dir.join("vmlinux");
        if elf.is_file() { elf } else { self.image() }
    }

    /// The root that holds `lib/modules/<version>`, as `modprobe -d` wants it.
    pub fn module_root(&self) -> PathBuf {
        self.dir.join("root")
    }
}

/// One step of loading a module list: a file to `insmod`, or a module the kernel has built in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleStep {
    /// `insmod` this file (path as printed by modprobe, under the module root).
    Insert(PathBuf),
    /// Built into the kernel: nothing to load.
    Builtin(String),
}

/// The cache directory: `$CAN_DRA_VM_CACHE`, else `$HOME/.cache/can-dra/vm`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAN_DRA_VM_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("neither CAN_DRA_VM_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/can-dra/vm"))
}

/// Returns the cached kernel, downloading and unpacking it first when needed.
///
/// The version is `$CAN_DRA_VM_KERNEL` when set, else the one `linux-image-amd64` depends on; when apt cannot
/// answer (offline, no lists) the newest cached version is used.
pub fn ensure(cache: &Path) -> Result<Kernel> {
    let version = match std::env::var("CAN_DRA_VM_KERNEL") {
        Ok(v) if !v.is_empty() => v,
        _ => match remembered_version(cache).map_or_else(
            || {
                let v = resolve_version()?;
                remember_version(cache, &v);
                Ok(v)
            },
            Ok,
        ) {
            Ok(v) => v,
            Err(err) => match newest_cached(cache) {
                Some(v) => {
                    eprintln!(
                        "==> apt cannot resolve {META_PACKAGE} ({err:#}); using cached kernel {v}"
                    );
                    v
                }
                None => return Err(err),
            },
        },
    };
    let dir = cache.join(&version);
    let kernel = Kernel { version, dir };
    if !(kernel.image().is_file() && kernel.module_root().is_dir()) {
        download(cache, &kernel)?;
    }
    if !kernel.dir.join("vmlinux").is_file()
        && let Err(err) = extract_vmlinux(&kernel)
    {
        eprintln!("warning: booting the compressed kernel (slower): {err:#}");
    }
    Ok(kernel)
}

/// Where the last answer of apt is remembered, so that a run does not pay ~1 s of `apt-cache` every time.
const RESOLVED_FILE: &str = "resolved-version";
/// apt touches this directory when `apt-get update` changes the package lists.
const APT_LISTS: &str = "/var/lib/apt/lists";

/// The version apt named last time, if the package lists have not changed since (and it is under a day old).
fn remembered_version(cache: &Path) -> Option<String> {
    let file = cache.join(RESOLVED_FILE);
    let resolved_at = fs::metadata(&file).and_then(|m| m.modified()).ok()?;
    let lists_at = fs::metadata(APT_LISTS).and_then(|m| m.modified()).ok()?;
    let fresh = resolved_at > lists_at
        && resolved_at
            .elapsed()
            .is_ok_and(|age| age.as_secs() < 24 * 3600);
    let version = fs::read_to_string(&file).ok()?.trim().to_owned();
    (fresh && !version.is_empty()).then_some(version)
}

fn remember_version(cache: &Path, version: &str) {
    // Only an optimisation: a failure to write it just means asking apt again next time.
    if fs::create_dir_all(cache).is_ok() {
        let _ = fs::write(cache.join(RESOLVED_FILE), version);
    }
}

/// Which compression the kernel's config says the image uses, as (config symbol, magic bytes, tool).
const IMAGE_COMPRESSIONS: &[(&str, &[u8], prerequisites::Tool)] = &[
    ("CONFIG_KERNEL_XZ=y", b"\xfd7zXZ\x00", prerequisites::XZ),
    (
        "CONFIG_KERNEL_ZSTD=y",
        b"\x28\xb5\x2f\xfd",
        prerequisites::ZSTD,
    ),
    ("CONFIG_KERNEL_GZIP=y", b"\x1f\x8b\x08", prerequisites::GZIP),
];

/// Unpacks the ELF kernel from `vmlinuz` (the compressed payload starts at its format's magic) when the kernel
/// has PVH entry, which lets QEMU boot the ELF directly.
fn extract_vmlinux(kernel: &Kernel) -> Result<()> {
    let config_path = kernel
        .module_root()
        .join("boot")
        .join(format!("config-{}", kernel.version));
    let config = fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    if !config.lines().any(|l| l == "CONFIG_PVH=y") {
        bail!("kernel {} has no PVH entry point", kernel.version);
    }
    let (_, magic, tool) = IMAGE_COMPRESSIONS
        .iter()
        .find(|(symbol, _, _)| config.lines().any(|l| l == *symbol))
        .context("unknown kernel image compression")?;
    prerequisites::ensure(&[*tool])?;
    let image = fs::read(kernel.image())?;
    let start = find(&image, magic).context("compressed payload not found in vmlinuz")?;
    let mut child = Command::new(tool.command)
        .args(["-dc", "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", tool.command))?;
    let mut stdin = child.stdin.take().context("decompressor stdin")?;
    let payload = image[start..].to_vec();
    // Feed from another thread: the decompressor's output would otherwise fill its pipe and deadlock us.
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        // The decompressor stops reading at the end of the stream; the trailing bytes are not part of it.
        let _ = stdin.write_all(&payload);
    });
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    // Decompressors complain about the bytes after the stream (exit status 1 or 2): judge the result instead.
    if out.stdout.len() < 1 << 20 || !out.stdout.starts_with(b"\x7fELF") {
        bail!(
            "{} did not produce an ELF kernel from vmlinuz",
            tool.command
        );
    }
    let mut staging = tempfile::NamedTempFile::new_in(&kernel.dir)?;
    std::io::Write::write_all(&mut staging, &out.stdout)?;
    staging.persist(kernel.dir.join("vmlinux"))?;
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Asks apt which `linux-image-<version>-amd64` package the meta-package depends on.
fn resolve_version() -> Result<String> {
    let depends = || process::output(Command::new("apt-cache").args(["depends", META_PACKAGE]));
    let text = match depends().ok().and_then(|out| parse_image_dependency(&out)) {
        Some(v) => v,
        None => {
            // No package lists yet (fresh container): fetch them once and ask again.
            eprintln!("==> apt-get update (to resolve {META_PACKAGE})");
            process::run_quiet(Command::new("apt-get").args(["update", "-q"]))
                .context("apt-get update failed")?;
            let out = depends().context("apt-cache depends failed")?;
            parse_image_dependency(&out).with_context(|| {
                format!("apt-cache depends {META_PACKAGE} names no linux-image package")
            })?
        }
    };
    Ok(text)
}

/// Extracts the kernel release from `apt-cache depends linux-image-amd64` output.
fn parse_image_dependency(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        // Alternatives are marked `|Depends:`; any of them names an image package.
        let (kind, package) = line.trim().trim_start_matches('|').split_once(':')?;
        if kind.trim() != "Depends" {
            return None;
        }
        let package = package.trim();
        package
            .strip_prefix("linux-image-")
            .filter(|v| v.ends_with("-amd64"))
            .map(str::to_owned)
    })
}

fn newest_cached(cache: &Path) -> Option<String> {
    let mut versions: Vec<String> = fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("vmlinuz").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    versions.sort_by(|a, b| compare_versions(a, b));
    versions.pop()
}

/// Orders kernel releases numerically (`6.1.0-9` < `6.1.0-56`).
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    key(a).cmp(&key(b))
}

/// Downloads the image package into a private temporary directory and renames it into place only once it is
/// complete, so an interrupted download never leaves a half-filled cache entry behind.
fn download(cache: &Path, kernel: &Kernel) -> Result<()> {
    let package = format!("linux-image-{}", kernel.version);
    eprintln!(
        "==> downloading Debian kernel {} ({package}) into {}",
        kernel.version,
        cache.display()
    );
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".download-{}-", kernel.version))
        .tempdir_in(cache)
        .with_context(|| format!("creating a staging directory in {}", cache.display()))?;
    let work = staging.path();

    // apt drops privileges to `_apt` for downloads when it can; a world-writable directory lets it.
    let _ = fs::set_permissions(work, std::os::unix::fs::PermissionsExt::from_mode(0o777));
    process::run_quiet(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(work),
    )
    .with_context(|| format!("apt-get download {package} failed"))?;
    let deb = fs::read_dir(work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {package} produced no .deb"))?;

    eprintln!("==> unpacking {}", deb.display());
    let root = work.join("root");
    process::run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))
        .with_context(|| format!("dpkg-deb -x {} failed", deb.display()))?;
    fs::remove_file(&deb)?;

    // Newer Debian ships modules under usr/lib only; modprobe -d looks in lib/modules.
    let lib_modules = root.join("lib/modules").join(&kernel.version);
    let usr_modules = root.join("usr/lib/modules").join(&kernel.version);
    if !lib_modules.exists() && usr_modules.is_dir() {
        fs::create_dir_all(root.join("lib/modules"))?;
        std::os::unix::fs::symlink(&usr_modules, &lib_modules)?;
    }
    if !lib_modules.is_dir() {
        bail!("{package} has no lib/modules/{}", kernel.version);
    }
    let image = ["boot", "usr/lib/linux", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(format!("vmlinuz-{}", kernel.version)))
        .find(|p| p.is_file())
        .or_else(|| Some(lib_modules.join("vmlinuz")).filter(|p| p.is_file()))
        .with_context(|| format!("{package} contains no vmlinuz"))?;
    fs::rename(&image, work.join("vmlinuz"))?;

    eprintln!("==> depmod {}", kernel.version);
    process::run_quiet(
        Command::new("depmod")
            .arg("-b")
            .arg(&root)
            .arg(&kernel.version),
    )
    .context("depmod failed")?;

    // The staging directory was opened up for apt; the cache entry itself is only ours to write.
    fs::set_permissions(work, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let staged = staging.keep();
    match fs::rename(&staged, &kernel.dir) {
        Ok(()) => Ok(()),
        // Another run finished the same download first: use theirs.
        Err(_) if kernel.image().is_file() => {
            let _ = fs::remove_dir_all(&staged);
            Ok(())
        }
        Err(err) => {
            let _ = fs::remove_dir_all(&staged);
            Err(err).with_context(|| format!("moving the kernel into {}", kernel.dir.display()))
        }
    }
}

/// Resolves `modules` (names as modprobe accepts them) to the load steps, dependencies first, each file once.
///
/// A module that the kernel package does not have is an error naming it.
pub fn load_order(kernel: &Kernel, modules: &[&str]) -> Result<Vec<ModuleStep>> {
    let mut lists = Vec::with_capacity(modules.len());
    for module in modules {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(kernel.module_root())
            .args(["-S", &kernel.version, "--show-depends", module])
            .output()
            .context("running modprobe (package kmod)")?;
        if !out.status.success() {
            bail!(
                "kernel {} has no module {module}: {}",
                kernel.version,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        lists.push(parse_show_depends(&String::from_utf8_lossy(&out.stdout)));
    }
    Ok(merge_orders(lists))
}

/// Parses `modprobe --show-depends` output: `insmod PATH [params]` and `builtin NAME` lines, in load order.
pub fn parse_show_depends(output: &str) -> Vec<ModuleStep> {
    output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("insmod"), Some(path)) => Some(ModuleStep::Insert(PathBuf::from(path))),
                (Some("builtin"), Some(name)) => Some(ModuleStep::Builtin(name.to_owned())),
                _ => None,
            }
        })
        .collect()
}

/// Concatenates per-module load orders, keeping the first occurrence of each step.
///
/// Each list has dependencies before dependents. When a step recurs, its first placement already had all its
/// dependencies before it (from that earlier list), so keeping first occurrences preserves a valid order.
pub fn merge_orders(lists: Vec<Vec<ModuleStep>>) -> Vec<ModuleStep> {
    let mut merged: Vec<ModuleStep> = Vec::new();
    for step in lists.into_iter().flatten() {
        if !merged.contains(&step) {
            merged.push(step);
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_dependency_is_read_from_apt_cache_output() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_image_dependency(out).as_deref(),
            Some("6.1.0-56-amd64")
        );
        let alternatives =
            "linux-image-amd64\n |Depends: linux-image-6.12.9-amd64\n  Depends: <foo>\n";
        assert_eq!(
            parse_image_dependency(alternatives).as_deref(),
            Some("6.12.9-amd64")
        );
        assert_eq!(
            parse_image_dependency("linux-image-amd64\n  Recommends: x\n"),
            None
        );
        assert_eq!(
            parse_image_dependency("linux-image-amd64\n  Depends: linux-image-6.1-unsigned\n"),
            None
        );
    }

    #[test]
    fn show_depends_lines_become_steps_and_params_are_dropped() {
        let out = "insmod /r/lib/modules/k/kernel/net/can/can.ko \n\
                   builtin crc32c\n\
                   insmod /r/lib/modules/k/kernel/net/can/can-gw.ko max_hops=1\n";
        assert_eq!(
            parse_show_depends(out),
            vec![
                ModuleStep::Insert("/r/lib/modules/k/kernel/net/can/can.ko".into()),
                ModuleStep::Builtin("crc32c".into()),
                ModuleStep::Insert("/r/lib/modules/k/kernel/net/can/can-gw.ko".into()),
            ]
        );
    }

    #[test]
    fn merged_order_keeps_dependencies_first_and_each_module_once() {
        let ins = |p: &str| ModuleStep::Insert(p.into());
        let lists = vec![
            vec![ins("can.ko"), ins("can-raw.ko")],
            vec![ins("can.ko"), ins("can-gw.ko")],
            vec![
                ins("virtio_ring.ko"),
                ins("virtio.ko"),
                ins("9pnet.ko"),
                ins("9pnet_virtio.ko"),
            ],
            vec![ins("netfs.ko"), ins("9pnet.ko"), ins("9p.ko")],
        ];
        let merged = merge_orders(lists);
        assert_eq!(
            merged,
            [
                "can.ko",
                "can-raw.ko",
                "can-gw.ko",
                "virtio_ring.ko",
                "virtio.ko",
                "9pnet.ko",
                "9pnet_virtio.ko",
                "netfs.ko",
                "9p.ko"
            ]
            .map(ins)
        );
        let pos = |n: &str| merged.iter().position(|s| *s == ins(n)).unwrap();
        assert!(pos("9pnet.ko") < pos("9p.ko"));
        assert!(pos("virtio.ko") < pos("9pnet_virtio.ko"));
    }

    /// A module tree as `depmod` leaves it, with `can` built in and no loadable modules at all.
    fn fake_kernel(dir: &Path) -> Option<Kernel> {
        let version = "6.1.0-0-test";
        let modules = dir.join("root/lib/modules").join(version);
        fs::create_dir_all(&modules).unwrap();
        fs::write(modules.join("modules.builtin"), "kernel/net/can/can.ko\n").unwrap();
        fs::write(modules.join("modules.order"), "").unwrap();
        fs::write(modules.join("modules.builtin.modinfo"), "").unwrap();
        let depmod = Command::new("depmod")
            .arg("-b")
            .arg(dir.join("root"))
            .arg(version)
            .stderr(std::process::Stdio::null())
            .status();
        // Without kmod on the host there is nothing to exercise.
        depmod.ok().filter(|s| s.success())?;
        Some(Kernel {
            version: version.into(),
            dir: dir.to_path_buf(),
        })
    }

    #[test]
    fn builtin_modules_need_no_file_and_missing_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let Some(kernel) = fake_kernel(dir.path()) else {
            return;
        };
        assert_eq!(
            load_order(&kernel, &["can"]).unwrap(),
            vec![ModuleStep::Builtin("can".into())]
        );
        let err = load_order(&kernel, &["can", "vxcan"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no module vxcan"), "{err}");
    }

    #[test]
    fn kernel_versions_compare_numerically() {
        assert_eq!(
            compare_versions("6.1.0-9-amd64", "6.1.0-56-amd64"),
            std::cmp::Ordering::Less
        );
        assert_eq!(
            compare_versions("6.12.1-amd64", "6.1.0-56-amd64"),
            std::cmp::Ordering::Greater
        );
    }
}
