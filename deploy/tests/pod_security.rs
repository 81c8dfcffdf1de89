//! Pod Security Admission: every pod of the chart but the node daemon meets the `restricted`
//! level, and the release namespace enforces `privileged`, the only level that admits the daemon
//! (privileged, hostNetwork, hostPID, hostPath volumes).
//!
//! The checks restate those of `staging/src/k8s.io/pod-security-admission/policy/` that apply to
//! Linux pods, by file: baseline `check_privileged.go`, `check_hostNamespaces.go`,
//! `check_hostPathVolumes.go`, `check_hostPorts.go`, `check_capabilities_baseline.go`; restricted
//! (which includes baseline) `check_allowPrivilegeEscalation.go`, `check_runAsNonRoot.go`,
//! `check_runAsUser.go`, `check_seccompProfile_restricted.go`,
//! `check_capabilities_restricted.go`, `check_restrictedVolumes.go`. Not restated: AppArmor,
//! SELinux options, /proc mount, sysctls and Windows host processes, which the chart never sets.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use can_dra_deploy::{Document, Release, chart_dir, render_chart};
use serde_json::Value;

const ENFORCE: &str = "pod-security.kubernetes.io/enforce";

/// The capabilities baseline allows adding (`check_capabilities_baseline.go`).
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The volume types restricted allows (`check_restrictedVolumes.go`).
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Every container of a pod spec: init containers, containers and ephemeral containers.
fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|key| pod[*key].as_array().into_iter().flatten())
        .collect()
}

fn name(container: &Value) -> &str {
    container["name"].as_str().unwrap_or("?")
}

/// The baseline checks a pod spec fails, each named by its upstream check.
fn baseline_violations(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for container in containers(pod) {
        let context = &container["securityContext"];
        if context["privileged"] == true {
            out.push(format!("privileged: container {}", name(container)));
        }
        for port in container["ports"].as_array().into_iter().flatten() {
            if port["hostPort"].as_u64().is_some_and(|p| p != 0) {
                out.push(format!("hostPorts: container {}", name(container)));
            }
        }
        for added in context["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let added = added.as_str().unwrap_or_default();
            if !BASELINE_CAPABILITIES.contains(&added) {
                out.push(format!(
                    "capabilities_baseline: container {} adds {added}",
                    name(container)
                ));
            }
        }
    }
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[key] == true {
            out.push(format!("hostNamespaces: {key}"));
        }
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        if volume.get("hostPath").is_some() {
            out.push(format!("hostPathVolumes: volume {}", name(volume)));
        }
    }
    out
}

/// The restricted checks (baseline included) a pod spec fails, each named by its upstream check.
fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut out = baseline_violations(pod);
    let pod_context = &pod["securityContext"];
    let pod_non_root = pod_context["runAsNonRoot"] == true;
    let seccomp_ok = |context: &Value| {
        matches!(
            context["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault" | "Localhost")
        )
    };
    let pod_seccomp = seccomp_ok(pod_context);
    if pod_context["runAsUser"] == 0 {
        out.push("runAsUser: pod runs as 0".to_owned());
    }
    for container in containers(pod) {
        let context = &container["securityContext"];
        let who = name(container);
        if context["allowPrivilegeEscalation"] != false {
            out.push(format!("allowPrivilegeEscalation: container {who}"));
        }
        // Set to false in a container, or unset in both, fails.
        if context["runAsNonRoot"] == false || (!pod_non_root && context["runAsNonRoot"] != true) {
            out.push(format!("runAsNonRoot: container {who}"));
        }
        if context["runAsUser"] == 0 {
            out.push(format!("runAsUser: container {who} runs as 0"));
        }
        let unconfined = context["seccompProfile"]["type"] == "Unconfined";
        if unconfined || (!pod_seccomp && !seccomp_ok(context)) {
            out.push(format!("seccompProfile_restricted: container {who}"));
        }
        let capabilities = &context["capabilities"];
        let drops_all = capabilities["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|c| c == "ALL"));
        let adds_only_bind = capabilities["add"]
            .as_array()
            .is_none_or(|a| a.iter().all(|c| c == "NET_BIND_SERVICE"));
        if !drops_all || !adds_only_bind {
            out.push(format!("capabilities_restricted: container {who}"));
        }
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        let allowed = volume
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, _)| key.as_str() != "name")
            .all(|(key, _)| RESTRICTED_VOLUMES.contains(&key.as_str()));
        if !allowed {
            out.push(format!("restrictedVolumes: volume {}", name(volume)));
        }
    }
    out
}

/// The pod template of every workload in `docs`, with the workload's kind and name.
fn pod_templates(docs: &[Document]) -> Vec<(String, Value)> {
    docs.iter()
        .map(common::to_json)
        .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "DaemonSet" | "Job")))
        .map(|o| {
            let label = format!("{} {}", o["kind"], o["metadata"]["name"]);
            (label, o["spec"]["template"]["spec"].clone())
        })
        .collect()
}

/// The pod template of the one workload of `kind` in the default rendering.
fn default_pod(kind: &str) -> Value {
    let label = format!("{kind:?}");
    pod_templates(&common::default_render())
        .into_iter()
        .find(|(l, _)| l.starts_with(&label))
        .unwrap()
        .1
}

fn renderings() -> Vec<(&'static str, Vec<Document>)> {
    vec![
        ("default values", common::default_render()),
        ("kind values", common::kind_render()),
        (
            "plain manifests",
            common::file_documents(&common::plain_manifests_path()),
        ),
    ]
}

#[test]
fn every_pod_but_the_node_daemon_meets_the_restricted_level() {
    for (rendering, docs) in renderings() {
        let pods = pod_templates(&docs);
        assert!(pods.iter().any(|(l, _)| l.starts_with("\"Deployment\"")));
        for (workload, pod) in pods.iter().filter(|(l, _)| !l.starts_with("\"DaemonSet\"")) {
            assert_eq!(
                restricted_violations(pod),
                Vec::<String>::new(),
                "{rendering}: {workload}"
            );
            // Not a Pod Security check, but part of the same hardening.
            for container in containers(pod) {
                assert_eq!(
                    container["securityContext"]["readOnlyRootFilesystem"],
                    true,
                    "{rendering}: {workload}: container {}",
                    name(container)
                );
            }
        }
    }
}

#[test]
fn the_node_daemon_needs_the_privileged_level() {
    let violations = baseline_violations(&default_pod("DaemonSet"));
    for expected in [
        "privileged: container plugin",
        "hostNamespaces: hostNetwork",
        "hostNamespaces: hostPID",
        "hostPathVolumes: volume plugins-registry",
    ] {
        assert!(
            violations.iter().any(|v| v == expected),
            "{expected} in {violations:?}"
        );
    }
}

#[test]
fn the_checks_see_a_missing_seccomp_profile_and_a_root_container() {
    let mut pod = default_pod("Deployment");
    pod["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("seccompProfile");
    pod["containers"][0]["securityContext"]["runAsNonRoot"] = Value::Bool(false);
    assert_eq!(
        restricted_violations(&pod),
        [
            "runAsNonRoot: container controller",
            "seccompProfile_restricted: container controller"
        ]
    );
}

/// The Namespace documents of a rendering.
fn namespaces(docs: &[Document]) -> Vec<Value> {
    docs.iter()
        .map(common::to_json)
        .filter(|o| o["kind"] == "Namespace")
        .collect()
}

#[test]
fn the_release_namespace_enforces_the_privileged_level() {
    // The plain manifests create the namespace, labelled.
    let plain = namespaces(&common::file_documents(&common::plain_manifests_path()));
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0]["metadata"]["name"], "can-dra");
    assert_eq!(plain[0]["metadata"]["labels"][ENFORCE], "privileged");

    // The chart creates it only when asked (Helm's --create-namespace makes an unlabelled one),
    // for the release's namespace.
    assert!(namespaces(&common::default_render()).is_empty());
    let values: serde_yaml::Value = serde_yaml::from_str("namespace:\n  create: true\n").unwrap();
    let release = Release {
        name: "bus".into(),
        namespace: "hil-rack".into(),
    };
    let created = namespaces(&render_chart(&chart_dir(), &release, Some(&values)).unwrap());
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["metadata"]["name"], "hil-rack");
    assert_eq!(created[0]["metadata"]["labels"][ENFORCE], "privileged");
}
