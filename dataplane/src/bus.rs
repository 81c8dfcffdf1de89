//! Shared CAN buses built from members: the integration of links, can-gw rules, access
//! classifiers and shaping into one node data plane.
//!
//! - [`model`]: the desired state (buses and members), plain serialisable data.
//! - [`naming`]: every driver link name (member host ends, tunnel pairs) and which links are the
//!   driver's.
//! - [`plan`]: the mesh of can-gw rules a bus needs; pure logic.
//! - [`kernel`]: the narrow [`Kernel`](kernel::Kernel) trait the bus logic drives.
//! - [`system`]: its implementation over the `link`, `gateway`, `shaping` and `access` modules,
//!   with the one conversion each between the model's types and theirs.
//! - [`manager`]: [`Buses`], which joins and removes members and buses at run time, undoing
//!   partial work on failure, and reads per-member counters.
//! - [`tunnel_pair`]: the vxcan pairs that join a cross-node bus to its tunnel, created,
//!   attached and deleted through [`Buses`] with the same undo on failure.
//! - [`reconcile`]: brings the kernel in line with a desired state after a restart.
//! - `fake` (feature `fake`, and in this crate's tests): an in-memory [`Kernel`](kernel::Kernel)
//!   for unit tests, with a mutation counter and an injectable failure.
//!
//! See `docs/dataplane.md` for the topology and the reasons behind the rule set.

pub mod kernel;
pub mod manager;
pub mod model;
pub mod naming;
pub mod plan;
pub mod reconcile;
pub mod system;
pub mod tunnel_pair;

#[cfg(any(test, feature = "fake"))]
pub mod fake;
#[cfg(test)]
mod tests;

pub use manager::{Buses, MemberCounters};
pub use reconcile::{ReconcileReport, SkippedMember};

use kernel::{KernelError, KernelErrorKind};
use model::CanFilter;

/// Errors of bus and member operations. Input errors are detected before the kernel is
/// touched; kernel errors name the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A bus has an empty name.
    #[error("invalid bus name {name:?}: must not be empty")]
    InvalidBusName {
        /// The name given.
        name: String,
    },
    /// Two buses share a name.
    #[error("bus {bus} is defined twice")]
    DuplicateBus {
        /// The name.
        bus: String,
    },
    /// An operation named a bus that does not exist.
    #[error("bus {bus} does not exist")]
    UnknownBus {
        /// The name.
        bus: String,
    },
    /// A member has an empty id.
    #[error("a member of bus {bus} has an empty id")]
    InvalidMemberId {
        /// The bus.
        bus: String,
    },
    /// An interface name breaks the kernel's rules.
    #[error("invalid interface name {name:?} for {owner}: {reason}")]
    InvalidInterfaceName {
        /// Who asked for it (`member X`, `bus Y`).
        owner: String,
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A member asked for CAN FD on a classic bus.
    #[error("member {member} asks for CAN FD but bus {bus} is classic")]
    FdOnClassicBus {
        /// The bus.
        bus: String,
        /// The member.
        member: String,
    },
    /// A CAN filter is out of range.
    #[error("member {member}: invalid filter {filter:?}: {reason}")]
    InvalidFilter {
        /// The member.
        member: String,
        /// The filter.
        filter: CanFilter,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A member id is used twice on the node.
    #[error("member {id} is defined twice (buses {first} and {second})")]
    DuplicateMember {
        /// The id.
        id: String,
        /// The bus of the first occurrence.
        first: String,
        /// The bus of the second occurrence.
        second: String,
    },
    /// An operation named a member that does not exist.
    #[error("member {id} is not a member of bus {bus}")]
    UnknownMember {
        /// The bus.
        bus: String,
        /// The id.
        id: String,
    },
    /// Two member ids hash to the same host-end name.
    #[error("members {first} and {second} would share the host link name {host}")]
    HostNameCollision {
        /// First member id.
        first: String,
        /// Second member id.
        second: String,
        /// The host-end name.
        host: String,
    },
    /// A host interface is given to two buses (which would join them).
    #[error("interface {interface} is part of two buses, {first} and {second}")]
    InterfaceShared {
        /// The interface.
        interface: String,
        /// First bus.
        first: String,
        /// Second bus.
        second: String,
    },
    /// A physical or tunnel interface does not exist on the host.
    #[error("bus {bus}: interface {interface} not found on the host")]
    UnknownInterface {
        /// The bus.
        bus: String,
        /// The interface.
        interface: String,
    },
    /// A physical or tunnel interface is not a CAN interface.
    #[error("bus {bus}: interface {interface} is a {kind} link, not a CAN interface")]
    NotCan {
        /// The bus.
        bus: String,
        /// The interface.
        interface: String,
        /// Its link kind.
        kind: String,
    },
    /// A member's namespace cannot be opened (the pod is gone).
    #[error("member {member}: network namespace {netns} is gone: {detail}")]
    NamespaceGone {
        /// The member.
        member: String,
        /// The namespace reference.
        netns: String,
        /// The underlying error.
        detail: String,
    },
    /// The interface name is already used in the member's namespace.
    #[error("member {member}: interface {interface} already exists in network namespace {netns}{}",
        other.as_ref().map(|o| format!(" (member {o})")).unwrap_or_default())]
    InterfaceTaken {
        /// The member.
        member: String,
        /// The interface name.
        interface: String,
        /// The namespace.
        netns: String,
        /// The other member using it, if it is one of ours.
        other: Option<String>,
    },
    /// A kernel module the operation needs is not loaded.
    #[error("{operation}: kernel module {module} is missing (modprobe {module})")]
    ModuleMissing {
        /// The operation.
        operation: String,
        /// The module.
        module: &'static str,
    },
    /// The process lacks `CAP_NET_ADMIN`.
    #[error("{operation}: permission denied (CAP_NET_ADMIN needed)")]
    PermissionDenied {
        /// The operation.
        operation: String,
    },
    /// Any other kernel failure.
    #[error(transparent)]
    Kernel(KernelError),
}

impl From<KernelError> for BusError {
    fn from(error: KernelError) -> Self {
        match error.kind {
            KernelErrorKind::ModuleMissing(module) => Self::ModuleMissing {
                operation: error.operation,
                module,
            },
            KernelErrorKind::Permission => Self::PermissionDenied {
                operation: error.operation,
            },
            _ => Self::Kernel(error),
        }
    }
}
