//! can-dra's task runner (`cargo xtask ...`).
//!
//! It owns the project's test command (`cargo xtask test`: lints, unit tests, then the kernel tests natively or
//! in a VM) and the VM harness that runs commands under Debian's stock kernel with the CAN modules loaded
//! (`cargo xtask vm -- CMD`), and the README's main command (`cargo xtask demo`). See `docs/testing.md`.

mod artifacts;
mod cpio;
mod demo;
mod imports;
mod initramfs;
mod kernel;
mod prerequisites;
mod process;
mod results;
mod suite;
mod vm;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "can-dra's task runner")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run a command as root in a VM (Debian kernel, CAN modules loaded, host root filesystem), exiting with its
    /// status.
    Vm(VmArgs),
    /// The project's test command: lints, unit tests, then the kernel tests (natively when the host kernel has
    /// CAN, else in the VM), ending with a `summary:` line.
    Test(TestArgs),
    /// Only the kernel tests (`kernel_*` integration-test targets, run with `--ignored`).
    KernelTests(KernelTestArgs),
    /// The README's main command: the local demo (pods sharing a CAN bus) on the real kernel, natively when the
    /// host kernel has CAN, else in the VM.
    Demo(VmFlags),
    /// Check that no crate has an import circle between its modules (also a lint stage of `test`).
    Imports,
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Only the kernel tests (with their prerequisites).
    #[arg(long, conflicts_with = "unit_only")]
    kernel_only: bool,
    /// Lints and unit tests, no kernel tests.
    #[arg(long)]
    unit_only: bool,
    #[command(flatten)]
    kernel: KernelTestArgs,
}

#[derive(Debug, clap::Args)]
struct KernelTestArgs {
    /// libtest threads for the kernel tests.
    #[arg(long, default_value_t = 1)]
    test_threads: u32,
    #[command(flatten)]
    vm: VmFlags,
    /// Only tests whose name contains this (passed to every test binary).
    filter: Option<String>,
}

impl KernelTestArgs {
    fn options(&self, lint: bool, unit: bool, kernel: bool) -> suite::Options {
        suite::Options {
            lint,
            unit,
            kernel,
            filter: self.filter.clone(),
            test_threads: self.test_threads,
            vm: self.vm.options(),
        }
    }
}

#[derive(Debug, clap::Args)]
struct VmFlags {
    /// Use KVM instead of TCG (KVM guests hang on some hosts).
    #[arg(long)]
    kvm: bool,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 3072)]
    memory: u32,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Show the guest kernel console and the boot time.
    #[arg(long, short)]
    verbose: bool,
}

impl VmFlags {
    fn options(&self) -> vm::Options {
        vm::Options {
            kvm: self.kvm,
            cpus: self.cpus,
            memory_mib: self.memory,
            timeout: Duration::from_secs(self.timeout),
            verbose: self.verbose,
        }
    }
}

#[derive(Debug, clap::Args)]
struct VmArgs {
    #[command(flatten)]
    flags: VmFlags,
    /// Extra environment for the command (`KEY=VALUE`, or `KEY` to copy it from here).
    #[arg(long = "env", short = 'e', value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Vm(args) => run_vm(&args),
        Task::Test(args) => {
            let options = args.kernel.options(
                !args.no_lint && !args.kernel_only,
                !args.kernel_only,
                !args.unit_only,
            );
            suite::run(&options).map(exit_code)
        }
        Task::Demo(flags) => demo::run(&flags.options()).map(exit_code),
        Task::Imports => suite::workspace_root()
            .and_then(|root| imports::check_workspace(&root))
            .map(|()| 0),
        Task::KernelTests(args) => {
            suite::run_kernel_only(&args.options(false, false, true)).map(exit_code)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}

fn exit_code(success: bool) -> i32 {
    if success { 0 } else { 1 }
}

/// `cargo xtask vm`: returns the command's exit status (124 on timeout, like `timeout(1)`).
fn run_vm(args: &VmArgs) -> Result<i32> {
    let cwd = std::env::current_dir().context("reading the working directory")?;
    let env = args
        .env
        .iter()
        .map(|spec| match spec.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (spec.clone(), std::env::var(spec).unwrap_or_default()),
        })
        .collect::<Vec<_>>();
    let script = vm::command_script(&cwd, &env, &args.command);
    let run = vm::run(&args.flags.options(), &script)?;
    Ok(match run.outcome {
        vm::Outcome::Exited(code) => code,
        vm::Outcome::TimedOut => 124,
    })
}
