//! Checks that the generated bindings speak the kubelet's wire format and method paths.

mod paths;
mod wire;
