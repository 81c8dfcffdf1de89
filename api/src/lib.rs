//! can-dra's user-facing configuration types, group `can.dra.dev`, version `v1alpha1`.
//!
//! This crate owns the documents users write and their rules:
//! - [`MemberConfig`]: the opaque claim (or device class) parameters saying how a pod joins a CAN bus:
//!   interface name, access, frame format, receive filters, transmit allow-list and shaping.
//!   [`MemberConfig::resolve`] turns it into a [`ResolvedMember`] with every default applied.
//! - [`NodeConfig`]: the kubelet plugin's configuration file: which physical controllers to publish and
//!   which node-local virtual buses to offer.
//! - The value types those documents use ([`Bitrate`], [`Percent`], [`TimeSpan`], [`CanId`],
//!   [`InterfaceName`], [`GlobPattern`]), each with one canonical text form.
//!
//! Parsing is strict: unknown fields and bad values are rejected with a [`ConfigError`] that names the
//! field path and the rule, e.g. `shaping.rx.loss: 120% is above 100%`. The crate does no I/O.
//!
//! ```
//! use can_dra_api::{MemberConfig, API_VERSION};
//! let doc = format!(r#"{{"apiVersion":"{API_VERSION}","kind":"MemberConfig","interfaceName":"bus"}}"#);
//! let member = MemberConfig::from_json_str(&doc)?.resolve(0)?;
//! assert_eq!(member.interface_name.as_str(), "bus");
//! # Ok::<(), can_dra_api::ConfigError>(())
//! ```
#![forbid(unsafe_code)]

mod decode;
mod error;
mod member;
mod node_config;
mod value;

pub use decode::API_VERSION;
pub use error::ConfigError;
pub use member::{
    Access, CanFilter, DirectionConfig, FilterConfig, FrameFormat, MAX_DELAY, MAX_FILTERS,
    MAX_JITTER, MEMBER_CONFIG_KIND, MemberConfig, ResolvedMember, ResolvedShaping, ShapingConfig,
    ShapingDirection,
};
pub use node_config::{
    DEFAULT_SLOTS, GlobPattern, MAX_BUS_NAME_LEN, MAX_SLOTS, NODE_CONFIG_KIND, NodeConfig,
    PhysicalConfig, VirtualBusConfig,
};
pub use value::{
    Bitrate, CanId, InterfaceName, Percent, RESERVED_INTERFACE_PREFIXES, TimeSpan, ValueError,
    is_reserved_interface_name,
};

/// The API group of the project's own types.
pub const API_GROUP: &str = "can.dra.dev";
/// The API version of the project's own types.
pub const API_GROUP_VERSION: &str = "v1alpha1";
