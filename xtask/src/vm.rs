//! The kernel-test VM: Debian's stock kernel under QEMU (TCG by default) booted into the host's own root
//! filesystem, running one shell script as root with the CAN modules loaded.
//!
//! Three serial ports carry the guest's streams over unix sockets: ttyS0 is the kernel console (kept off the
//! user's output, shown on failure or with `--verbose`), ttyS1 the command's stdout and ttyS2 its stderr. The exit
//! status comes back through a small writable 9p share, which also carries the script in and the list of host
//! directories under `/tmp` or `/run` that the guest binds back over its fresh tmpfs (see [`hidden_roots`]).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::initramfs::{
    self, BINDS_FILE, GUEST_RUN_DIR, HOST_ROOT_TAG, READY_MARKER, RUN_TAG, SCRIPT_FILE, STATUS_FILE,
};
use crate::{kernel, prerequisites};

/// How to size and bound the VM.
#[derive(Debug, Clone)]
pub struct Options {
    /// Use KVM instead of TCG (KVM guests hang on the development machines, so only on request).
    pub kvm: bool,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB (the tmpfs overlay root lives in it too).
    pub memory_mib: u32,
    /// Hard limit for the whole run, boot included; QEMU is killed when it passes.
    pub timeout: Duration,
    /// Stream the guest's kernel console to stderr and report the boot time.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kvm: false,
            cpus: 2,
            memory_mib: 3072,
            timeout: Duration::from_secs(60 * 60),
            verbose: false,
        }
    }
}

/// How a guest run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The script ran and exited with this status (128+N for a signal, as the shell reports it).
    Exited(i32),
    /// The hard timeout passed and QEMU was killed.
    TimedOut,
}

/// The result of [`run`].
#[derive(Debug)]
pub struct Run {
    /// How the guest command ended.
    pub outcome: Outcome,
    /// From starting QEMU until the command started, when the guest got that far.
    pub boot_time: Option<Duration>,
    /// Everything the command wrote to stdout (it was also streamed to ours).
    pub stdout: String,
}

/// Environment variables that follow the command into the guest (plus every `CAN_DRA_*`).
const PASSTHROUGH_ENV: &[&str] = &[
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUST_LOG",
    "RUST_TEST_THREADS",
    "RUST_TEST_NOCAPTURE",
    "RUST_MIN_STACK",
    "NO_COLOR",
    "CARGO_TERM_COLOR",
];
const PASSTHROUGH_PREFIX: &str = "CAN_DRA_";
/// Directories every guest `PATH` has, after the host's own entries.
const STANDARD_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
/// How much of the console to keep for error messages.
const CONSOLE_TAIL_LINES: usize = 40;

/// Checks the host tools, then fetches (or reuses) the kernel and initramfs.
pub fn prepare() -> Result<(kernel::Kernel, PathBuf)> {
    prerequisites::ensure(prerequisites::VM)?;
    let cache = kernel::cache_dir()?;
    let kernel = kernel::ensure(&cache)?;
    let initramfs = initramfs::ensure(&kernel)?;
    Ok((kernel, initramfs))
}

/// Boots the VM, runs `script` (a POSIX shell script, run as root in the guest) and returns how it ended.
///
/// The script's stdout is streamed to ours and also returned; its stderr is streamed to ours.
pub fn run(options: &Options, script: &str) -> Result<Run> {
    let (kernel, initramfs) = prepare()?;
    let work = tempfile::Builder::new()
        .prefix("xtask-vm-")
        .tempdir()
        .context("creating a run directory")?;
    let share = work.path().join("share");
    std::fs::create_dir(&share)?;
    std::fs::write(share.join(SCRIPT_FILE), script)?;
    let binds = hidden_roots(&needed_host_paths())?;
    let mut listing: String = binds.iter().map(|p| format!("{}\n", p.display())).collect();
    if listing.is_empty() {
        listing.push('\n');
    }
    std::fs::write(share.join(BINDS_FILE), listing)?;

    let console_sock = work.path().join("console.sock");
    let stdout_sock = work.path().join("stdout.sock");
    let stderr_sock = work.path().join("stderr.sock");
    let (ready_tx, ready_rx) = mpsc::channel();
    let console_tail = Arc::new(Mutex::new(VecDeque::new()));
    let captured = Arc::new(Mutex::new(Vec::new()));
    let verbose = options.verbose;
    let tail = Arc::clone(&console_tail);
    let console = listen(&console_sock, move |stream| {
        watch_console(stream, verbose, &tail, &ready_tx)
    })?;
    let sink = Arc::clone(&captured);
    let stdout = listen(&stdout_sock, move |stream| {
        let all = crate::process::tee(stream, std::io::stdout())?;
        if let Ok(mut sink) = sink.lock() {
            *sink = all;
        }
        Ok(())
    })?;
    let stderr = listen(&stderr_sock, move |stream| {
        crate::process::tee(stream, std::io::stderr()).map(drop)
    })?;

    let mut qemu = qemu_command(
        options,
        &kernel.boot_image(),
        &initramfs,
        &share,
        [&console_sock, &stdout_sock, &stderr_sock],
    );
    if verbose {
        eprintln!("==> {}", crate::process::describe(&qemu));
    }
    eprintln!(
        "==> booting Debian kernel {} under QEMU ({}, {} vCPUs, {} MiB)",
        kernel.version,
        if options.kvm { "KVM" } else { "TCG" },
        options.cpus,
        options.memory_mib
    );
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let finished = wait_with_timeout(&mut child, options.timeout)?;

    // Readers still waiting for QEMU to connect (it failed early) are released by a connection of our own.
    for sock in [&console_sock, &stdout_sock, &stderr_sock] {
        let _ = UnixStream::connect(sock);
    }
    for reader in [console, stdout, stderr] {
        if let Ok(Err(err)) = reader.join() {
            eprintln!("warning: reading guest output: {err:#}");
        }
    }
    let boot_time = ready_rx.try_recv().ok().map(|at: Instant| at - started);
    if let Some(boot) = boot_time.filter(|_| verbose) {
        eprintln!("==> VM booted in {:.2} s", boot.as_secs_f64());
    }
    let stdout = String::from_utf8_lossy(&captured.lock().map(|c| c.clone()).unwrap_or_default())
        .into_owned();
    let tail_text = || {
        let text = console_tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<String>>().join("\n"))
            .unwrap_or_default();
        if text.trim().is_empty() {
            "(nothing: the kernel printed no message; run with --verbose for its boot log)"
                .to_owned()
        } else {
            text
        }
    };

    let Some(qemu_status) = finished else {
        eprintln!(
            "==> VM timed out after {} s; QEMU killed",
            options.timeout.as_secs()
        );
        return Ok(Run {
            outcome: Outcome::TimedOut,
            boot_time,
            stdout,
        });
    };
    match std::fs::read_to_string(share.join(STATUS_FILE)) {
        Ok(text) => {
            let code = text
                .trim()
                .parse()
                .with_context(|| format!("the guest wrote a bad exit status {text:?}"))?;
            Ok(Run {
                outcome: Outcome::Exited(code),
                boot_time,
                stdout,
            })
        }
        Err(_) if boot_time.is_none() => bail!(
            "the VM did not boot (QEMU exited with {qemu_status}); last console lines:\n{}",
            tail_text()
        ),
        Err(_) => bail!(
            "the VM stopped before the command finished (QEMU exited with {qemu_status}); last console lines:\n{}",
            tail_text()
        ),
    }
}

/// The directories the guest mounts a fresh tmpfs on; host files below them are hidden unless bound back.
const GUEST_TMPFS: &[&str] = &["/tmp", "/run"];

/// The host paths a guest command may need: the working directory, this checkout, the target directory (where
/// xtask itself and the test executables live) and the cargo home.
fn needed_host_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    paths.extend(std::env::current_dir().ok());
    paths.extend(std::env::current_exe().ok());
    paths.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for variable in ["CARGO_TARGET_DIR", "CARGO_HOME"] {
        if let Some(value) = std::env::var_os(variable) {
            let path = PathBuf::from(value);
            paths.push(path.canonicalize().unwrap_or(path));
        }
    }
    paths
}

/// Of `paths`, those under a directory the guest hides behind a tmpfs (`/tmp`, `/run`), reduced to the directory
/// right below it (`/tmp/x/target/debug/t` gives `/tmp/x`), each once, sorted. The guest binds the host's copy of
/// each at the same path over its tmpfs, so a checkout or target dir under `/tmp` works. Directories the guest
/// uses itself (`/run/netns`, the run directory) cannot be bound, nor names with a newline.
pub fn hidden_roots(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut roots = Vec::new();
    for path in paths {
        let Some((hidden, rest)) = GUEST_TMPFS.iter().find_map(|dir| {
            path.strip_prefix(dir)
                .ok()
                .map(|rest| (Path::new(dir), rest))
        }) else {
            continue;
        };
        // `/tmp` itself: nothing of it can be shown without hiding the guest's own tmpfs.
        let Some(std::path::Component::Normal(first)) = rest.components().next() else {
            continue;
        };
        let root = hidden.join(first);
        let text = root.to_string_lossy();
        if text.contains('\n') {
            bail!(
                "{} has a newline in its name; the VM cannot show it",
                path.display()
            );
        }
        if root == Path::new("/run/netns") || Path::new(GUEST_RUN_DIR).starts_with(&root) {
            bail!(
                "{} is under {}, which the VM uses itself; move it elsewhere",
                path.display(),
                root.display()
            );
        }
        roots.push(root);
    }
    roots.sort();
    roots.dedup();
    Ok(roots)
}

/// Builds the script that runs `argv` in `cwd` with `env` (plus the passthrough variables, PATH and HOME).
pub fn command_script(cwd: &Path, env: &[(String, String)], argv: &[String]) -> String {
    let mut script = String::from("#!/bin/sh\n");
    script.push_str(&environment_exports(env));
    script.push_str(&format!(
        "cd {} || exit 125\n",
        quote(&cwd.to_string_lossy())
    ));
    let words: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    script.push_str(&format!("exec {}\n", words.join(" ")));
    script
}

/// `export` lines for the guest: a sane PATH and HOME, the passthrough variables from our environment, then
/// `extra` (which wins).
pub fn environment_exports(extra: &[(String, String)]) -> String {
    let host_path = std::env::var("PATH").unwrap_or_default();
    let mut vars = vec![
        ("PATH".to_owned(), guest_path(&host_path)),
        (
            "HOME".to_owned(),
            std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned()),
        ),
    ];
    vars.extend(std::env::vars().filter(|(k, _)| is_passthrough(k)));
    vars.extend(extra.iter().cloned());
    vars.iter()
        .filter(|(k, _)| is_shell_name(k))
        .map(|(k, v)| format!("export {k}={}\n", quote(v)))
        .collect()
}

fn is_passthrough(name: &str) -> bool {
    PASSTHROUGH_ENV.contains(&name) || name.starts_with(PASSTHROUGH_PREFIX)
}

fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The host's PATH with the standard directories appended when absent (root needs the sbin ones).
fn guest_path(host: &str) -> String {
    let mut dirs: Vec<&str> = host.split(':').filter(|d| !d.is_empty()).collect();
    for dir in STANDARD_PATH {
        if !dirs.contains(dir) {
            dirs.push(dir);
        }
    }
    dirs.join(":")
}

/// Quotes `word` for a POSIX shell.
pub fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn qemu_command(
    options: &Options,
    image: &Path,
    initramfs: &Path,
    share: &Path,
    socks: [&PathBuf; 3],
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    if options.kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    cmd.args([
        "-smp",
        &options.cpus.to_string(),
        "-m",
        &options.memory_mib.to_string(),
    ]);
    cmd.arg("-kernel").arg(image).arg("-initrd").arg(initramfs);
    // The console is a separate port, but printk on an emulated UART is slow: keep the kernel quiet unless asked.
    // The crypto self-tests cost about a second of emulated CPU at every boot and test nothing of ours.
    let loglevel = if options.verbose {
        "loglevel=4"
    } else {
        "quiet loglevel=0"
    };
    cmd.args([
        "-append",
        &format!(
            "console=ttyS0 {loglevel} panic=-1 rdinit=/init random.trust_cpu=on cryptomgr.notests"
        ),
    ]);
    for (i, sock) in socks.iter().enumerate() {
        cmd.arg("-chardev")
            .arg(format!("socket,id=ser{i},path={}", sock.display()));
        cmd.args(["-serial", &format!("chardev:ser{i}")]);
    }
    cmd.args([
        "-virtfs",
        &format!(
            "local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
        ),
    ]);
    cmd.arg("-virtfs").arg(format!(
        "local,path={},mount_tag={RUN_TAG},security_model=none,multidevs=remap",
        share.display()
    ));
    cmd.stdin(Stdio::null());
    cmd
}

/// Listens on `path` and hands the first connection to `read` on its own thread.
fn listen<F>(path: &Path, read: F) -> Result<JoinHandle<Result<()>>>
where
    F: FnOnce(UnixStream) -> std::io::Result<()> + Send + 'static,
{
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    Ok(thread::spawn(move || {
        let (stream, _) = listener.accept()?;
        drop(listener);
        read(stream)?;
        Ok(())
    }))
}

/// Reads the kernel console: keeps its tail for error messages, echoes it in verbose mode, and reports when the
/// ready marker arrives.
fn watch_console(
    mut stream: UnixStream,
    verbose: bool,
    tail: &Mutex<VecDeque<String>>,
    ready: &mpsc::Sender<Instant>,
) -> std::io::Result<()> {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if verbose {
            let mut err = std::io::stderr();
            let _ = err.write_all(&buf[..n]).and_then(|()| err.flush());
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            if line.contains(READY_MARKER) {
                let _ = ready.send(Instant::now());
            }
            if let Ok(mut tail) = tail.lock() {
                tail.push_back(line);
                if tail.len() > CONSOLE_TAIL_LINES {
                    tail.pop_front();
                }
            }
        }
    }
    if !pending.is_empty()
        && let Ok(mut tail) = tail.lock()
    {
        tail.push_back(String::from_utf8_lossy(&pending).into_owned());
    }
    Ok(())
}

/// Waits for QEMU; `None` means the timeout passed and it was killed.
fn wait_with_timeout(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_a_real_shell() {
        let words = [
            "plain",
            "two words",
            "it's",
            "$HOME",
            "a\"b",
            "",
            "x;y",
            "tab\there",
        ];
        let script = format!("printf '%s\\n' {}", words.map(quote).join(" "));
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        let printed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(printed.lines().collect::<Vec<_>>(), words);
    }

    #[test]
    fn command_script_runs_the_command_in_the_directory_with_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let script = command_script(
            dir.path(),
            &[("XTASK_TEST_VALUE".into(), "a b'c".into())],
            &[
                "sh".into(),
                "-c".into(),
                "pwd; echo \"$XTASK_TEST_VALUE\"; exit 7".into(),
            ],
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(7));
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines, [dir.path().to_str().unwrap(), "a b'c"]);
    }

    #[test]
    fn guest_path_keeps_host_entries_first_and_adds_sbin() {
        assert_eq!(
            guest_path("/root/.cargo/bin:/usr/bin:/bin"),
            "/root/.cargo/bin:/usr/bin:/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/sbin"
        );
    }

    #[test]
    fn paths_under_the_guest_tmpfs_are_bound_by_their_top_directory() {
        let paths: Vec<PathBuf> = [
            "/tmp/x/target/debug/deps/kernel_attach-0123",
            "/tmp/x",
            "/tmp/y/target",
            "/run/user/1000/checkout",
            "/home/me/can-dra",
            "/tmp",
            "/tmpfoo/bar",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(
            hidden_roots(&paths).unwrap(),
            [
                PathBuf::from("/run/user"),
                PathBuf::from("/tmp/x"),
                PathBuf::from("/tmp/y")
            ]
        );
        assert!(
            hidden_roots(&[PathBuf::from("/home/me")])
                .unwrap()
                .is_empty()
        );
        for reserved in ["/run/netns/x", "/run/xtask/y"] {
            let error = hidden_roots(&[PathBuf::from(reserved)]).unwrap_err();
            assert!(error.to_string().contains("uses itself"), "{error}");
        }
        assert!(hidden_roots(&[PathBuf::from("/tmp/a\nb/c")]).is_err());
    }

    #[test]
    fn only_named_variables_pass_through() {
        assert!(is_passthrough("RUST_LOG"));
        assert!(is_passthrough("CAN_DRA_KERNEL_TESTS"));
        assert!(!is_passthrough("SSH_AUTH_SOCK"));
        assert!(!is_shell_name("BAD-NAME"));
        assert!(is_shell_name("_OK1"));
    }
}
