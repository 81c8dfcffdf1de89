//! The project's test command, `cargo xtask test`: prerequisites, lints, unit tests, then the kernel tests
//! (natively when the host kernel has CAN, in the VM otherwise), ending with a per-stage table and one
//! `summary:` line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::artifacts::{self, TestBinary};
use crate::results::{self, Counts, Stage, Status};
use crate::{prerequisites, process, vm};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run `cargo fmt --check` and clippy.
    pub lint: bool,
    /// Run `cargo test --workspace`.
    pub unit: bool,
    /// Run the kernel tests.
    pub kernel: bool,
    /// A test-name filter handed to every test binary.
    pub filter: Option<String>,
    /// libtest threads for the kernel tests (they share one kernel, so 1 by default).
    pub test_threads: u32,
    /// The VM, when the kernel tests run in one.
    pub vm: vm::Options,
}

/// Where the kernel tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Directly on the host (it has the CAN modules and we are root).
    Native,
    /// In the VM harness.
    Vm,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Vm => "vm",
        }
    }
}

/// Forces the kernel-test mode (`native` or `vm`) instead of probing the host.
const MODE_ENV: &str = "CAN_DRA_KERNEL_TESTS";

/// Runs the suite, prints the report and returns whether everything passed.
pub fn run(options: &Options) -> Result<bool> {
    let root = workspace_root()?;
    let mut stages = Vec::new();

    // Prerequisites first: they decide where the kernel tests run, and may download the VM kernel.
    let mut mode = None;
    if options.kernel {
        let started = Instant::now();
        let (status, note) = match prepare_kernel_tests() {
            Ok((m, why)) => {
                mode = Some(m);
                (
                    Status::Passed,
                    format!("kernel tests: {} ({why})", m.label()),
                )
            }
            Err(err) => {
                eprintln!("error: {err:#}");
                (Status::Failed, format!("{err:#}"))
            }
        };
        stages.push(stage("prerequisites", status, None, started, false, note));
    }

    if options.lint {
        stages.push(lint("fmt", &root, &["fmt", "--all", "--", "--check"]));
        stages.push(import_circles(&root));
        stages.push(lint(
            "clippy",
            &root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ));
    }

    if options.unit {
        stages.push(unit_tests(&root, options.filter.as_deref()));
    } else {
        stages.push(not_run("unit tests", false, "not requested"));
    }

    if options.kernel {
        match mode {
            Some(mode) => stages.push(kernel_tests(&root, mode, options)),
            None => stages.push(Stage {
                status: Status::Failed,
                ..not_run("kernel tests", true, "prerequisites failed")
            }),
        }
    } else {
        stages.push(not_run("kernel tests", true, "not requested"));
    }

    println!();
    print!("{}", results::render(&stages));
    Ok(results::succeeded(&stages))
}

/// `cargo xtask kernel-tests`: prerequisites and the kernel-test stage only, with the same report.
pub fn run_kernel_only(options: &Options) -> Result<bool> {
    run(&Options {
        lint: false,
        unit: false,
        kernel: true,
        ..options.clone()
    })
}

/// The workspace root: this crate lives in `<root>/xtask`.
pub(crate) fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

pub(crate) fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // `cargo run` gives xtask the variables of its own package. Build scripts that watch them (ring's does) would
    // see them change between `cargo xtask ...` and plain cargo builds and rebuild every time.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if CARGO_RUN_VARIABLES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// Variables `cargo run` sets for the binary it runs (by prefix), which a nested cargo must not inherit.
const CARGO_RUN_VARIABLES: &[&str] = &[
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

fn stage(
    name: &str,
    status: Status,
    counts: Option<Counts>,
    started: Instant,
    kernel: bool,
    note: String,
) -> Stage {
    Stage {
        name: name.to_owned(),
        status,
        counts,
        elapsed: started.elapsed(),
        kernel,
        note,
    }
}

fn not_run(name: &str, kernel: bool, why: &str) -> Stage {
    Stage {
        name: name.to_owned(),
        status: Status::NotRun,
        counts: None,
        elapsed: Duration::ZERO,
        kernel,
        note: why.to_owned(),
    }
}

/// Checks the observer tools and the container runtime, decides the mode and, for the VM, fetches the kernel and
/// builds the initramfs.
pub(crate) fn prepare_kernel_tests() -> Result<(Mode, String)> {
    prepare_kernel("kernel tests")
}

/// [`prepare_kernel_tests`] for anything else that needs the CAN kernel (`what` names it in the messages).
pub(crate) fn prepare_kernel(what: &str) -> Result<(Mode, String)> {
    eprintln!("==> checking prerequisites");
    prerequisites::ensure(prerequisites::OBSERVERS)?;
    prerequisites::ensure(prerequisites::CONTAINER_RUNTIME)?;
    let (mode, why) = choose_mode()?;
    eprintln!(
        "==> {what} will run {} ({why})",
        if mode == Mode::Native {
            "natively"
        } else {
            "in the VM"
        }
    );
    if mode == Mode::Vm {
        vm::prepare()?;
    }
    Ok((mode, why))
}

/// `CAN_DRA_KERNEL_TESTS` when set; otherwise native only if we are root and the host kernel passes the probe.
fn choose_mode() -> Result<(Mode, String)> {
    match std::env::var(MODE_ENV).as_deref() {
        Ok("native") => return Ok((Mode::Native, format!("{MODE_ENV}=native"))),
        Ok("vm") => return Ok((Mode::Vm, format!("{MODE_ENV}=vm"))),
        Ok("") | Err(_) => {}
        Ok(other) => bail!("{MODE_ENV}={other} is not one of native, vm"),
    }
    if !nix::unistd::geteuid().is_root() {
        return Ok((Mode::Vm, "not root".to_owned()));
    }
    match probe_host_kernel() {
        Ok(()) => Ok((Mode::Native, "host kernel has vxcan and can-gw".to_owned())),
        Err(err) => Ok((Mode::Vm, format!("host kernel lacks CAN: {err:#}"))),
    }
}

/// Creates a vxcan pair in a throwaway network namespace and checks that can-gw is present or loadable.
fn probe_host_kernel() -> Result<()> {
    let netns = format!("xtask-probe-{}", std::process::id());
    process::run_quiet(Command::new("ip").args(["netns", "add", &netns]))
        .context("cannot create a netns")?;
    let vxcan = process::run_quiet(Command::new("ip").args([
        "-n", &netns, "link", "add", "xtprobe0", "type", "vxcan", "peer", "name", "xtprobe1",
    ]));
    let _ = process::run_quiet(Command::new("ip").args(["netns", "delete", &netns]));
    vxcan.map_err(|_| anyhow::anyhow!("cannot create a vxcan pair"))?;
    let loaded = Path::new("/sys/module/can_gw").exists();
    let loadable = || {
        Command::new("modprobe")
            .args(["-n", "-q", "can-gw"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !loaded && !loadable() {
        bail!("no can-gw module");
    }
    Ok(())
}

/// The import-circle check ([`crate::imports`]), in-process.
fn import_circles(root: &Path) -> Stage {
    eprintln!("==> import circles");
    let started = Instant::now();
    let (status, note) = match crate::imports::check_workspace(root) {
        Ok(()) => (Status::Passed, String::new()),
        Err(err) => {
            eprintln!("error: {err:#}");
            (Status::Failed, format!("{err:#}"))
        }
    };
    stage("imports", status, None, started, false, note)
}

/// A lint command: passes when it exits 0.
fn lint(name: &str, root: &Path, args: &[&str]) -> Stage {
    eprintln!("==> cargo {}", args.join(" "));
    let started = Instant::now();
    let result = cargo().args(args).current_dir(root).status();
    let (status, note) = match result {
        Ok(s) if s.success() => (Status::Passed, String::new()),
        Ok(s) => (
            Status::Failed,
            format!(
                "cargo {} failed (exit code {})",
                args[0],
                s.code().unwrap_or(-1)
            ),
        ),
        Err(err) => (Status::Failed, format!("cannot run cargo: {err}")),
    };
    stage(name, status, None, started, false, note)
}

/// `cargo test --workspace`: unit tests, doctests and the non-kernel integration tests.
fn unit_tests(root: &Path, filter: Option<&str>) -> Stage {
    let started = Instant::now();
    if let Err(err) = prerequisites::ensure(prerequisites::GRPCIO_CLIENT) {
        eprintln!("error: {err:#}");
        return stage(
            "unit tests",
            Status::Failed,
            None,
            started,
            false,
            format!("{err:#}"),
        );
    }
    let mut cmd = cargo();
    // --no-fail-fast: every binary runs, so the counts cover the whole workspace.
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .current_dir(root);
    if let Some(filter) = filter {
        cmd.args(["--", filter]);
    }
    eprintln!("==> {}", process::describe(&cmd));
    let (status, counts, note) = match process::run_tee(&mut cmd) {
        Ok((exit, output)) => {
            let counts = results::parse_output(&output);
            judge(exit.success(), &exit_text(exit), counts)
        }
        Err(err) => (Status::Failed, None, format!("{err:#}")),
    };
    stage("unit tests", status, counts, started, false, note)
}

fn exit_text(status: std::process::ExitStatus) -> String {
    status
        .code()
        .map_or_else(|| status.to_string(), |code| format!("exit code {code}"))
}

/// Turns an exit status and the parsed counts into a stage result.
fn judge(exit_ok: bool, exit: &str, counts: Counts) -> (Status, Option<Counts>, String) {
    if counts.failed > 0 {
        let note = format!(
            "{} test{} failed",
            counts.failed,
            if counts.failed == 1 { "" } else { "s" }
        );
        (Status::Failed, Some(counts), note)
    } else if !exit_ok {
        (
            Status::Failed,
            Some(counts),
            format!("exited with {exit} (build error or crash?)"),
        )
    } else {
        (Status::Passed, Some(counts), String::new())
    }
}

/// Builds the test executables, picks the kernel tests and runs them with `--ignored`.
fn kernel_tests(root: &Path, mode: Mode, options: &Options) -> Stage {
    let name = format!("kernel tests ({})", mode.label());
    let started = Instant::now();
    let binaries = match build_kernel_tests(root) {
        Ok(b) => b,
        Err(err) => {
            eprintln!("error: {err:#}");
            return stage(
                &name,
                Status::Failed,
                None,
                started,
                true,
                format!("{err:#}"),
            );
        }
    };
    if binaries.is_empty() {
        eprintln!(
            "==> no kernel tests found (no `{}*` integration-test targets)",
            artifacts::KERNEL_TEST_PREFIX
        );
        return stage(
            &name,
            Status::Passed,
            Some(Counts::default()),
            started,
            true,
            "no kernel tests found".into(),
        );
    }
    let args = test_args(options);
    let result = match mode {
        Mode::Native => run_native(&binaries, &args),
        Mode::Vm => run_in_vm(&binaries, &args, &options.vm),
    };
    match result {
        Ok((exit_ok, exit, output, extra)) => {
            let (status, counts, mut note) = judge(exit_ok, &exit, results::parse_output(&output));
            if !extra.is_empty() {
                note = if note.is_empty() {
                    extra
                } else {
                    format!("{note}; {extra}")
                };
            }
            stage(&name, status, counts, started, true, note)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            stage(
                &name,
                Status::Failed,
                None,
                started,
                true,
                format!("{err:#}"),
            )
        }
    }
}

/// `cargo test --workspace --no-run --message-format=json-render-diagnostics`, then the `kernel_*` executables.
fn build_kernel_tests(root: &Path) -> Result<Vec<TestBinary>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(root)
    .stdin(std::process::Stdio::null())
    .stderr(std::process::Stdio::inherit());
    eprintln!("==> {}", process::describe(&cmd));
    let out = cmd.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test executables failed ({})", out.status);
    }
    Ok(artifacts::kernel_test_binaries(&String::from_utf8_lossy(
        &out.stdout,
    )))
}

/// The libtest arguments for every kernel-test binary.
fn test_args(options: &Options) -> Vec<String> {
    let color = if std::io::stdout().is_terminal() {
        "always"
    } else {
        "never"
    };
    let mut args = vec![
        "--ignored".to_owned(),
        "--test-threads".to_owned(),
        options.test_threads.to_string(),
        "--color".to_owned(),
        color.to_owned(),
    ];
    if let Some(filter) = &options.filter {
        args.push(filter.clone());
    }
    args
}

/// (all exited 0, exit description, captured stdout, extra note)
type Outcome = (bool, String, String, String);

fn run_native(binaries: &[TestBinary], args: &[String]) -> Result<Outcome> {
    let mut output = String::new();
    let mut failures = Vec::new();
    for binary in binaries {
        eprintln!(
            "     Running {} ({})",
            binary.name,
            binary.executable.display()
        );
        let mut cmd = Command::new(&binary.executable);
        cmd.args(args)
            .current_dir(&binary.crate_dir)
            .env("CARGO_MANIFEST_DIR", &binary.crate_dir);
        let (exit, text) = process::run_tee(&mut cmd)?;
        output.push_str(&text);
        if !exit.success() {
            failures.push(format!("{} failed with {}", binary.name, exit_text(exit)));
        }
    }
    Ok((
        failures.is_empty(),
        failures.join(", "),
        output,
        String::new(),
    ))
}

fn run_in_vm(
    binaries: &[TestBinary],
    args: &[String],
    vm_options: &vm::Options,
) -> Result<Outcome> {
    let script = vm_script(binaries, args);
    let run = vm::run(vm_options, &script)?;
    let boot = run
        .boot_time
        .map(|b| format!("VM boot {:.1}s", b.as_secs_f64()))
        .unwrap_or_default();
    if let Some(b) = run.boot_time {
        eprintln!("==> VM booted in {:.2} s", b.as_secs_f64());
    }
    Ok(match run.outcome {
        vm::Outcome::Exited(code) => (code == 0, format!("exit code {code}"), run.stdout, boot),
        vm::Outcome::TimedOut => (
            false,
            "a timeout".to_owned(),
            run.stdout,
            format!("timed out after {} s", vm_options.timeout.as_secs()),
        ),
    })
}

/// One guest script for all binaries, so the VM boots once.
fn vm_script(binaries: &[TestBinary], args: &[String]) -> String {
    let mut script = String::from("#!/bin/sh\n");
    script.push_str(&vm::environment_exports(&[]));
    script.push_str("failed=0\n");
    let args: Vec<String> = args.iter().map(|a| vm::quote(a)).collect();
    let args = args.join(" ");
    for binary in binaries {
        let dir = vm::quote(&binary.crate_dir.to_string_lossy());
        let exe = vm::quote(&binary.executable.to_string_lossy());
        let name = vm::quote(&binary.name);
        script.push_str(&format!(
            "echo \"     Running \"{name}\" (\"{exe}\")\" >&2\n\
             (cd {dir} && CARGO_MANIFEST_DIR={dir} exec {exe} {args}) || {{ echo \"xtask: \"{name}\" exited with status $?\" >&2; failed=1; }}\n"
        ));
    }
    script.push_str("exit $failed\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_script_runs_every_binary_in_its_crate_and_reports_failure() {
        let dir = tempfile::tempdir().unwrap();
        let crate_dir = dir.path().join("my crate");
        std::fs::create_dir(&crate_dir).unwrap();
        std::fs::write(crate_dir.join("fixture"), "data").unwrap();
        let ok = dir.path().join("ok.sh");
        let bad = dir.path().join("bad.sh");
        // Stand-ins for test executables: they check their working directory, env and arguments.
        std::fs::write(
            &ok,
            "#!/bin/sh\n[ \"$CARGO_MANIFEST_DIR\" = \"$PWD\" ] && cat fixture && echo \" $*\"\n",
        )
        .unwrap();
        std::fs::write(&bad, "#!/bin/sh\nexit 3\n").unwrap();
        for f in [&ok, &bad] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let binary = |name: &str, exe: &Path| TestBinary {
            name: name.into(),
            executable: exe.into(),
            crate_dir: crate_dir.clone(),
        };
        let args = vec!["--ignored".to_owned(), "two words".to_owned()];

        let script = vm_script(&[binary("kernel_ok", &ok)], &args);
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "data --ignored two words\n"
        );

        let script = vm_script(
            &[binary("kernel_bad", &bad), binary("kernel_ok", &ok)],
            &args,
        );
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        // The failing binary does not stop the next one.
        assert!(String::from_utf8(out.stdout).unwrap().contains("data"));
        assert!(
            String::from_utf8(out.stderr)
                .unwrap()
                .contains("kernel_bad exited with status 3")
        );
    }

    #[test]
    fn judging_prefers_test_failures_then_exit_status() {
        let c = |passed, failed| Counts {
            passed,
            failed,
            runs: 1,
            ..Counts::default()
        };
        assert_eq!(judge(true, "0", c(3, 0)).0, Status::Passed);
        assert_eq!(judge(false, "101", c(3, 2)).2, "2 tests failed");
        let (status, _, note) = judge(false, "101", c(0, 0));
        assert_eq!(status, Status::Failed);
        assert!(note.contains("101"));
    }
}
