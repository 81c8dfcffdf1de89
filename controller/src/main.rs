//! `can-dra-controller`: the can-dra cluster controller (CanBus resources, cluster-wide
//! ResourceSlices, tunnel membership).

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

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

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CanBus CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    let args = ControllerArgs::parse();
    match args.command {
        Some(Command::Crd) => {
            let yaml =
                can_dra_controller::canbus::crd_yaml().context("cannot render the CanBus CRD")?;
            print!("{yaml}");
            Ok(())
        }
        None => bail!(
            "driver {}: the CanBus reconcile loop is not part of this build yet; \
             `can-dra-controller crd` prints the CRD",
            args.driver_name
        ),
    }
}
