//! `can-dra-cdi-hook`: the OCI `createRuntime` hook that CDI specs of can-dra reference.
//! It reads the OCI state on stdin and asks the node daemon to attach the claim's CAN
//! member inside the container's network namespace.

use std::path::PathBuf;

use anyhow::bail;
use clap::Parser;

/// Attach a can-dra bus member to the container described by the OCI state on stdin.
#[derive(Debug, Parser)]
#[command(name = "can-dra-cdi-hook", version, about, long_about = None)]
struct HookArgs {
    /// The claim UID whose member to attach.
    #[arg(long)]
    claim: String,

    /// The node daemon's hook socket.
    #[arg(
        long,
        env = "CAN_DRA_HOOK_SOCKET",
        default_value = "/var/lib/kubelet/plugins/can.dra.dev/hook.sock"
    )]
    socket: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = HookArgs::parse();
    // Failing closed: a container must never start silently without its bus.
    bail!(
        "claim {}: attaching through {} is not part of this build yet; refusing to start the container",
        args.claim,
        args.socket.display()
    )
}
