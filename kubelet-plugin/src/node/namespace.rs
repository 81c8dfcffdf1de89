//! Where a container lives: the network namespace of a pid, behind a narrow seam so that attach
//! and recovery run in unit tests without processes ([`NamespaceOpener`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use can_dra_dataplane::netns::{Netns, NetnsError, NetnsId};

/// Opens the network namespace of a process.
pub trait NamespaceOpener: Send + Sync + 'static {
    /// The identity of the network namespace `pid` lives in; fails when the process is gone.
    fn netns_of(&self, pid: u32) -> Result<NetnsId, NetnsError>;

    /// The node's own network namespaces: the daemon's (where its member host ends and tunnel
    /// links live) and that of the host's init process. A pod end there would sit among the
    /// node's links, where it could be taken for a controller or deleted as an orphan.
    fn node_namespaces(&self) -> Vec<NetnsId> {
        [std::process::id(), 1]
            .into_iter()
            .filter_map(|pid| self.netns_of(pid).ok())
            .collect()
    }
}

/// The host's processes, through `/proc/<pid>/ns/net`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemNamespaces;

impl NamespaceOpener for SystemNamespaces {
    fn netns_of(&self, pid: u32) -> Result<NetnsId, NetnsError> {
        Netns::from_pid(pid).map(|netns| netns.id())
    }
}

/// Processes of a test: each pid lives in the namespace it was given; any other pid is gone.
/// Clones share the table, so a test can end a process while the driver holds the opener.
#[derive(Debug, Clone, Default)]
pub struct FakeNamespaces {
    pids: Arc<Mutex<BTreeMap<u32, NetnsId>>>,
    node: Vec<NetnsId>,
}

impl FakeNamespaces {
    /// No processes; the node's own namespaces are `node`.
    pub fn new(node: Vec<NetnsId>) -> Self {
        Self {
            pids: Arc::default(),
            node,
        }
    }

    /// Process `pid` lives in `netns` from now on.
    pub fn set(&self, pid: u32, netns: NetnsId) {
        self.table().insert(pid, netns);
    }

    /// Process `pid` exits.
    pub fn remove(&self, pid: u32) {
        self.table().remove(&pid);
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, NetnsId>> {
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl NamespaceOpener for FakeNamespaces {
    fn netns_of(&self, pid: u32) -> Result<NetnsId, NetnsError> {
        self.table()
            .get(&pid)
            .copied()
            .ok_or_else(|| NetnsError::Open {
                path: format!("/proc/{pid}/ns/net").into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
    }

    fn node_namespaces(&self) -> Vec<NetnsId> {
        self.node.clone()
    }
}
