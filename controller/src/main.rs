//! `can-dra-controller`: the can-dra cluster controller (CanBus resources, cluster-wide
//! ResourceSlices, tunnel membership).

use anyhow::bail;
use clap::Parser;

/// The can-dra cluster controller.
#[derive(Debug, Parser)]
#[command(name = "can-dra-controller", version, about, long_about = None)]
struct ControllerArgs {
    /// Path to a kubeconfig file; the in-cluster configuration is used when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,

    /// The DRA driver name.
    #[arg(long, env = "CAN_DRA_DRIVER_NAME", default_value = "can.dra.dev")]
    driver_name: String,
}

fn main() -> anyhow::Result<()> {
    let args = ControllerArgs::parse();
    bail!(
        "driver {}: the CanBus controller is not part of this build yet",
        args.driver_name
    )
}
