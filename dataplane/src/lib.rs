//! The node data plane of can-dra: everything the driver does to the kernel, over netlink.
//!
//! Responsibilities:
//! - [`netns`]: open network namespaces (by path or pid) and run work inside them.
//! - [`netlink`]: a small synchronous `NETLINK_ROUTE` client and attribute codec.
//! - [`link`]: vxcan member pairs created straight into a pod namespace; discovery and
//!   monitoring of CAN controllers (kind, bitrates, FD, state, kernel driver).
//! - [`gateway`]: can-gw rules (add, delete, dump with counters), built by hand because no
//!   Rust crate speaks `rtcanmsg`.
//! - [`shaping`]: tbf and netem qdiscs that make a virtual link behave like a CAN bus of a
//!   given bitrate, delay, jitter, loss and duplication.
//! - [`access`]: the per-member access policy on a host end (listen-only, transmit allow-list,
//!   receive filters) as tc classifiers.
//! - [`bus`]: shared buses built from members: the desired state, the pure rule plan, the
//!   narrow `Kernel` trait over the modules above, run-time changes and the start-up
//!   reconcile; every link name the driver uses.
//!
//! Feature `fake` makes `bus::fake::FakeKernel` public, an in-memory kernel for other crates'
//! unit tests.
//!
//! The product never runs `ip`, `tc` or `cangw`; tests use them as independent observers.

pub mod access;
pub mod bus;
pub mod gateway;
pub mod link;
pub mod netlink;
pub mod netns;
pub mod shaping;
