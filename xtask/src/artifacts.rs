//! Finding the kernel-test executables in cargo's JSON build messages.
//!
//! Convention: a kernel test lives in an integration-test target whose name starts with `kernel_`
//! (`<crate>/tests/kernel_*.rs`) and is `#[ignore]`d, so plain `cargo test` skips it.

use std::path::PathBuf;

use serde::Deserialize;

/// The prefix of integration-test targets that hold kernel tests.
pub const KERNEL_TEST_PREFIX: &str = "kernel_";

/// A built test executable holding kernel tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// The test target's name, e.g. `kernel_vxcan`.
    pub name: String,
    /// The built executable.
    pub executable: PathBuf,
    /// The crate's directory (working directory and `CARGO_MANIFEST_DIR` of the run).
    pub crate_dir: PathBuf,
}

#[derive(Debug, Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
    #[serde(default)]
    target: Option<Target>,
    #[serde(default)]
    executable: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct Target {
    name: String,
    #[serde(default)]
    kind: Vec<String>,
}

/// Picks the kernel-test executables out of `cargo test --no-run --message-format=json` output (one JSON object
/// per line; other lines are ignored), each once, in build order.
pub fn kernel_test_binaries(json_lines: &str) -> Vec<TestBinary> {
    let mut found: Vec<TestBinary> = Vec::new();
    for line in json_lines.lines().filter(|l| l.starts_with('{')) {
        let Ok(message) = serde_json::from_str::<Message>(line) else {
            continue;
        };
        if message.reason != "compiler-artifact" {
            continue;
        }
        let (Some(target), Some(executable), Some(manifest)) =
            (message.target, message.executable, message.manifest_path)
        else {
            continue;
        };
        if !target.kind.iter().any(|k| k == "test") || !target.name.starts_with(KERNEL_TEST_PREFIX)
        {
            continue;
        }
        let Some(crate_dir) = manifest.parent().map(PathBuf::from) else {
            continue;
        };
        if found.iter().all(|b| b.executable != executable) {
            found.push(TestBinary {
                name: target.name,
                executable,
                crate_dir,
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(name: &str, kind: &str, executable: Option<&str>) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": "path+file:///w/dataplane#can-dra-dataplane@0.1.0",
            "manifest_path": "/w/dataplane/Cargo.toml",
            "target": {"kind": [kind], "crate_types": ["bin"], "name": name, "src_path": "/w/dataplane/tests/x.rs",
                       "edition": "2024", "doc": false, "doctest": false, "test": true},
            "profile": {"opt_level": "0", "test": true},
            "features": [],
            "filenames": ["/t/debug/deps/x"],
            "executable": executable,
            "fresh": true
        })
        .to_string()
    }

    #[test]
    fn only_kernel_integration_tests_with_executables_are_picked() {
        let lines = [
            artifact("kernel_vxcan", "test", Some("/t/debug/deps/kernel_vxcan-1")),
            artifact(
                "can_dra_dataplane",
                "lib",
                Some("/t/debug/deps/can_dra_dataplane-2"),
            ),
            artifact("gateway", "test", Some("/t/debug/deps/gateway-3")),
            artifact("kernel_helpers", "lib", None),
            artifact("kernel_gw", "test", Some("/t/debug/deps/kernel_gw-4")),
            artifact("kernel_vxcan", "test", Some("/t/debug/deps/kernel_vxcan-1")),
            r#"{"reason":"build-finished","success":true}"#.to_owned(),
            "   Compiling something (not JSON)".to_owned(),
        ]
        .join("\n");
        let binaries = kernel_test_binaries(&lines);
        assert_eq!(
            binaries,
            vec![
                TestBinary {
                    name: "kernel_vxcan".into(),
                    executable: "/t/debug/deps/kernel_vxcan-1".into(),
                    crate_dir: "/w/dataplane".into(),
                },
                TestBinary {
                    name: "kernel_gw".into(),
                    executable: "/t/debug/deps/kernel_gw-4".into(),
                    crate_dir: "/w/dataplane".into(),
                },
            ]
        );
    }

    #[test]
    fn no_kernel_tests_is_an_empty_list() {
        let lines = artifact("gateway", "test", Some("/t/debug/deps/gateway-3"));
        assert!(kernel_test_binaries(&lines).is_empty());
    }
}
