//! Test support for can-dra's kernel tests, and the node daemon launcher the demo shares with
//! the tests.
//!
//! It owns the fixtures and the independent observers those tests rely on:
//! - [`namespace`]: throw-away network namespaces ([`TestNetns`]) removed on drop, and a way to
//!   run commands inside them.
//! - [`candump`]: capture frames with `candump -L` and parse them; send with `cansend`.
//! - [`observe`]: what iproute2 and can-utils report (`ip -d -j link`, `cangw -L`, `tc -s -j`),
//!   parsed into small structs.
//! - [`daemon`]: the node daemon binary as a child process with its directories and log, for
//!   the demo and the tests that run it.
//! - [`podman`]: podman + crun with private storage and configuration, as a real CDI consumer,
//!   and its containers as places to run the observers.
//!
//! Everything here shells out on purpose: the product speaks netlink itself, and its tests
//! check the result with tools that share no code with it. This crate does not depend on the
//! dataplane crate (which dev-depends on it); tests open a namespace from [`TestNetns::path`].
//!
//! Other test topics may add helpers in a file of their own plus one `pub mod` line here.

pub mod candump;
pub mod command;
pub mod daemon;
pub mod namespace;
pub mod observe;
pub mod podman;

pub use candump::{Candump, CapturedFrame, cansend};
pub use command::{TestkitError, run};
pub use namespace::{Host, Namespace, Resident, TestNetns, exited_pid};
pub use observe::{
    IpLink, add_vcan, cangw_rules, cangw_rules_uncounted, link_in, links_in, tc_qdiscs,
};
pub use podman::{Container, Podman};
