//! Generates the Rust bindings for the kubelet wire contracts in `protos/`.
//!
//! `protox` parses the `.proto` files in pure Rust, so building needs no system `protoc`.

use std::error::Error;

/// Proto files compiled into the crate, relative to the `protos/` include root.
const PROTOS: &[&str] = &[
    "dra/v1/api.proto",
    "dra/v1beta1/api.proto",
    "pluginregistration/v1/api.proto",
    "dra-health/v1alpha1/api.proto",
    "dra-health/v1/api.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=protos");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=protos/{proto}");
    }

    let fds = protox::compile(PROTOS, ["protos"])?;
    // Clients serve the tests and the project's test kubelet; servers serve the plugin.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
