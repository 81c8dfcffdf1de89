//! Command-line flags of `can-dra-kubelet-plugin`; every flag can also be set through an
//! environment variable, as DaemonSets usually do.

use std::path::PathBuf;

use clap::Parser;

use crate::DEFAULT_DRIVER_NAME;
use crate::logging::LogFormat;

/// The can-dra kubelet plugin: publishes this node's CAN buses as DRA devices and joins pods
/// to them.
#[derive(Debug, Clone, Parser)]
#[command(name = "can-dra-kubelet-plugin", version, about, long_about = None)]
pub struct PluginArgs {
    /// Name of the node this daemon runs on (the ResourceSlice pool name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Path to a kubeconfig file; the in-cluster configuration is used when absent.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// The DRA driver name; the CDI kind and API group derive from it.
    #[arg(long, env = "CAN_DRA_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,

    /// Directory the kubelet watches for plugin registration sockets.
    #[arg(
        long,
        env = "CAN_DRA_KUBELET_REGISTRAR_DIR",
        default_value = "/var/lib/kubelet/plugins_registry"
    )]
    pub kubelet_registrar_dir: PathBuf,

    /// Directory holding per-plugin data (the DRA socket, the checkpoint).
    #[arg(
        long,
        env = "CAN_DRA_KUBELET_PLUGINS_DIR",
        default_value = "/var/lib/kubelet/plugins"
    )]
    pub kubelet_plugins_dir: PathBuf,

    /// Directory where per-claim CDI specs are written for the container runtime.
    #[arg(long, env = "CAN_DRA_CDI_DIR", default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,

    /// The node configuration file (which physical interfaces to publish, node-local virtual buses).
    #[arg(long, env = "CAN_DRA_CONFIG")]
    pub config: Option<PathBuf>,

    /// Where the CDI hook binary is installed on the host (referenced from the CDI specs).
    #[arg(
        long,
        env = "CAN_DRA_HOOK_PATH",
        default_value = "/opt/can-dra/bin/can-dra-cdi-hook"
    )]
    pub hook_path: PathBuf,

    /// This plugin pod's UID; turns on rolling-update socket names so two instances can run
    /// side by side during a DaemonSet update.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,

    /// Check a running daemon instead of starting one: GetInfo on the registration socket, then
    /// an empty NodePrepareResources on the endpoint it names. Exits 0 when both answer.
    #[arg(long)]
    pub health_probe: bool,

    /// The address this node's tunnel endpoints listen on (one UDP port per cluster-wide bus,
    /// from the CanBus status); no tunnel runs and nothing listens when absent.
    #[arg(long, env = "CAN_DRA_TUNNEL_ADDRESS")]
    pub tunnel_address: Option<std::net::IpAddr>,

    /// How often CanBuses are read again to follow tunnel membership, such as `5s` or `500ms`.
    #[arg(long, env = "CAN_DRA_TUNNEL_RESYNC", default_value = "5s", value_parser = parse_duration)]
    pub tunnel_resync: std::time::Duration,

    /// Log format.
    #[arg(long, env = "CAN_DRA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `<number>ms` or `<number>s`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (digits, unit): (&str, fn(u64) -> std::time::Duration) =
        if let Some(ms) = text.strip_suffix("ms") {
            (ms, std::time::Duration::from_millis)
        } else if let Some(s) = text.strip_suffix('s') {
            (s, std::time::Duration::from_secs)
        } else {
            return Err(format!(
                "{text:?}: expected a number with ms or s, such as 5s"
            ));
        };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with ms or s, such as 5s"))?;
    if value == 0 {
        return Err(format!("{text:?}: must be more than zero"));
    }
    Ok(unit(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        PluginArgs::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_kubelet_conventions() {
        let args =
            PluginArgs::try_parse_from(["can-dra-kubelet-plugin", "--node-name", "n1"]).unwrap();
        assert_eq!(args.driver_name, "can.dra.dev");
        assert_eq!(
            args.kubelet_registrar_dir,
            PathBuf::from("/var/lib/kubelet/plugins_registry")
        );
        assert_eq!(
            args.kubelet_plugins_dir,
            PathBuf::from("/var/lib/kubelet/plugins")
        );
        assert_eq!(args.cdi_dir, PathBuf::from("/var/run/cdi"));
    }

    #[test]
    fn the_tunnel_is_off_unless_an_address_is_given() {
        let base = ["can-dra-kubelet-plugin", "--node-name", "n1"];
        let args = PluginArgs::try_parse_from(base).unwrap();
        assert_eq!(args.tunnel_address, None);
        assert_eq!(args.tunnel_resync, std::time::Duration::from_secs(5));
        let args = PluginArgs::try_parse_from(base.iter().copied().chain([
            "--tunnel-address",
            "192.0.2.7",
            "--tunnel-resync",
            "250ms",
        ]))
        .unwrap();
        assert_eq!(args.tunnel_address, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(args.tunnel_resync, std::time::Duration::from_millis(250));
        for bad in ["0s", "5", "fast", "1.5s"] {
            let error =
                PluginArgs::try_parse_from(base.iter().copied().chain(["--tunnel-resync", bad]))
                    .unwrap_err();
            assert!(error.to_string().contains("tunnel-resync"), "{error}");
        }
        let error =
            PluginArgs::try_parse_from(base.iter().copied().chain(["--tunnel-address", "node-a"]))
                .unwrap_err();
        assert!(error.to_string().contains("tunnel-address"), "{error}");
    }

    #[test]
    fn node_name_is_required() {
        let error = PluginArgs::try_parse_from(["can-dra-kubelet-plugin"]).unwrap_err();
        assert!(error.to_string().contains("--node-name"), "{error}");
    }
}
