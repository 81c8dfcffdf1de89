//! `can-dra-cdi-hook`: the OCI `createRuntime` hook that can-dra's CDI specs reference.
//!
//! It reads the OCI state of the new container on stdin and asks the node daemon to attach
//! the claim's CAN member inside the container's network namespace. It fails closed: any
//! problem is a non-zero exit with a message, so the runtime does not start the container
//! without its bus. `--timeout` bounds the whole run, reading stdin included, and the daemon is
//! told the deadline so that it never completes an attach the hook has given up on.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;

use can_dra_kubelet_plugin::hook_socket::{
    self, AttachRequest, HookError, OciState, escape_controls,
};

/// Attach a can-dra bus member to the container described by the OCI state on stdin.
#[derive(Debug, Parser)]
#[command(name = "can-dra-cdi-hook", version, about, long_about = None)]
struct HookArgs {
    /// The claim UID whose device to attach.
    #[arg(long)]
    claim: String,

    /// The device's ResourceSlice pool.
    #[arg(long)]
    pool: String,

    /// The device name in the pool.
    #[arg(long)]
    device: String,

    /// The node daemon's hook socket.
    #[arg(
        long,
        env = "CAN_DRA_HOOK_SOCKET",
        default_value = "/var/lib/kubelet/plugins/can.dra.dev/hook.sock"
    )]
    socket: PathBuf,

    /// Seconds the whole run may take: reading the OCI state and waiting for the daemon.
    #[arg(long, default_value_t = hook_socket::ATTACH_TIMEOUT.as_secs())]
    timeout: u64,
}

/// The OCI state is a few hundred bytes; anything far larger is not an OCI state.
const MAX_STATE: u64 = 1024 * 1024;

fn main() -> ExitCode {
    let args = HookArgs::parse();
    match run(&args) {
        Ok(message) => {
            eprintln!(
                "can-dra: claim {} device {}: {}",
                escape_controls(&args.claim),
                escape_controls(&args.device),
                escape_controls(&message)
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "can-dra: claim {} device {}/{}: {}; refusing to start the container without its CAN bus",
                escape_controls(&args.claim),
                escape_controls(&args.pool),
                escape_controls(&args.device),
                escape_controls(&error.to_string())
            );
            ExitCode::FAILURE
        }
    }
}

fn run(args: &HookArgs) -> Result<String, HookError> {
    let timeout = Duration::from_secs(args.timeout);
    let started = Instant::now();
    let deadline = SystemTime::now() + timeout;
    let state = read_state(timeout)?;
    let state = OciState::parse(&state)?;
    let request = AttachRequest {
        claim_uid: args.claim.clone(),
        pool: args.pool.clone(),
        device: args.device.clone(),
        pid: state.process_id()?,
        container_id: state.id.clone(),
        deadline_unix_ms: Some(hook_socket::unix_ms(deadline)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let left = timeout.saturating_sub(started.elapsed());
    let response = runtime
        .block_on(hook_socket::request_attach(&args.socket, &request, left))
        .map_err(|error| match error {
            // Name the whole budget, not what was left of it.
            HookError::Timeout(_) => HookError::Timeout(timeout),
            other => other,
        })?;
    Ok(response.message)
}

/// Reads the OCI state from stdin, within `timeout`: a runtime writes it and closes stdin, and
/// a stdin that is never closed must not keep the hook (and the container start) waiting.
fn read_state(timeout: Duration) -> Result<Vec<u8>, HookError> {
    let (sender, receiver) = mpsc::channel();
    // The reader is left blocked when the time runs out; the process exits right after.
    std::thread::spawn(move || {
        let mut state = Vec::new();
        let read = std::io::stdin()
            .take(MAX_STATE)
            .read_to_end(&mut state)
            .map(|_| state);
        let _ = sender.send(read);
    });
    match receiver.recv_timeout(timeout) {
        Ok(read) => Ok(read?),
        Err(_) => Err(HookError::InvalidState(format!(
            "stdin was not closed within {timeout:?}; an OCI runtime writes the state and closes it"
        ))),
    }
}
