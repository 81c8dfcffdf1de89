//! The double's own contract: the kube-apiserver behaviours the daemon's tests rely on.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::ApiServer;

fn slice_json(name: &str, node: &str, devices: Value) -> Value {
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {"driver": "can.dra.dev", "nodeName": node,
                 "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                 "devices": devices},
    })
}

fn slice(name: &str, node: &str) -> ResourceSlice {
    serde_json::from_value(slice_json(name, node, json!([{"name": "can0-m0"}]))).unwrap()
}

fn status_code(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("not an API error: {other:?}"),
    }
}

async fn start() -> (ApiServer, Client) {
    let server = ApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    (server, client)
}

#[tokio::test]
async fn unknown_paths_get_a_status_404_and_are_logged_without_endpoint() {
    let (server, client) = start().await;
    let err = client
        .request_text(
            http::Request::get("/apis/example.com/v1/widgets")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(status_code(err), (404, "NotFound".into()));
    let log = server.requests();
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].status, log[0].endpoint), (404, None));
}

#[tokio::test]
async fn create_sets_server_fields_and_duplicates_conflict() {
    let (server, client) = start().await;
    let api: Api<ResourceSlice> = Api::all(client);
    let created = api
        .create(&PostParams::default(), &slice("s1", "n1"))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.resource_version.is_some());
    let err = api
        .create(&PostParams::default(), &slice("s1", "n1"))
        .await
        .unwrap_err();
    assert_eq!(status_code(err), (409, "AlreadyExists".into()));
    assert_eq!(server.slices().len(), 1);
}

#[tokio::test]
async fn updates_with_a_stale_resource_version_conflict() {
    let (_server, client) = start().await;
    let api: Api<ResourceSlice> = Api::all(client);
    let v1 = api
        .create(&PostParams::default(), &slice("s1", "n1"))
        .await
        .unwrap();
    let mut v2 = v1.clone();
    v2.spec.pool.generation = 2;
    let v2 = api
        .replace("s1", &PostParams::default(), &v2)
        .await
        .unwrap();
    assert_ne!(v2.metadata.resource_version, v1.metadata.resource_version);
    assert_eq!(v2.metadata.generation, Some(2));
    let err = api
        .replace("s1", &PostParams::default(), &v1)
        .await
        .unwrap_err();
    assert_eq!(status_code(err), (409, "Conflict".into()));
    // An update that changes nothing keeps the resourceVersion.
    let same = api
        .replace("s1", &PostParams::default(), &v2)
        .await
        .unwrap();
    assert_eq!(same.metadata.resource_version, v2.metadata.resource_version);
}

#[tokio::test]
async fn api_limits_and_immutable_fields_are_enforced() {
    let (_server, client) = start().await;
    let api: Api<ResourceSlice> = Api::all(client);
    let devices: Vec<Value> = (0..129).map(|i| json!({"name": format!("d{i}")})).collect();
    let too_many: ResourceSlice =
        serde_json::from_value(slice_json("s1", "n1", json!(devices))).unwrap();
    let err = api
        .create(&PostParams::default(), &too_many)
        .await
        .unwrap_err();
    assert_eq!(status_code(err), (422, "Invalid".into()));

    let long = "x".repeat(65);
    let long_attr: ResourceSlice = serde_json::from_value(slice_json(
        "s1",
        "n1",
        json!([{"name": "d0", "attributes": {"bus": {"string": long}}}]),
    ))
    .unwrap();
    let err = api
        .create(&PostParams::default(), &long_attr)
        .await
        .unwrap_err();
    assert_eq!(status_code(err), (422, "Invalid".into()));

    let created = api
        .create(&PostParams::default(), &slice("s1", "n1"))
        .await
        .unwrap();
    let mut moved = created.clone();
    moved.spec.node_name = Some("n2".into());
    moved.spec.pool.name = "n2".into();
    let err = api
        .replace("s1", &PostParams::default(), &moved)
        .await
        .unwrap_err();
    assert_eq!(status_code(err), (422, "Invalid".into()));
}

#[tokio::test]
async fn apply_creates_then_updates_and_a_no_op_apply_changes_nothing() {
    let (_server, client) = start().await;
    let api: Api<ResourceSlice> = Api::all(client);
    let params = PatchParams::apply("can.dra.dev");
    let first = api
        .patch("s1", &params, &Patch::Apply(slice("s1", "n1")))
        .await
        .unwrap();
    assert_eq!(first.metadata.generation, Some(1));
    let again = api
        .patch("s1", &params, &Patch::Apply(slice("s1", "n1")))
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        first.metadata.resource_version
    );
    let mut changed = slice("s1", "n1");
    changed.spec.devices = None;
    let changed = api
        .patch("s1", &params, &Patch::Apply(changed))
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, Some(2));
    assert_eq!(changed.spec.devices, None);
    // Without a field manager, apply is refused as by kube-apiserver.
    let err = api
        .patch(
            "s1",
            &PatchParams::default(),
            &Patch::Apply(slice("s1", "n1")),
        )
        .await
        .unwrap_err();
    assert_eq!(status_code(err).0, 400);
}

#[tokio::test]
async fn lists_filter_on_field_selectors_and_refuse_unknown_fields() {
    let (server, client) = start().await;
    for (name, node) in [("a", "n1"), ("b", "n2"), ("c", "n1")] {
        server.insert_slice(slice(name, node));
    }
    let api: Api<ResourceSlice> = Api::all(client);
    let listed = api
        .list(&ListParams::default().fields("spec.nodeName=n1,spec.driver=can.dra.dev"))
        .await
        .unwrap();
    let names: Vec<_> = listed
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a", "c"]);
    let other = api
        .list(&ListParams::default().fields("spec.nodeName!=n1"))
        .await
        .unwrap();
    assert_eq!(other.items.len(), 1);
    let err = api
        .list(&ListParams::default().fields("spec.colour=red"))
        .await
        .unwrap_err();
    assert_eq!(status_code(err).0, 400);
    assert_eq!(
        status_code(
            api.delete("zzz", &DeleteParams::default())
                .await
                .unwrap_err()
        )
        .0,
        404
    );
}

#[tokio::test]
async fn claim_status_entries_belong_to_their_field_manager() {
    let (server, client) = start().await;
    let claim: ResourceClaim = serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": {},
        "status": {"allocation": {"devices": {"results": [
            {"request": "a", "driver": "can.dra.dev", "pool": "n1", "device": "can0-m0"},
        ]}}},
    }))
    .unwrap();
    server.insert_claim(claim);
    let api: Api<ResourceClaim> = Api::namespaced(client, "ns");
    let body = |devices: Value| {
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
               "metadata": {"name": "c"}, "status": {"devices": devices}})
    };
    let entry = json!([{"driver": "can.dra.dev", "pool": "n1", "device": "can0-m0"}]);
    api.patch_status(
        "c",
        &PatchParams::apply("one"),
        &Patch::Apply(body(entry.clone())),
    )
    .await
    .unwrap();
    let err = api
        .patch_status(
            "c",
            &PatchParams::apply("two"),
            &Patch::Apply(body(entry.clone())),
        )
        .await
        .unwrap_err();
    assert_eq!(
        status_code(err).0,
        409,
        "taking another manager's entry needs force"
    );
    // Forced, "two" takes the entry over; then "one" applying nothing leaves it in place.
    api.patch_status(
        "c",
        &PatchParams::apply("two").force(),
        &Patch::Apply(body(entry)),
    )
    .await
    .unwrap();
    api.patch_status(
        "c",
        &PatchParams::apply("one"),
        &Patch::Apply(body(json!([]))),
    )
    .await
    .unwrap();
    let devices = server
        .claim("ns", "c")
        .unwrap()
        .status
        .unwrap()
        .devices
        .unwrap();
    assert_eq!(devices.len(), 1);
    // Fields other than status.devices are refused, not silently dropped.
    let err = api
        .patch_status(
            "c",
            &PatchParams::apply("two"),
            &Patch::Apply(
                json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                                 "metadata": {"name": "c"}, "status": {"reservedFor": []}}),
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(status_code(err).0, 422);
}

#[tokio::test]
async fn the_kubeconfig_file_reaches_the_double() {
    let (server, _) = start().await;
    server.insert_node(Node {
        metadata: kube::api::ObjectMeta {
            name: Some("n1".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(Client::try_from(config).unwrap());
    let node = nodes.get("n1").await.unwrap();
    assert!(node.metadata.uid.is_some());
    let listed = nodes.list(&ListParams::default()).await.unwrap_err();
    assert_eq!(
        status_code(listed).0,
        405,
        "listing nodes is not an endpoint the daemon uses"
    );
}
