//! The chart renders, and the plain manifests are exactly its rendering with default values.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use can_dra_deploy::{chart_dir, plain_manifests};

#[test]
fn plain_manifests_are_the_default_rendering() {
    let rendered = plain_manifests(&chart_dir()).unwrap();
    let path = common::plain_manifests_path();
    if std::env::var_os("CAN_DRA_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &rendered).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{} is not the chart's rendering; regenerate it with \
         CAN_DRA_BLESS=1 cargo test -p can-dra-deploy --test chart",
        path.display()
    );
}

#[test]
fn every_value_a_template_uses_exists() {
    // gtmpl prints a missing value as `<no value>`, as Go does: a misspelt `.Values` path.
    for doc in common::default_render()
        .iter()
        .chain(&common::kind_render())
    {
        assert!(
            !doc.text.contains("<no value>")
                && !doc.text.lines().any(|l| l.trim_end().ends_with(": nil")),
            "{}: a template used a missing value:\n{}",
            doc.source,
            doc.text
        );
    }
}

#[test]
fn renders_every_component_once() {
    let docs = common::default_render();
    let count = |kind: &str| {
        docs.iter()
            .filter(|d| d.kind().as_deref() == Some(kind))
            .count()
    };
    assert_eq!(count("DeviceClass"), 3);
    assert_eq!(count("DaemonSet"), 1);
    assert_eq!(count("Deployment"), 1);
    assert_eq!(count("ServiceAccount"), 2);
    assert_eq!(count("ValidatingAdmissionPolicy"), 2);
    assert_eq!(count("ValidatingAdmissionPolicyBinding"), 2);
    let mut names: Vec<_> = docs.iter().map(|d| (d.kind(), d.name())).collect();
    let total = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), total, "two objects share a kind and name");
}

#[test]
fn admission_policy_can_be_turned_off() {
    let values: serde_yaml::Value =
        serde_yaml::from_str("admissionPolicy:\n  enabled: false\n").unwrap();
    let docs = can_dra_deploy::render_chart(
        &chart_dir(),
        &can_dra_deploy::Release::default(),
        Some(&values),
    )
    .unwrap();
    assert!(docs.iter().all(|d| {
        !d.kind()
            .is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))
    }));
    assert_eq!(docs.len() + 4, common::default_render().len());
}
