//! Attach and recovery over the fake kernel and fake namespaces: what a pod sees (one member,
//! in its namespace, or a clear refusal) and what the kernel keeps across a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Mutex;

use can_dra_dataplane::bus::fake::FakeKernel;
use can_dra_dataplane::bus::kernel::{KernelError, KernelErrorKind, LinkKind};
use can_dra_dataplane::bus::model::{BusSpec, NetnsRef};
use can_dra_dataplane::netns::NetnsId;

use super::*;
use crate::inventory::VirtualBus;

const NODE: &str = "node-a";
const SHARED: &str = "canbus/x";

struct Rig {
    root: tempfile::TempDir,
    namespaces: FakeNamespaces,
}

/// A daemon's data directory with one claim `uid-1` prepared: a member `can0` of slot `body-m0`
/// of the virtual bus `body`, or of the cross-node bus `canbus/x` when `shared`; attached to
/// `attached` when given.
fn rig(shared: bool, attached: Option<Attachment>) -> Rig {
    let root = tempfile::tempdir().unwrap();
    let (pool, device, bus, shared_fd) = if shared {
        (SHARED, "m0", SHARED, Some(false))
    } else {
        (NODE, "body-m0", "body", None)
    };
    let mut state = NodeState::default();
    state.claims.insert(
        "uid-1".into(),
        PreparedClaim {
            namespace: "ns".into(),
            name: "c".into(),
            devices: vec![PreparedMember {
                request: "can".into(),
                pool: pool.into(),
                device: device.into(),
                share_id: None,
                bus: bus.into(),
                member: MemberParams::new("can0"),
                shared_fd,
                cdi_device_id: "k8s.can.dra.dev/can=uid-1-can".into(),
                attachment: attached,
            }],
            status_pending: false,
            status_written_unsaved: false,
        },
    );
    CheckpointStore::new(root.path().join("checkpoint.json"))
        .save(&state)
        .unwrap();
    Rig {
        root,
        namespaces: FakeNamespaces::new(vec![NODE_NETNS]),
    }
}

/// The daemon's own namespace in the fake.
const NODE_NETNS: NetnsId = NetnsId { dev: 4, ino: 1 };

impl Rig {
    /// A daemon over `kernel` (handed out once, when the data plane opens).
    fn driver(&self, kernel: FakeKernel) -> NodeDriver<FakeKernel, FakeNamespaces> {
        let kernel = Mutex::new(Some(kernel));
        let plane = DataPlane::lazy(move || {
            kernel
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| KernelError::new("open", KernelErrorKind::Other, "opened twice"))
        });
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let parts = NodeParts {
            driver: "can.dra.dev".into(),
            node: NODE.into(),
            inventory: Inventory {
                physical: Vec::new(),
                virtual_buses: vec![VirtualBus {
                    name: "body".into(),
                    bitrate: can_dra_api::Bitrate::from_bits_per_second(500_000).unwrap(),
                    fd: false,
                    data_bitrate: None,
                    slots: 2,
                }],
            },
            claims: ClaimReader::new(client.clone(), "can.dra.dev"),
            status: StatusWriter::new(client, "can.dra.dev"),
            cdi: CdiWriter::new(self.root.path().join("cdi"), "can.dra.dev", "/hook"),
            checkpoint: CheckpointStore::new(self.root.path().join("checkpoint.json")),
        };
        NodeDriver::with_data_plane(parts, plane, self.namespaces.clone()).unwrap()
    }

    /// Process `pid` lives in a new namespace of `kernel`.
    fn spawn(&self, kernel: &mut FakeKernel, pid: u32) -> NetnsId {
        let id = kernel.add_namespace(NetnsRef::Pid(pid));
        self.namespaces.set(pid, id);
        id
    }
}

fn request(pid: u32) -> AttachRequest {
    AttachRequest {
        claim_uid: "uid-1".into(),
        pool: NODE.into(),
        device: "body-m0".into(),
        pid,
        container_id: format!("ctr-{pid}"),
        deadline_unix_ms: None,
    }
}

fn shared_request(pid: u32) -> AttachRequest {
    AttachRequest {
        pool: SHARED.into(),
        device: "m0".into(),
        ..request(pid)
    }
}

/// Runs `look` on the driver's kernel and buses.
async fn inspect<T: Send + 'static>(
    driver: &NodeDriver<FakeKernel, FakeNamespaces>,
    look: impl FnOnce(&mut can_dra_dataplane::bus::Buses<FakeKernel>) -> T + Send + 'static,
) -> T {
    driver
        .data_plane()
        .run(move |buses| Ok::<_, PlaneError>(look(buses)))
        .await
        .unwrap()
}

/// Member host ends on the fake host.
fn member_links(kernel: &FakeKernel) -> Vec<String> {
    kernel
        .host
        .iter()
        .map(|link| link.name.clone())
        .filter(|name| can_dra_dataplane::bus::naming::is_owned(name))
        .collect()
}

async fn recorded(driver: &NodeDriver<FakeKernel, FakeNamespaces>) -> Option<Attachment> {
    driver.state().await.claims["uid-1"].devices[0].attachment
}

#[tokio::test]
async fn a_second_container_of_the_same_pod_finds_its_member_attached() {
    let rig = rig(false, None);
    let mut kernel = FakeKernel::new();
    let pod = rig.spawn(&mut kernel, 100);
    // The pod's second container: another pid in the same namespace.
    kernel.alias_namespace(&NetnsRef::Pid(100), NetnsRef::Pid(101));
    rig.namespaces.set(101, pod);
    let driver = rig.driver(kernel);

    let first = driver
        .attach(request(100), Requester::default())
        .await
        .unwrap();
    let second = driver
        .attach(request(101), Requester::default())
        .await
        .unwrap();

    assert!(first.starts_with("attached can0 on bus body"), "{first}");
    assert!(second.starts_with("already attached"), "{second}");
    let (members, links, pod_links) = inspect(&driver, |buses| {
        let members = buses.state().bus("body").unwrap().members.len();
        let kernel = buses.kernel_mut();
        (members, member_links(kernel), kernel.pods.len())
    })
    .await;
    assert_eq!((members, links.len(), pod_links), (1, 1, 1));
    // The checkpoint follows the latest container of the pod.
    assert_eq!(recorded(&driver).await, Some(Attachment::new(101, pod)));
}

#[tokio::test]
async fn a_gone_process_is_refused_as_gone_and_leaves_nothing() {
    let rig = rig(false, None);
    let driver = rig.driver(FakeKernel::new());

    let error = driver
        .attach(request(4242), Requester::default())
        .await
        .unwrap_err();

    assert!(
        matches!(error, AttachError::ProcessGone { pid: 4242, .. }),
        "{error:?}"
    );
    assert!(error.container_gone());
    assert!(
        error.to_string().contains("process 4242 is gone"),
        "{error}"
    );
    let (buses, links) = inspect(&driver, |buses| {
        (buses.state().buses.len(), member_links(buses.kernel_mut()))
    })
    .await;
    assert_eq!((buses, links.len()), (0, 0));
    assert_eq!(recorded(&driver).await, None);
}

#[tokio::test]
async fn a_namespace_gone_while_joining_is_refused_as_gone_and_leaves_nothing() {
    let rig = rig(false, None);
    // The process is seen, but its namespace is gone by the time the member is made.
    rig.namespaces.set(300, NetnsId { dev: 4, ino: 77 });
    let driver = rig.driver(FakeKernel::new());

    let error = driver
        .attach(request(300), Requester::default())
        .await
        .unwrap_err();

    assert!(
        matches!(error, AttachError::NamespaceGone { pid: 300, .. }),
        "{error:?}"
    );
    assert!(error.container_gone());
    let (members, links) = inspect(&driver, |buses| {
        let members = buses.state().bus("body").map_or(0, |b| b.members.len());
        (members, member_links(buses.kernel_mut()))
    })
    .await;
    assert_eq!((members, links.len()), (0, 0));
    assert_eq!(recorded(&driver).await, None);
}

#[tokio::test]
async fn a_pod_in_the_node_namespace_is_refused() {
    let rig = rig(false, None);
    rig.namespaces.set(1, NODE_NETNS);
    let driver = rig.driver(FakeKernel::new());

    let error = driver
        .attach(request(1), Requester::default())
        .await
        .unwrap_err();

    assert!(
        matches!(error, AttachError::HostNetwork { pid: 1, .. }),
        "{error:?}"
    );
    assert!(!error.container_gone());
    assert!(
        error
            .to_string()
            .contains("hostNetwork pods cannot join a bus")
    );
}

#[tokio::test]
async fn recovery_drops_an_attachment_whose_process_is_gone_and_keeps_a_live_one() {
    // Before the restart: the member attached in pid 100's namespace.
    let rig = rig(false, None);
    let mut kernel = FakeKernel::new();
    let pod = rig.spawn(&mut kernel, 100);
    let before = rig.driver(kernel);
    before
        .attach(request(100), Requester::default())
        .await
        .unwrap();
    let kernel = inspect(&before, |buses| std::mem::take(buses.kernel_mut())).await;
    drop(before);

    // The restart keeps the pod: the member is known again, and a hook call finds it.
    let after = rig.driver(kernel);
    let report = after.recover_on(HostCan::Present).await.unwrap();
    assert!(report.dropped.is_empty(), "{report:?}");
    let again = after
        .attach(request(100), Requester::default())
        .await
        .unwrap();
    assert!(again.starts_with("already attached"), "{again}");
    let kernel = inspect(&after, |buses| std::mem::take(buses.kernel_mut())).await;
    drop(after);

    // The pod died while no daemon ran: its attachment goes, and so does its link.
    rig.namespaces.remove(100);
    let mut kernel = kernel;
    kernel.remove_namespace(&NetnsRef::Pid(100));
    let last = rig.driver(kernel);
    let report = last.recover_on(HostCan::Present).await.unwrap();
    assert_eq!(report.dropped.len(), 1, "{report:?}");
    assert_eq!(report.dropped[0].attachment, Attachment::new(100, pod));
    assert!(report.dropped[0].reason.contains("gone"), "{report:?}");
    assert_eq!(recorded(&last).await, None);
    let links = inspect(&last, |buses| member_links(buses.kernel_mut())).await;
    assert!(links.is_empty(), "{links:?}");
    let saved: NodeState = CheckpointStore::new(rig.root.path().join("checkpoint.json"))
        .load()
        .unwrap();
    assert_eq!(saved.claims["uid-1"].devices[0].attachment, None);
}

#[tokio::test]
async fn a_restart_keeps_the_tunnel_and_physical_rules_of_a_cross_node_bus() {
    let rig = rig(true, None);
    let mut kernel = FakeKernel::new();
    kernel.add_namespace(NetnsRef::Path("/proc/self/ns/net".into()));
    kernel.add_host_link("can0", LinkKind::Can, 16);
    rig.spawn(&mut kernel, 500);
    let before = rig.driver(kernel);
    // What the tunnel loop does for the bus: its pair and the physical controller join the mesh.
    let mut mesh = BusSpec::new(SHARED);
    mesh.physical = Some("can0".into());
    mesh.tunnel = Some("vxtm-x".into());
    before
        .data_plane()
        .attach_tunnel(mesh, "vxtt-x")
        .await
        .unwrap();
    before
        .attach(shared_request(500), Requester::default())
        .await
        .unwrap();
    let kernel = inspect(&before, |buses| std::mem::take(buses.kernel_mut())).await;
    drop(before);
    let rules: BTreeSet<_> = kernel.named_rules().into_iter().collect();
    let external = |(src, dst, _): &(String, String, u16)| {
        [src, dst]
            .iter()
            .any(|end| *end == "can0" || *end == "vxtm-x")
    };
    // Member <-> tunnel, member <-> controller and tunnel <-> controller, both ways.
    assert_eq!(rules.iter().filter(|r| external(r)).count(), 6, "{rules:?}");

    let after = rig.driver(kernel);
    let report = after.recover_on(HostCan::Present).await.unwrap();

    let reconciled = report.reconciled.unwrap();
    assert_eq!(reconciled.rules_deleted, 0, "{reconciled:?}");
    let kept: BTreeSet<_> = inspect(&after, |buses| {
        buses.kernel_mut().named_rules().into_iter().collect()
    })
    .await;
    assert_eq!(kept, rules);

    // The tunnel loop no longer wants the bus here: its leftover pair goes, and with it every
    // rule to the other nodes and to the controller; the member stays.
    after.data_plane().delete_host_link("vxtm-x").await.unwrap();
    let (left, mesh) = inspect(&after, |buses| {
        let mesh = buses.state().bus(SHARED).cloned().unwrap();
        (buses.kernel_mut().named_rules(), mesh)
    })
    .await;
    assert!(left.iter().all(|r| !external(r)), "{left:?}");
    assert_eq!(
        (mesh.physical, mesh.tunnel, mesh.members.len()),
        (None, None, 1)
    );
}
