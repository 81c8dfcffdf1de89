//! The `can-dra-controller` binary against the API server double: the slices of a bus follow its
//! spec, its status follows the claims, pods and nodes, deleted nodes are cleaned up after, and
//! of two replicas only the Lease holder writes until it dies and the other takes over. The
//! replicas run as the chart's ServiceAccount under the chart's own RBAC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use can_dra_cluster::canbus::{CanBus, CanBusSpec, CanBusStatus, ExternalPeerStatus};
use can_dra_cluster::naming::pool_name;
use can_dra_doubles::apiserver::{ApiServer, RbacPolicy, User};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus, Pod, PodResourceClaim, PodSpec};
use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationResult, DeviceRequestAllocationResult, ResourceClaim,
    ResourceClaimConsumerReference, ResourceClaimSpec, ResourceClaimStatus, ResourcePool,
    ResourceSlice, ResourceSliceSpec,
};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, PostParams};

const DRIVER: &str = "can.dra.dev";
/// The release namespace: the chart lets the controller hold Leases only there.
const LEASE_NAMESPACE: &str = "can-dra";
const LEASE_NAME: &str = "can.dra.dev-controller";
/// The Lease duration the replicas run with: short, so a takeover fits in a test.
const LEASE: Duration = Duration::from_secs(2);
/// How long any awaited change may take.
const WAIT: Duration = Duration::from_secs(20);

/// A running controller process, killed when dropped.
struct Replica {
    child: Child,
    identity: String,
    log: std::path::PathBuf,
}

impl Replica {
    fn start(server: &ApiServer, dir: &Path, identity: &str) -> Self {
        let kubeconfig = dir.join(format!("kubeconfig-{identity}"));
        server.write_kubeconfig_as(&kubeconfig, identity).unwrap();
        let log_path = dir.join(format!("{identity}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_can-dra-controller"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--identity", identity])
            .args(["--lease-namespace", LEASE_NAMESPACE])
            .args(["--lease-duration", &format!("{}s", LEASE.as_secs())])
            .args(["--lease-retry", "200ms"])
            .args(["--sweep-interval", "1s"])
            .env("RUST_LOG", "info,kube=warn")
            .env_remove("KUBECONFIG")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            identity: identity.to_owned(),
            log: log_path,
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- {} log ----\n{log}", self.identity);
        }
    }
}

/// The (API group, resource[/subresource], verb) of every request `identity` made; each must be an
/// endpoint the double serves.
fn calls_of(server: &ApiServer, identity: &str) -> BTreeSet<(String, String, String)> {
    server
        .requests()
        .iter()
        .filter(|r| r.is_from(identity))
        .map(|r| {
            let e = r.endpoint.unwrap_or_else(|| {
                panic!("{identity} made a call the double does not serve: {r:?}")
            });
            let resource = match e.subresource {
                Some(sub) => format!("{}/{sub}", e.resource),
                None => e.resource.to_owned(),
            };
            (e.api_group.to_owned(), resource, e.verb.to_owned())
        })
        .collect()
}

/// The chart rendered with its defaults (release `can-dra` in namespace `can-dra`).
fn manifests() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifests/can-dra.yaml");
    std::fs::read_to_string(path).unwrap()
}

/// What the rendered manifests grant the controller's roles (the release is named `can-dra`).
fn granted_to_controller() -> BTreeSet<(String, String, String)> {
    let text = manifests();
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut granted = BTreeSet::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let object: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let is_role = object["kind"] == "ClusterRole" || object["kind"] == "Role";
        if !is_role || !name.starts_with("can-dra-controller") {
            continue;
        }
        for rule in object["rules"].as_array().into_iter().flatten() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        granted.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    granted
}

/// Every call `identity` made is granted by the chart's RBAC for the controller.
fn assert_granted(server: &ApiServer, identity: &str) {
    let granted = granted_to_controller();
    let missing: Vec<_> = calls_of(server, identity)
        .into_iter()
        .filter(|call| !granted.contains(call))
        .collect();
    assert!(missing.is_empty(), "the chart does not grant {missing:?}");
}

/// The field selector of a request, decoded.
fn field_selector(request: &can_dra_doubles::apiserver::RecordedRequest) -> Option<String> {
    let query = request.query.as_deref()?;
    let encoded = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("fieldSelector="))?;
    Some(
        encoded
            .replace("%3D", "=")
            .replace("%2C", ",")
            .replace("%2F", "/"),
    )
}

/// Polls `check` until it returns `Some`, failing with `what` after [`WAIT`].
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node(name: &str, ip: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

/// A pod on `node` using claim `claim`, as the scheduler leaves it.
fn pod(name: &str, node: &str, claim: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            resource_claims: Some(vec![PodResourceClaim {
                name: "bus".into(),
                resource_claim_name: Some(claim.into()),
                ..PodResourceClaim::default()
            }]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// A claim allocated `devices` of `bus`'s pool and reserved by pod `pod`.
fn claim(name: &str, bus: &str, devices: &[&str], pod: &str) -> ResourceClaim {
    ResourceClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: ResourceClaimSpec::default(),
        status: Some(ResourceClaimStatus {
            allocation: Some(AllocationResult {
                devices: Some(DeviceAllocationResult {
                    results: Some(
                        devices
                            .iter()
                            .map(|d| DeviceRequestAllocationResult {
                                driver: DRIVER.into(),
                                pool: pool_name(bus),
                                device: (*d).into(),
                                request: "bus".into(),
                                ..DeviceRequestAllocationResult::default()
                            })
                            .collect(),
                    ),
                    config: None,
                }),
                ..AllocationResult::default()
            }),
            reserved_for: Some(vec![ResourceClaimConsumerReference {
                resource: "pods".into(),
                name: pod.into(),
                uid: format!("uid-{pod}"),
                api_group: None,
            }]),
            ..ResourceClaimStatus::default()
        }),
    }
}

/// A node daemon's slice of node `node`.
fn node_slice(node: &str) -> ResourceSlice {
    ResourceSlice {
        metadata: ObjectMeta {
            name: Some(format!("{node}-{DRIVER}-0")),
            ..ObjectMeta::default()
        },
        spec: ResourceSliceSpec {
            driver: DRIVER.into(),
            node_name: Some(node.into()),
            pool: ResourcePool {
                name: node.into(),
                generation: 1,
                resource_slice_count: 1,
            },
            ..ResourceSliceSpec::default()
        },
    }
}

fn bus_spec(members: u32, bitrate: &str) -> CanBusSpec {
    let mut spec = CanBusSpec::new(bitrate);
    spec.max_members = members;
    spec
}

/// The devices of `bus`'s pool, by name, with their `bitrate` attribute.
fn pool_devices(server: &ApiServer, bus: &str) -> BTreeMap<String, Option<i64>> {
    server
        .slices()
        .iter()
        .filter(|s| s.spec.pool.name == pool_name(bus))
        .flat_map(|s| s.spec.devices.clone().unwrap_or_default())
        .map(|d| {
            let bitrate = d.attributes.as_ref().and_then(|a| a.get("bitrate")?.int);
            (d.name, bitrate)
        })
        .collect()
}

fn status(server: &ApiServer, bus: &str) -> Option<CanBusStatus> {
    let value = server.canbus(bus)?;
    serde_json::from_value(value.get("status")?.clone()).ok()
}

fn ready(status: &CanBusStatus) -> Option<(&str, &str)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// Creates bus `name` and waits until the controller has published it and called it ready.
async fn create_ready_bus(server: &ApiServer, buses: &Api<CanBus>, name: &str, members: u32) {
    buses
        .create(
            &PostParams::default(),
            &CanBus::new(name, bus_spec(members, "500k")),
        )
        .await
        .unwrap();
    eventually(&format!("{name} published and ready"), || {
        status(server, name).filter(|s| ready(s) == Some(("True", "Published")))
    })
    .await;
}

/// The holder of the controller's leader Lease, if any.
fn leader(server: &ApiServer) -> Option<String> {
    server
        .lease(LEASE_NAMESPACE, LEASE_NAME)?
        .spec?
        .holder_identity
}

/// A double that authorizes with the chart's RBAC: the replicas' tokens are the controller's
/// ServiceAccount, the test's own token (`test`) is a cluster administrator.
async fn start() -> (ApiServer, Api<CanBus>, tempfile::TempDir) {
    let server = ApiServer::start().await.unwrap();
    server.enable_rbac(RbacPolicy::from_yaml(&manifests()).unwrap());
    server.add_token("test", User::admin());
    for replica in ["replica-a", "replica-b"] {
        server.add_token(
            replica,
            User::service_account("can-dra", "can-dra-controller"),
        );
    }
    let buses: Api<CanBus> = Api::all(server.client_as("test").await.unwrap());
    (server, buses, tempfile::tempdir().unwrap())
}

#[tokio::test]
async fn a_bus_gets_slices_that_follow_its_spec_and_go_with_it() {
    let (server, buses, dir) = start().await;
    let _replica = Replica::start(&server, dir.path(), "replica-a");
    buses
        .create(
            &PostParams::default(),
            &CanBus::new("powertrain", bus_spec(4, "500k")),
        )
        .await
        .unwrap();
    let devices = eventually("4 member slots", || {
        Some(pool_devices(&server, "powertrain")).filter(|d| d.len() == 4)
    })
    .await;
    assert!(devices.values().all(|b| *b == Some(500_000)), "{devices:?}");
    let published = eventually("a ready status", || {
        status(&server, "powertrain").filter(|s| ready(s).is_some())
    })
    .await;
    assert_eq!(ready(&published), Some(("True", "Published")));
    assert_eq!(published.tunnel_port, Some(47000), "the first free port");
    assert!(published.members.is_empty() && published.endpoints.is_empty());

    // A second bus gets the next port; an explicit port is taken as given.
    let mut explicit = bus_spec(1, "500k");
    explicit.tunnel_port = Some(50000);
    buses
        .create(&PostParams::default(), &CanBus::new("chassis", explicit))
        .await
        .unwrap();
    buses
        .create(
            &PostParams::default(),
            &CanBus::new("body", bus_spec(1, "500k")),
        )
        .await
        .unwrap();
    for (bus, port) in [("chassis", 50000), ("body", 47001)] {
        eventually(&format!("tunnel port {port} of {bus}"), || {
            status(&server, bus).filter(|s| s.tunnel_port == Some(port))
        })
        .await;
    }

    // More members and a faster bitrate change the slices.
    let mut stored = buses.get("powertrain").await.unwrap();
    stored.spec = bus_spec(8, "1M");
    buses
        .replace("powertrain", &PostParams::default(), &stored)
        .await
        .unwrap();
    eventually("8 slots at 1 Mbit/s", || {
        let devices = pool_devices(&server, "powertrain");
        (devices.len() == 8 && devices.values().all(|b| *b == Some(1_000_000))).then_some(())
    })
    .await;

    // Deleting the bus removes its slices (the double has no garbage collector: the controller
    // sweeps them) and nothing else.
    buses
        .delete("powertrain", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the pool's slices gone", || {
        pool_devices(&server, "powertrain").is_empty().then_some(())
    })
    .await;
    assert_eq!(pool_devices(&server, "chassis").len(), 1);
    assert_granted(&server, "replica-a");
}

#[tokio::test]
async fn status_follows_claims_pods_and_nodes_and_a_deleted_node_is_cleaned_up() {
    let (server, buses, dir) = start().await;
    server.insert_node(node("node-a", "192.0.2.1"));
    server.insert_node(node("node-b", "192.0.2.2"));
    server.insert_slice(node_slice("node-a"));
    server.insert_slice(node_slice("node-b"));
    let _replica = Replica::start(&server, dir.path(), "replica-a");
    create_ready_bus(&server, &buses, "powertrain", 4).await;

    server.insert_pod(pod("p1", "node-a", "c1")).unwrap();
    server.insert_pod(pod("p2", "node-b", "c2")).unwrap();
    server.insert_claim(claim("c1", "powertrain", &["m0", "m1"], "p1"));
    server.insert_claim(claim("c2", "powertrain", &["m2"], "p2"));
    // A claim of another pool does not count.
    server.insert_claim(claim("c3", "elsewhere", &["m0"], "p2"));
    let both = BTreeMap::from([("node-a".to_owned(), 2), ("node-b".to_owned(), 1)]);
    let seen = eventually("members on both nodes", || {
        status(&server, "powertrain").filter(|s| s.members == both)
    })
    .await;
    assert_eq!(
        seen.endpoints,
        BTreeMap::from([
            ("node-a".to_owned(), "192.0.2.1:47000".to_owned()),
            ("node-b".to_owned(), "192.0.2.2:47000".to_owned()),
        ])
    );

    // The pod on node-b goes, and its claim is deallocated: node-b leaves the bus.
    server.delete_claim("default", "c2");
    server.delete_pod("default", "p2");
    let one = BTreeMap::from([("node-a".to_owned(), 2)]);
    eventually("members on node-a only", || {
        status(&server, "powertrain").filter(|s| s.members == one && s.endpoints.len() == 1)
    })
    .await;

    // A claim of another pool triggers a reconcile of the bus (its pool is listed) that
    // changes nothing, so nothing is written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.clear_requests();
    server.insert_claim(claim("c4", "elsewhere", &["m1"], "p1"));
    let pools = can_dra_cluster::naming::bus_pools_selector("can.dra.dev");
    eventually("a reconcile after the claim change", || {
        server
            .requests()
            .iter()
            .any(|r| {
                r.path.ends_with("/resourceslices")
                    && field_selector(r).as_deref() == Some(pools.as_str())
            })
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes: Vec<_> = server
        .writes()
        .into_iter()
        .filter(|w| !w.path.contains("/leases/"))
        .collect();
    assert!(
        writes.is_empty(),
        "an unchanged status is not written: {writes:#?}"
    );

    // node-a is deleted with its pod still listed: it leaves the status and its slices go.
    server.clear_requests();
    assert!(server.delete_node("node-a").is_some());
    eventually("node-a gone from the status", || {
        status(&server, "powertrain").filter(|s| s.members.is_empty() && s.endpoints.is_empty())
    })
    .await;
    eventually("node-a's slices deleted", || {
        server
            .slices()
            .iter()
            .all(|s| s.spec.pool.name != "node-a")
            .then_some(())
    })
    .await;
    assert!(
        server.slices().iter().any(|s| s.spec.pool.name == "node-b"),
        "the slices of a live node stay"
    );
    let writes = server.writes();
    assert!(
        writes
            .iter()
            .filter(|w| w.path.contains("/resourceslices/"))
            .all(|w| w.method == "DELETE" && w.path.ends_with("/node-a-can.dra.dev-0")),
        "only node-a's slice was touched: {writes:#?}"
    );
    assert_granted(&server, "replica-a");
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_writes_until_the_other_takes_over() {
    let (server, buses, dir) = start().await;
    server.insert_node(node("node-a", "192.0.2.1"));
    let mut first = Replica::start(&server, dir.path(), "replica-a");
    eventually("replica-a leads", || {
        (leader(&server)? == "replica-a").then_some(())
    })
    .await;
    let second = Replica::start(&server, dir.path(), "replica-b");
    create_ready_bus(&server, &buses, "powertrain", 2).await;
    // Give the follower time to act, were it going to: several Lease retries.
    tokio::time::sleep(LEASE).await;
    let follower_requests: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_from(&second.identity))
        .collect();
    assert!(
        !follower_requests.is_empty(),
        "the follower polls the Lease"
    );
    assert!(
        follower_requests
            .iter()
            .all(|r| !r.is_write() && r.path.contains("/leases/")),
        "the follower only reads the Lease: {follower_requests:#?}"
    );
    assert!(
        server
            .writes()
            .iter()
            .filter(|w| w.path.contains("/resourceslices") || w.path.contains("/canbuses"))
            .all(|w| w.is_from(&first.identity) || w.is_from("test")),
        "every slice and status write comes from the leader"
    );

    // The leader dies without releasing the Lease: the follower takes over once it expires.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let killed = Instant::now();
    eventually("replica-b leads", || {
        (leader(&server)? == "replica-b").then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!("takeover after {takeover:?} with a {LEASE:?} Lease");
    assert!(
        takeover <= LEASE + Duration::from_secs(2),
        "took over after {takeover:?}"
    );

    // The new leader acts on changes.
    let mut stored = buses.get("powertrain").await.unwrap();
    stored.spec = bus_spec(3, "500k");
    buses
        .replace("powertrain", &PostParams::default(), &stored)
        .await
        .unwrap();
    eventually("3 slots written by replica-b", || {
        let devices = pool_devices(&server, "powertrain");
        let wrote = server
            .writes()
            .iter()
            .any(|w| w.path.contains("/resourceslices") && w.is_from(&second.identity));
        (devices.len() == 3 && wrote).then_some(())
    })
    .await;
    assert_granted(&server, "replica-a");
    assert_granted(&server, "replica-b");
}

#[tokio::test]
async fn a_bus_whose_name_cannot_be_an_attribute_is_reported_and_never_written() {
    let (server, buses, dir) = start().await;
    let _replica = Replica::start(&server, dir.path(), "replica-a");
    // 65 bytes: the CRD's rule refuses it on a real cluster; the double admits it, as a cluster
    // whose CRD predates the rule would.
    let long = format!("{}.{}", "a".repeat(32), "b".repeat(32));
    assert_eq!(long.len(), 65);
    buses
        .create(
            &PostParams::default(),
            &CanBus::new(&long, bus_spec(2, "500k")),
        )
        .await
        .unwrap();
    let seen = eventually("the bus reported unpublishable", || {
        status(&server, &long).filter(|s| ready(s).is_some())
    })
    .await;
    let condition = seen.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "InvalidName")
    );
    assert!(
        condition.message.contains("at most 64 bytes"),
        "{}",
        condition.message
    );
    // Other buses are published meanwhile, and the long one is not retried against the server.
    create_ready_bus(&server, &buses, "body", 2).await;
    let slice_writes = server
        .writes()
        .into_iter()
        .filter(|r| r.path.contains("/resourceslices") && r.body.contains(&long))
        .count();
    assert_eq!(slice_writes, 0, "no slice of the long-named bus was sent");
    assert_granted(&server, "replica-a");
}

#[tokio::test]
async fn external_peers_are_served_by_the_node_they_name_or_one_the_controller_keeps() {
    let (server, buses, dir) = start().await;
    for (name, ip) in [
        ("node-a", "192.0.2.1"),
        ("node-b", "192.0.2.2"),
        ("node-c", "192.0.2.3"),
    ] {
        server.insert_node(node(name, ip));
    }
    let _replica = Replica::start(&server, dir.path(), "replica-a");
    let mut spec = bus_spec(4, "500k");
    let peer = |name: &str, node: Option<&str>| can_dra_cluster::canbus::ExternalPeer {
        name: name.into(),
        address: "198.51.100.7".into(),
        port: 20000,
        node: node.map(str::to_owned),
    };
    spec.external_peers = vec![peer("rack", Some("node-c")), peer("esp", None)];
    buses
        .create(&PostParams::default(), &CanBus::new("powertrain", spec))
        .await
        .unwrap();
    server.insert_pod(pod("p1", "node-b", "c1")).unwrap();
    server.insert_claim(claim("c1", "powertrain", &["m0"], "p1"));

    // node-c serves "rack" (and so has an endpoint without members); "esp" goes to the only
    // other node of the bus.
    let serving = |pairs: &[(&str, &str)]| -> Vec<ExternalPeerStatus> {
        pairs
            .iter()
            .map(|(name, node)| ExternalPeerStatus {
                name: (*name).into(),
                node: (*node).into(),
            })
            .collect()
    };
    let seen = eventually("the serving nodes in the status", || {
        status(&server, "powertrain").filter(|s| !s.external_peers.is_empty())
    })
    .await;
    assert_eq!(
        seen.external_peers,
        serving(&[("rack", "node-c"), ("esp", "node-b")])
    );
    assert_eq!(
        seen.endpoints.keys().collect::<Vec<_>>(),
        ["node-b", "node-c"]
    );
    assert_eq!(ready(&seen), Some(("True", "Published")));

    // node-a joins the bus and sorts first: "esp" stays on node-b.
    server.insert_pod(pod("p2", "node-a", "c2")).unwrap();
    server.insert_claim(claim("c2", "powertrain", &["m1"], "p2"));
    let seen = eventually("node-a in the bus", || {
        status(&server, "powertrain").filter(|s| s.endpoints.contains_key("node-a"))
    })
    .await;
    assert_eq!(
        seen.external_peers,
        serving(&[("rack", "node-c"), ("esp", "node-b")])
    );
}
