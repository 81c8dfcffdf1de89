//! Helpers shared by the offline checks: where the files are and how to read them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use can_dra_deploy::{Document, Release, chart_dir, render_chart, split_documents};

/// The repository root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `deploy/manifests/can-dra.yaml`.
pub fn plain_manifests_path() -> PathBuf {
    repo_root().join("deploy/manifests/can-dra.yaml")
}

/// The kind demo's directory.
pub fn kind_dir() -> PathBuf {
    repo_root().join("demo/kind")
}

/// The values file the kind demo installs the chart with.
pub fn kind_values() -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(kind_dir().join("values.yaml")).unwrap()).unwrap()
}

/// The chart rendered with its defaults.
pub fn default_render() -> Vec<Document> {
    render_chart(&chart_dir(), &Release::default(), None).unwrap()
}

/// The chart rendered as the kind demo installs it.
pub fn kind_render() -> Vec<Document> {
    let release = Release {
        name: "can-dra".into(),
        namespace: "can-dra".into(),
    };
    render_chart(&chart_dir(), &release, Some(&kind_values())).unwrap()
}

/// Every YAML file under `dir` (recursively), except Helm templates, which are not YAML until
/// rendered.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.ends_with("templates") || path.ends_with("target") {
                    continue;
                }
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file.
pub fn file_documents(path: &Path) -> Vec<Document> {
    let text = std::fs::read_to_string(path).unwrap();
    split_documents(&text)
        .into_iter()
        .map(|text| Document {
            source: path
                .strip_prefix(repo_root())
                .unwrap_or(path)
                .display()
                .to_string(),
            text,
        })
        .collect()
}

/// The kind demo's workload manifests.
pub fn demo_documents() -> Vec<Document> {
    yaml_files(&kind_dir().join("manifests"))
        .iter()
        .flat_map(|p| file_documents(p))
        .collect()
}

/// A document as JSON (the form the API server and CEL see).
pub fn to_json(doc: &Document) -> serde_json::Value {
    let yaml: serde_yaml::Value = serde_yaml::from_str(&doc.text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}\n{}", doc.source, doc.text));
    serde_json::to_value(yaml)
        .unwrap_or_else(|e| panic!("{}: not JSON-compatible: {e}", doc.source))
}
