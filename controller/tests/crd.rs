//! The committed CanBus CRD in the Helm chart must match what the types generate.
//! Regenerate it with `CAN_DRA_BLESS=1 cargo test -p can-dra-controller --test crd`.

use std::path::PathBuf;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/can-dra/crds/canbus.yaml")
}

#[test]
fn committed_crd_matches_the_types() {
    let generated = can_dra_cluster::canbus::crd_yaml().unwrap();
    let path = committed_path();
    if std::env::var_os("CAN_DRA_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date with the CanBus types; rerun with CAN_DRA_BLESS=1 to regenerate",
        path.display()
    );
}

#[test]
fn crd_subcommand_prints_the_same_crd() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_can-dra-controller"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(printed, can_dra_cluster::canbus::crd_yaml().unwrap());
    let parsed: serde_json::Value = serde_yaml::from_str(&printed).unwrap();
    assert_eq!(parsed["kind"], "CustomResourceDefinition");
    assert_eq!(parsed["spec"]["group"], "can.dra.dev");
    assert_eq!(parsed["spec"]["names"]["kind"], "CanBus");
}
