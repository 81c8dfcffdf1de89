//! Device attribute names both binaries publish, unqualified, so they live in the driver's domain
//! (`device.attributes["can.dra.dev"].bitrate` in CEL).

/// `physical` or `virtual` ([`PHYSICAL`], [`VIRTUAL`]).
pub const TYPE: &str = "type";
/// The bus the slot joins: the interface name for a physical controller, the bus name for a
/// virtual bus.
pub const BUS: &str = "bus";
/// The host interface of a physical controller.
pub const INTERFACE: &str = "interface";
/// Nominal bitrate in bit/s.
pub const BITRATE: &str = "bitrate";
/// FD data-phase bitrate in bit/s.
pub const DATA_BITRATE: &str = "dataBitrate";
/// Whether the bus carries CAN FD frames.
pub const FD: &str = "fd";
/// The kernel driver of a physical controller (`gs_usb`, `mcp251xfd`, ...).
pub const CONTROLLER: &str = "controller";
/// The CAN controller state of a physical controller (`error-active`, `bus-off`, ...).
pub const STATE: &str = "state";
/// The slot index `k` of `<bus>-m<k>`.
pub const SLOT: &str = "slot";

/// The [`TYPE`] of a physical controller's slot.
pub const PHYSICAL: &str = "physical";
/// The [`TYPE`] of a virtual bus's slot (node-local or cluster-wide).
pub const VIRTUAL: &str = "virtual";
