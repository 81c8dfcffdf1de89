//! `can-dra-kubelet-plugin`: the can-dra node daemon.

use anyhow::bail;
use clap::Parser;

use can_dra_kubelet_plugin::{cli::PluginArgs, logging};

fn main() -> anyhow::Result<()> {
    let args = PluginArgs::parse();
    logging::init(args.log_format);
    tracing::info!(node = %args.node_name, driver = %args.driver_name, "starting");
    bail!("the DRA gRPC service is not part of this build yet; nothing to serve")
}
