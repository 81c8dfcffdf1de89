//! Rendering the Helm chart offline, the way `helm template` does for the constructs the chart uses.
//!
//! Helm gives templates `.Values` (the chart's `values.yaml` deep-merged with the user's values),
//! `.Release` and `.Chart`, renders every file in `templates/` except partials (`_*`), and drops
//! documents that rendered empty. CRDs in `crds/` are installed as they are, never templated.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use gtmpl::{Context, FuncError, Template, Value};

use crate::documents::{Document, split_documents};

/// Errors while reading or rendering the chart.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A chart file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `Chart.yaml` or a values file is not valid YAML.
    #[error("{path}: {message}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// What the YAML parser said.
        message: String,
    },
    /// A template failed to parse or execute.
    #[error("template {template}: {message}")]
    Template {
        /// The template's chart-relative name.
        template: String,
        /// What the template engine said.
        message: String,
    },
}

/// The release a chart is rendered for: Helm's `.Release.Name` and `.Release.Namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The release name, the prefix of namespaced object names.
    pub name: String,
    /// The namespace the release installs into.
    pub namespace: String,
}

impl Default for Release {
    /// The release the plain manifests describe: `can-dra` in namespace `can-dra`.
    fn default() -> Self {
        Self {
            name: "can-dra".to_owned(),
            namespace: "can-dra".to_owned(),
        }
    }
}

/// The chart directory inside this package (`deploy/helm/can-dra`).
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/can-dra")
}

/// Renders the chart in `dir` for `release`, with `overrides` (a values document, like `helm -f`)
/// merged over the chart's `values.yaml`. CRDs come first, then the templates in file name order.
pub fn render_chart(
    dir: &Path,
    release: &Release,
    overrides: Option<&serde_yaml::Value>,
) -> Result<Vec<Document>, RenderError> {
    let chart_meta = read_yaml(&dir.join("Chart.yaml"))?;
    let chart_name = chart_meta
        .get("name")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or("chart")
        .to_owned();
    let mut values = read_yaml(&dir.join("values.yaml"))?;
    if let Some(overrides) = overrides {
        merge_values(&mut values, overrides);
    }
    let context = Context::from(root_object(&chart_meta, &values, release));

    let mut documents = Vec::new();
    for path in sorted_files(&dir.join("crds"))? {
        if !is_manifest(&path) {
            continue;
        }
        let text = read_text(&path)?;
        let source = format!("{chart_name}/crds/{}", file_name(&path));
        documents.extend(split_documents(&text).into_iter().map(|text| Document {
            source: source.clone(),
            text,
        }));
    }

    let templates_dir = dir.join("templates");
    let templates = sorted_files(&templates_dir)?;
    let partials: Vec<(String, String)> = templates
        .iter()
        .filter(|p| file_name(p).starts_with('_'))
        .map(|p| Ok((file_name(p), read_text(p)?)))
        .collect::<Result<_, RenderError>>()?;
    for path in &templates {
        let name = file_name(path);
        if name.starts_with('_') || !is_manifest(path) {
            continue;
        }
        let source = format!("{chart_name}/templates/{name}");
        let rendered = render_template(&source, &read_text(path)?, &partials, &context)?;
        documents.extend(split_documents(&rendered).into_iter().map(|text| Document {
            source: source.clone(),
            text,
        }));
    }
    Ok(documents)
}

/// The plain manifests: the chart rendered with its default values for [`Release::default`],
/// with the chart's labelled Namespace (`namespace.create`), and ordered so that
/// `kubectl apply -f` creates what others depend on first.
pub fn plain_manifests(dir: &Path) -> Result<String, RenderError> {
    let release = Release::default();
    let mut create_namespace = serde_yaml::Mapping::new();
    create_namespace.insert("create".into(), true.into());
    let mut overrides = serde_yaml::Mapping::new();
    overrides.insert("namespace".into(), create_namespace.into());
    let mut documents = render_chart(dir, &release, Some(&overrides.into()))?;
    // A stable sort keeps template order within one kind.
    documents.sort_by_key(|d| install_rank(d.kind().as_deref()));
    let mut out = String::from(
        "# can-dra, rendered from deploy/helm/can-dra with its default values and namespace.create=true.\n\
         # Regenerate with: CAN_DRA_BLESS=1 cargo test -p can-dra-deploy --test chart\n",
    );
    for doc in &documents {
        out.push_str("---\n");
        out.push_str(&format!("# Source: {}\n", doc.source));
        out.push_str(doc.text.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// Creation order for `kubectl apply`: the order Helm installs kinds in, then everything else.
fn install_rank(kind: Option<&str>) -> usize {
    const ORDER: &[&str] = &[
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "DaemonSet",
        "Deployment",
    ];
    kind.and_then(|k| ORDER.iter().position(|o| *o == k))
        .unwrap_or(ORDER.len())
}

fn render_template(
    source: &str,
    text: &str,
    partials: &[(String, String)],
    context: &Context,
) -> Result<String, RenderError> {
    let fail = |message: String| RenderError::Template {
        template: source.to_owned(),
        message,
    };
    let mut template = Template::with_name(source);
    template.add_func("quote", quote);
    template.add_func("indent", indent);
    template.add_func("nindent", nindent);
    for (name, partial) in partials {
        template
            .add_template(name.as_str(), partial.as_str())
            .map_err(|e| fail(format!("{name}: {e}")))?;
    }
    template.parse(text).map_err(|e| fail(e.to_string()))?;
    template.render(context).map_err(|e| fail(e.to_string()))
}

/// `.Values`, `.Release` and `.Chart` as Helm names them.
fn root_object(chart: &serde_yaml::Value, values: &serde_yaml::Value, release: &Release) -> Value {
    let text = |key: &str| {
        chart
            .get(key)
            .map(to_template_value)
            .unwrap_or(Value::NoValue)
    };
    let chart_object = HashMap::from([
        ("Name".to_owned(), text("name")),
        ("Version".to_owned(), text("version")),
        ("AppVersion".to_owned(), text("appVersion")),
    ]);
    let release_object = HashMap::from([
        ("Name".to_owned(), Value::from(release.name.clone())),
        (
            "Namespace".to_owned(),
            Value::from(release.namespace.clone()),
        ),
        ("Service".to_owned(), Value::from("Helm")),
    ]);
    Value::Object(HashMap::from([
        ("Values".to_owned(), to_template_value(values)),
        ("Release".to_owned(), Value::Object(release_object)),
        ("Chart".to_owned(), Value::Object(chart_object)),
    ]))
}

fn to_template_value(value: &serde_yaml::Value) -> Value {
    match value {
        serde_yaml::Value::Null => Value::Nil,
        serde_yaml::Value::Bool(b) => Value::Bool(*b),
        serde_yaml::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_yaml::Value::String(s) => Value::from(s.clone()),
        serde_yaml::Value::Sequence(items) => {
            Value::Array(items.iter().map(to_template_value).collect())
        }
        // A Map (not an Object) reads a missing key as "no value", as Go does for Helm's values.
        serde_yaml::Value::Mapping(map) => Value::Map(
            map.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), to_template_value(v))))
                .collect(),
        ),
        serde_yaml::Value::Tagged(tagged) => to_template_value(&tagged.value),
    }
}

/// Helm's merge of user values over chart defaults: mappings merge key by key, anything else is
/// replaced.
fn merge_values(base: &mut serde_yaml::Value, overrides: &serde_yaml::Value) {
    match (base, overrides) {
        (serde_yaml::Value::Mapping(base), serde_yaml::Value::Mapping(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(key) {
                    Some(existing) => merge_values(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overrides) => *base = overrides.clone(),
    }
}

/// Helm's `quote`: the argument in double quotes, with quotes and backslashes escaped.
fn quote(args: &[Value]) -> Result<Value, FuncError> {
    let parts: Vec<String> = args
        .iter()
        .map(|arg| {
            let text = match arg {
                Value::Nil | Value::NoValue => String::new(),
                other => other.to_string(),
            };
            let mut quoted = String::from("\"");
            for c in text.chars() {
                match c {
                    '"' => quoted.push_str("\\\""),
                    '\\' => quoted.push_str("\\\\"),
                    '\n' => quoted.push_str("\\n"),
                    '\t' => quoted.push_str("\\t"),
                    c => quoted.push(c),
                }
            }
            quoted.push('"');
            quoted
        })
        .collect();
    Ok(Value::from(parts.join(" ")))
}

/// Helm's `indent N text`: every line of `text` prefixed by N spaces.
fn indent(args: &[Value]) -> Result<Value, FuncError> {
    let (width, text) = indent_args("indent", args)?;
    let pad = " ".repeat(width);
    Ok(Value::from(format!(
        "{pad}{}",
        text.replace('\n', &format!("\n{pad}"))
    )))
}

/// Helm's `nindent N text`: a newline, then `indent N text`.
fn nindent(args: &[Value]) -> Result<Value, FuncError> {
    let indented = indent(args)?;
    Ok(Value::from(format!("\n{indented}")))
}

fn indent_args(name: &str, args: &[Value]) -> Result<(usize, String), FuncError> {
    match args {
        [Value::Number(n), text] => {
            let width = n
                .as_u64()
                .and_then(|w| usize::try_from(w).ok())
                .ok_or_else(|| FuncError::Generic(format!("{name}: bad width {n}")))?;
            Ok((width, text.to_string()))
        }
        _ => Err(FuncError::Generic(format!(
            "{name} takes a width and a string"
        ))),
    }
}

fn read_text(path: &Path) -> Result<String, RenderError> {
    fs::read_to_string(path).map_err(|source| RenderError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_yaml(path: &Path) -> Result<serde_yaml::Value, RenderError> {
    serde_yaml::from_str(&read_text(path)?).map_err(|e| RenderError::Yaml {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The files of `dir` by name; a missing directory has none (a chart need not have `crds/`).
fn sorted_files(dir: &Path) -> Result<Vec<PathBuf>, RenderError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RenderError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| RenderError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(text: &str, values: &str) -> String {
        let values: serde_yaml::Value = serde_yaml::from_str(values).unwrap();
        let context = Context::from(root_object(
            &serde_yaml::from_str("name: c").unwrap(),
            &values,
            &Release::default(),
        ));
        render_template("t", text, &[], &context).unwrap()
    }

    #[test]
    fn renders_values_release_and_helm_functions() {
        let out = render(
            "n: {{ .Release.Namespace }}\nr: {{ .Values.replicas }}\nq: {{ .Values.name | quote }}\ncfg: |{{ .Values.cfg | nindent 2 }}",
            "replicas: 2\nname: a\"b\ncfg: |\n  x: 1\n  y: 2\n",
        );
        assert_eq!(
            out,
            "n: can-dra\nr: 2\nq: \"a\\\"b\"\ncfg: |\n  x: 1\n  y: 2\n  "
        );
    }

    #[test]
    fn user_values_merge_into_defaults_key_by_key() {
        let mut base: serde_yaml::Value =
            serde_yaml::from_str("image: {tag: a, repo: r}\nlist: [1, 2]").unwrap();
        let over: serde_yaml::Value = serde_yaml::from_str("image: {tag: b}\nlist: [3]").unwrap();
        merge_values(&mut base, &over);
        let expected: serde_yaml::Value =
            serde_yaml::from_str("image: {tag: b, repo: r}\nlist: [3]").unwrap();
        assert_eq!(base, expected);
    }

    #[test]
    fn missing_template_function_is_an_error_naming_the_template() {
        let values = serde_yaml::Value::Null;
        let context = Context::from(root_object(&values, &values, &Release::default()));
        let err = render_template("t.yaml", "{{ toYaml .Values }}", &[], &context).unwrap_err();
        assert!(err.to_string().starts_with("template t.yaml:"), "{err}");
    }
}
