//! The node's one handle on the data plane: the only writer of the desired bus state.
//!
//! Members (attach, unprepare, the start-up reconcile) and tunnel pairs (the tunnel loop) change
//! the node's [`Buses`] through a [`DataPlane`]; its clones share one. The kernel is opened on
//! first use, so prepare and unprepare of claims that were never attached need no kernel. The
//! daemon runs over [`SystemKernel`]; unit tests give a
//! [`FakeKernel`](can_dra_dataplane::bus::fake::FakeKernel) through [`DataPlane::lazy`].
//!
//! The work runs on a blocking thread: netlink calls are synchronous.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use can_dra_dataplane::bus::kernel::{Kernel, KernelError};
use can_dra_dataplane::bus::model::{BusSpec, DesiredState};
use can_dra_dataplane::bus::system::SystemKernel;
use can_dra_dataplane::bus::{BusError, Buses, ReconcileReport};

/// Errors of the data plane handle.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// The kernel handle cannot be opened.
    #[error("opening the data plane: {0}")]
    Open(KernelError),
    /// A bus or kernel operation failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The blocking task failed, or the lock is poisoned.
    #[error("the data plane task failed: {0}")]
    Task(String),
}

impl From<KernelError> for PlaneError {
    fn from(error: KernelError) -> Self {
        Self::Bus(error.into())
    }
}

type Opener<K> = Box<dyn Fn() -> Result<K, KernelError> + Send + Sync>;

struct Shared<K: Kernel> {
    buses: Mutex<Option<Buses<K>>>,
    open: Opener<K>,
}

/// The node's buses, shared by every clone; see the [module docs](self).
pub struct DataPlane<K: Kernel = SystemKernel> {
    shared: Arc<Shared<K>>,
}

impl<K: Kernel> Clone for DataPlane<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Kernel> std::fmt::Debug for DataPlane<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("open", &self.is_open())
            .finish_non_exhaustive()
    }
}

impl<K: Kernel> DataPlane<K> {
    /// Whether the kernel handle is open.
    pub fn is_open(&self) -> bool {
        self.shared
            .buses
            .lock()
            .map(|b| b.is_some())
            .unwrap_or(false)
    }
}

impl DataPlane<SystemKernel> {
    /// The host's kernel, opened on first use (in the daemon's network namespace).
    pub fn system() -> Self {
        Self::lazy(SystemKernel::open)
    }
}

impl<K: Kernel + Send + 'static> DataPlane<K> {
    /// A data plane whose kernel `open` makes on first use.
    pub fn lazy(open: impl Fn() -> Result<K, KernelError> + Send + Sync + 'static) -> Self {
        Self {
            shared: Arc::new(Shared {
                buses: Mutex::new(None),
                open: Box::new(open),
            }),
        }
    }

    /// Runs `work` on the buses (opening the kernel first if needed) on a blocking thread.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<PlaneError> + Send + 'static,
        F: FnOnce(&mut Buses<K>) -> Result<T, E> + Send + 'static,
    {
        let shared = self.shared.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut guard = shared
                .buses
                .lock()
                .map_err(|_| PlaneError::Task("the data plane lock is poisoned".into()))?;
            let buses = match guard.as_mut() {
                Some(buses) => buses,
                None => guard.insert(Buses::new((shared.open)().map_err(PlaneError::Open)?)),
            };
            work(buses)
        });
        match task.await {
            Ok(result) => result,
            Err(error) => Err(PlaneError::Task(error.to_string()).into()),
        }
    }

    /// Reconciles the kernel with `desired`; members the reconcile had to skip are removed from
    /// the buses again, so a later hook call joins them afresh.
    ///
    /// The buses named in `adopt` are cross-node meshes, whose external interfaces (tunnel pair
    /// and physical controller) only the tunnel loop knows, later: each keeps those its
    /// members are meshed with in the kernel now ([`Buses::adopt_externals`]), so that the reconcile
    /// does not cut the members off the other nodes until the next tunnel pass.
    pub async fn reconcile(
        &self,
        mut desired: DesiredState,
        adopt: BTreeSet<String>,
    ) -> Result<ReconcileReport, PlaneError> {
        self.run(move |buses| {
            buses.adopt_externals(&mut desired, &adopt)?;
            let report = buses.reconcile(desired)?;
            for skipped in &report.skipped {
                if let Err(error) = buses.leave(&skipped.bus, &skipped.member) {
                    tracing::warn!(member = %skipped.member, %error, "forgetting a skipped member failed");
                }
            }
            Ok(report)
        })
        .await
    }

    /// Takes member `id` off `bus`, if it is on it.
    pub async fn leave(&self, bus: &str, id: &str) -> Result<(), PlaneError> {
        let (bus, id) = (bus.to_owned(), id.to_owned());
        self.run(move |buses| {
            let joined = buses
                .state()
                .bus(&bus)
                .is_some_and(|b| b.member(&id).is_some());
            if joined {
                buses.leave(&bus, &id)?;
            }
            Ok(())
        })
        .await
    }

    /// The tunnel pair ends on the host ([`Buses::tunnel_links`]).
    pub async fn tunnel_links(&self) -> Result<Vec<String>, PlaneError> {
        self.run(|buses| Ok(buses.tunnel_links()?)).await
    }

    /// Deletes the leftover tunnel link `name` and its pair, taking it out of a mesh that
    /// still has it ([`Buses::delete_tunnel_link`]).
    pub async fn delete_host_link(&self, name: &str) -> Result<(), PlaneError> {
        let name = name.to_owned();
        self.run(move |buses| Ok(buses.delete_tunnel_link(&name)?))
            .await
    }

    /// Makes sure the tunnel pair `mesh.tunnel` / `tunnel_link` exists and is an external
    /// interface of the mesh ([`Buses::attach_tunnel`]).
    pub async fn attach_tunnel(&self, mesh: BusSpec, tunnel_link: &str) -> Result<(), PlaneError> {
        let tunnel_link = tunnel_link.to_owned();
        self.run(move |buses| Ok(buses.attach_tunnel(mesh, &tunnel_link)?))
            .await
    }

    /// Takes the tunnel pair out of mesh `mesh` and deletes both ends
    /// ([`Buses::detach_tunnel`]).
    pub async fn detach_tunnel(&self, mesh: &str, links: [&str; 2]) -> Result<(), PlaneError> {
        let mesh = mesh.to_owned();
        let links = links.map(str::to_owned);
        self.run(move |buses| Ok(buses.detach_tunnel(&mesh, [&links[0], &links[1]])?))
            .await
    }
}
