//! The README is the reference users copy from, so it must say what the code does:
//! - its MemberConfig, NodeConfig and CanBus tables cover every field of the types, as the types'
//!   own deserialisers (and the CRD schema) report them, and document no field that does not exist;
//! - its device attribute table covers every attribute the node daemon and the controller publish,
//!   computed by their publishing code for sample inventories and buses, with the right types;
//! - its selectors (attribute examples and claims) evaluate without error on those devices and
//!   select some of them;
//! - every document it shows is valid: claim parameters and node configurations pass the `api`
//!   validation, Kubernetes objects deserialise into their types with no unknown field; and the
//!   parser errors it shows are the parser's.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use can_dra_api::{API_VERSION, ConfigError, MemberConfig, NodeConfig};
use can_dra_deploy::{Document, split_documents};
use common::{DRIVER, sample_devices};
use k8s_openapi::api::resource::v1::DeviceAttribute;
use serde_json::{Value, json};

const README: &str = include_str!("../../README.md");

// ---------------------------------------------------------------------------------------------
// Reading the README

/// A table of the README, under the heading it belongs to.
struct Table {
    heading: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// The cell of `row` in the column titled `column`.
    fn cell<'a>(&self, row: &'a [String], column: &str) -> &'a str {
        let index = self
            .header
            .iter()
            .position(|h| h == column)
            .unwrap_or_else(|| panic!("table {:?} has no column {column:?}", self.heading));
        row.get(index).map_or("", String::as_str)
    }
}

/// The cells of a table line.
fn cells(line: &str) -> Vec<String> {
    // `\|` is a literal bar inside a cell.
    let line = line.trim().trim_start_matches('|').trim_end_matches('|');
    line.replace("\\|", "\u{0}")
        .split('|')
        .map(|c| c.trim().replace('\u{0}', "|"))
        .collect()
}

/// Every table of `text`, outside code blocks.
fn tables(text: &str) -> Vec<Table> {
    let mut out: Vec<Table> = Vec::new();
    let mut heading = String::new();
    let mut in_code = false;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_owned();
        } else if line.starts_with('|') && lines.peek().is_some_and(|l| l.starts_with("|---")) {
            lines.next();
            let mut rows = Vec::new();
            while let Some(row) = lines.next_if(|l| l.starts_with('|')) {
                rows.push(cells(row));
            }
            out.push(Table {
                heading: heading.clone(),
                header: cells(line),
                rows,
            });
        }
    }
    out
}

/// The one table under `heading`.
fn table<'a>(all: &'a [Table], heading: &str) -> &'a Table {
    let found: Vec<&Table> = all.iter().filter(|t| t.heading == heading).collect();
    assert_eq!(found.len(), 1, "README: one table under {heading:?}");
    found[0]
}

/// The `code spans` of a cell, in order.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The contents of every code block of `text` in language `lang`, without the indentation of
/// its fence (blocks inside list items are indented).
fn code_blocks(text: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut current {
            Some((_, block)) if trimmed.starts_with("```") => {
                out.push(std::mem::take(block));
                current = None;
            }
            Some((fence, block)) => {
                block.push_str(&line[indent.min(*fence)..]);
                block.push('\n');
            }
            None => {
                if trimmed
                    .strip_prefix("```")
                    .is_some_and(|info| info.trim() == lang)
                {
                    current = Some((indent, String::new()));
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The fields of the types

/// The field paths of a document type (`shaping.rx.loss`, `receiveFilters[].id`): the leaves
/// with their enum values (if any), and the objects and lists of objects above them.
#[derive(Debug, Default)]
struct Fields {
    leaves: BTreeMap<String, Vec<String>>,
    containers: BTreeSet<String>,
}

/// A step into a document: a key, or the first element of a list.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    First,
}

/// The name of a field no type has; asking for it makes serde list the fields that exist.
const PROBE: &str = "probeField";

/// A copy of `base` with `value` at `at`; an object value at an existing object is merged in.
fn with_value(base: &Value, at: &[Step], value: Value) -> Value {
    let mut doc = base.clone();
    let mut cursor = &mut doc;
    for step in at {
        cursor = match step {
            Step::Key(key) => {
                if !cursor.is_object() {
                    *cursor = json!({});
                }
                cursor
                    .as_object_mut()
                    .unwrap()
                    .entry(key.clone())
                    .or_insert(Value::Null)
            }
            Step::First => {
                *cursor = json!([null]);
                &mut cursor[0]
            }
        };
    }
    match (cursor.as_object_mut(), value) {
        (Some(existing), Value::Object(extra)) => existing.extend(extra),
        (_, value) => *cursor = value,
    }
    doc
}

/// The path as errors name it (`receiveFilters[0].id`) or as the README does (`receiveFilters[].id`).
fn path_of(at: &[Step], index: &str) -> String {
    let mut out = String::new();
    for step in at {
        match step {
            Step::Key(key) if out.is_empty() => out.push_str(key),
            Step::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
            Step::First => out.push_str(index),
        }
    }
    out
}

/// The names in backticks of a serde message, except the probe's own.
fn listed_names(message: &str) -> Vec<String> {
    code_spans(message)
        .into_iter()
        .filter(|n| n != PROBE)
        .collect()
}

/// Whether the value at `at` is an object that refuses unknown fields (a struct of the type).
fn struct_fields(
    parse: &dyn Fn(&Value) -> Result<(), ConfigError>,
    base: &Value,
    at: &[Step],
) -> Option<Vec<String>> {
    let error = parse(&with_value(base, at, json!({ PROBE: 0 }))).err()?;
    // The error names the unknown field itself.
    let mut probe = at.to_vec();
    probe.push(Step::Key(PROBE.to_owned()));
    (error.field() == path_of(&probe, "[0]") && error.message().starts_with("unknown field"))
        .then(|| listed_names(error.message()))
}

/// Walks a document type through its deserialiser: at each struct, an unknown field makes serde
/// list the known ones; each is then tried as a struct, a list of structs and an enum.
fn walk(
    parse: &dyn Fn(&Value) -> Result<(), ConfigError>,
    base: &Value,
    at: &[Step],
    names: Vec<String>,
    fields: &mut Fields,
) {
    assert!(
        !names.is_empty(),
        "no fields listed at {:?}",
        path_of(at, "[0]")
    );
    for name in names {
        let mut here = at.to_vec();
        here.push(Step::Key(name));
        let mut first = here.clone();
        first.push(Step::First);
        if let Some(inner) = struct_fields(parse, base, &here) {
            fields.containers.insert(path_of(&here, "[]"));
            walk(parse, base, &here, inner, fields);
        } else if let Some(inner) = struct_fields(parse, base, &first) {
            fields.containers.insert(path_of(&here, "[]"));
            walk(parse, base, &first, inner, fields);
        } else {
            let variants = match parse(&with_value(base, &here, json!(PROBE))) {
                Err(e)
                    if e.field() == path_of(&here, "[0]")
                        && e.message().starts_with("unknown variant") =>
                {
                    listed_names(e.message())
                }
                _ => Vec::new(),
            };
            fields.leaves.insert(path_of(&here, "[]"), variants);
        }
    }
}

fn document_fields(kind: &str, parse: &dyn Fn(&Value) -> Result<(), ConfigError>) -> Fields {
    let base = json!({"apiVersion": API_VERSION, "kind": kind});
    let mut fields = Fields::default();
    let top = struct_fields(parse, &base, &[]).expect("the document refuses unknown fields");
    walk(parse, &base, &[], top, &mut fields);
    fields
}

fn member_config_fields() -> Fields {
    document_fields("MemberConfig", &|doc| {
        MemberConfig::from_json_value(doc).map(drop)
    })
}

fn node_config_fields() -> Fields {
    document_fields("NodeConfig", &|doc| {
        NodeConfig::from_yaml_str(&serde_yaml::to_string(doc).unwrap()).map(drop)
    })
}

/// The fields of `CanBus.spec`, from the CRD's structural schema (generated from the type).
fn canbus_spec_fields() -> Fields {
    fn visit(schema: &Value, prefix: &str, fields: &mut Fields) {
        for (name, property) in schema["properties"].as_object().into_iter().flatten() {
            let here = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            if property["properties"].is_object() {
                fields.containers.insert(here.clone());
                visit(property, &here, fields);
            } else if property["items"]["properties"].is_object() {
                fields.containers.insert(here.clone());
                visit(&property["items"], &format!("{here}[]"), fields);
            } else {
                let variants = property["enum"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                fields.leaves.insert(here, variants);
            }
        }
    }
    let crd: serde_yaml::Value =
        serde_yaml::from_str(&can_dra_cluster::canbus::crd_yaml().unwrap()).unwrap();
    let crd = serde_json::to_value(crd).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut fields = Fields::default();
    visit(spec, "", &mut fields);
    fields
}

/// What the README documents under `headings`: each table's rows name fields relative to the
/// object paths given with its heading, each with a type, default, rules and an example.
/// Returns path -> the row's Type cell.
fn documented(all: &[Table], headings: &[(&str, &[&str])]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (heading, objects) in headings {
        let table = table(all, heading);
        for row in &table.rows {
            for column in ["Type", "Default", "Rules", "Example"] {
                assert!(
                    !table.cell(row, column).is_empty(),
                    "{heading}: {column} missing in {row:?}"
                );
            }
            let name = code_spans(table.cell(row, "Field"))
                .into_iter()
                .next()
                .unwrap_or_else(|| panic!("{heading}: a row without a field name: {row:?}"));
            for object in *objects {
                let path = if object.is_empty() {
                    name.clone()
                } else {
                    format!("{object}.{name}")
                };
                let previous = out.insert(path.clone(), table.cell(row, "Type").to_owned());
                assert!(previous.is_none(), "{path} is documented twice");
            }
        }
    }
    out
}

/// Fields missing from the README, rows for fields that do not exist, and enum values a row
/// does not list. A row whose type is a Kubernetes type (`core/v1 ...`) covers its sub-fields.
fn coverage_problems(fields: &Fields, rows: &BTreeMap<String, String>) -> Vec<String> {
    let kubernetes_types: Vec<&String> = rows
        .iter()
        .filter(|(_, ty)| ty.contains("core/v1"))
        .map(|(path, _)| path)
        .collect();
    let below = |path: &str, parent: &str| {
        path.starts_with(&format!("{parent}.")) || path.starts_with(&format!("{parent}[]"))
    };
    let covered =
        |path: &str| rows.contains_key(path) || kubernetes_types.iter().any(|k| below(path, k));
    let mut problems = Vec::new();
    for (leaf, variants) in &fields.leaves {
        if !covered(leaf) {
            problems.push(format!("{leaf}: not documented"));
        } else if let Some(ty) = rows.get(leaf) {
            let listed = code_spans(ty);
            for variant in variants.iter().filter(|v| !listed.contains(v)) {
                problems.push(format!("{leaf}: value `{variant}` missing from its type"));
            }
        }
    }
    for container in &fields.containers {
        if !covered(container) && !rows.keys().any(|r| below(r, container)) {
            problems.push(format!("{container}: not documented"));
        }
    }
    for row in rows.keys() {
        if !fields.leaves.contains_key(row) && !fields.containers.contains(row) {
            problems.push(format!("{row}: documented, but the type has no such field"));
        }
    }
    problems
}

const MEMBER_TABLES: &[(&str, &[&str])] = &[
    ("MemberConfig", &[""]),
    ("Filter", &["receiveFilters[]", "transmitAllow[]"]),
    ("Shaping direction", &["shaping.rx", "shaping.tx"]),
];
const NODE_TABLES: &[(&str, &[&str])] = &[("NodeConfig", &[""])];
const CANBUS_TABLES: &[(&str, &[&str])] = &[("CanBus spec", &[""])];

fn assert_covered(fields: &Fields, headings: &[(&str, &[&str])]) {
    let rows = documented(&tables(README), headings);
    let problems = coverage_problems(fields, &rows);
    assert!(
        problems.is_empty(),
        "README.md, tables {:?}:\n{}",
        headings.iter().map(|h| h.0).collect::<Vec<_>>(),
        problems.join("\n")
    );
}

#[test]
fn the_walk_finds_nested_fields_and_enum_values() {
    // The walk must reach every level, or the coverage checks below would prove nothing.
    let member = member_config_fields();
    assert!(
        member.leaves.contains_key("shaping.tx.jitter"),
        "{member:?}"
    );
    assert!(member.leaves.contains_key("transmitAllow[].invert"));
    assert!(member.containers.contains("receiveFilters"));
    assert_eq!(member.leaves["access"], ["readWrite", "listenOnly"]);
    let node = node_config_fields();
    assert!(
        node.leaves.contains_key("virtualBuses[].dataBitrate"),
        "{node:?}"
    );
    assert!(node.leaves.contains_key("physical.exclude"));
    let bus = canbus_spec_fields();
    assert!(bus.leaves.contains_key("physical[].interface"), "{bus:?}");
    assert!(bus.containers.contains("nodeSelector"));
}

#[test]
fn claim_parameter_reference_covers_every_member_config_field() {
    assert_covered(&member_config_fields(), MEMBER_TABLES);
}

#[test]
fn node_configuration_reference_covers_every_node_config_field() {
    assert_covered(&node_config_fields(), NODE_TABLES);
}

#[test]
fn canbus_reference_covers_every_spec_field() {
    assert_covered(&canbus_spec_fields(), CANBUS_TABLES);
}

#[test]
fn the_coverage_check_sees_a_missing_and_a_stale_row() {
    let edited: String = README
        .lines()
        .filter(|l| !l.starts_with("| `jitter` |"))
        .map(|l| {
            if l.starts_with("| `invert` |") {
                format!("{l}\n| `priority` | int | `0` | none | `1` |")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let rows = documented(&tables(&edited), MEMBER_TABLES);
    let problems = coverage_problems(&member_config_fields(), &rows);
    for expected in [
        "shaping.rx.jitter: not documented",
        "shaping.tx.jitter: not documented",
        "receiveFilters[].priority: documented, but the type has no such field",
    ] {
        assert!(problems.iter().any(|p| p == expected), "{problems:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Device attributes

fn attribute_type(attribute: &DeviceAttribute) -> &'static str {
    match attribute {
        DeviceAttribute { int: Some(_), .. } => "int",
        DeviceAttribute { bool: Some(_), .. } => "bool",
        DeviceAttribute {
            string: Some(_), ..
        } => "string",
        DeviceAttribute {
            version: Some(_), ..
        } => "version",
        other => panic!("an attribute without a value: {other:?}"),
    }
}

/// Every attribute (and capacity) published: name -> (type, where).
fn published() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for (source, device) in sample_devices() {
        let attributes = device.attributes.iter().flatten();
        let attributes = attributes.map(|(n, a)| (n.clone(), attribute_type(a).to_owned()));
        let capacities = device.capacity.iter().flatten();
        let capacities = capacities.map(|(n, _)| (n.clone(), "capacity".to_owned()));
        for (name, ty) in attributes.chain(capacities) {
            let entry = out
                .entry(name.clone())
                .or_insert((ty.clone(), BTreeSet::new()));
            assert_eq!(entry.0, ty, "{name} is published with two types");
            entry.1.insert(source.to_owned());
        }
    }
    out
}

/// The README's attribute table: name -> (type, where, example selector).
fn attribute_rows() -> BTreeMap<String, (String, BTreeSet<String>, String)> {
    let all = tables(README);
    let table = table(&all, "Device attributes");
    table
        .rows
        .iter()
        .map(|row| {
            let name = code_spans(table.cell(row, "Attribute")).remove(0);
            let on = table
                .cell(row, "On")
                .split(',')
                .map(|s| s.trim().to_owned())
                .collect();
            let example = code_spans(table.cell(row, "Example selector"))
                .into_iter()
                .next()
                .unwrap_or_default();
            (name, (table.cell(row, "Type").to_owned(), on, example))
        })
        .collect()
}

#[test]
fn attribute_reference_covers_every_published_attribute() {
    let published = published();
    let rows = attribute_rows();
    assert!(published.len() >= 9, "{published:?}");
    for (name, (ty, sources)) in &published {
        let (row_type, row_sources, _) = rows
            .get(name)
            .unwrap_or_else(|| panic!("README: attribute {name} ({ty}) is not documented"));
        assert_eq!(row_type, ty, "README: type of attribute {name}");
        assert_eq!(row_sources, sources, "README: which devices carry {name}");
    }
    for name in rows.keys() {
        assert!(
            published.contains_key(name),
            "README documents attribute {name}, which nothing publishes"
        );
    }
}

#[test]
fn example_selectors_evaluate_on_every_device_and_select_some() {
    for (name, (_, _, example)) in attribute_rows() {
        assert_selects_some(&example, &format!("README: selector of {name}"));
    }
}

// ---------------------------------------------------------------------------------------------
// The documents shown

#[test]
fn every_document_in_the_readme_is_valid() {
    let mut kinds = BTreeMap::<String, usize>::new();
    let blocks = code_blocks(README, "yaml")
        .into_iter()
        .chain(code_blocks(README, "json"));
    for (block_index, block) in blocks.enumerate() {
        for text in split_documents(&block) {
            let doc = Document {
                source: format!("README.md, block {block_index}"),
                text: text.clone(),
            };
            let object = common::to_json(&doc);
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "MemberConfig" => {
                    MemberConfig::from_json_value(&object)
                        .and_then(|c| c.resolve(0))
                        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", doc.source));
                }
                "NodeConfig" => {
                    NodeConfig::from_yaml_str(&text)
                        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", doc.source));
                }
                _ => {
                    common::check_object(&doc);
                    for parameters in common::opaque_parameters(&object, DRIVER) {
                        MemberConfig::from_json_value(parameters)
                            .and_then(|c| c.resolve(0))
                            .unwrap_or_else(|e| panic!("{}: {kind}: {e}", doc.source));
                        *kinds.entry("parameters".into()).or_default() += 1;
                    }
                }
            }
            *kinds.entry(kind).or_default() += 1;
        }
    }
    // The examples the README promises are there, and were checked.
    for kind in [
        "MemberConfig",
        "NodeConfig",
        "CanBus",
        "ResourceClaimTemplate",
        "Pod",
        "parameters",
    ] {
        assert!(
            kinds.contains_key(kind),
            "no {kind} checked in README: {kinds:?}"
        );
    }
}

/// Evaluates `expression` on every sample device: it must never fail, and must select one.
fn assert_selects_some(expression: &str, what: &str) {
    let devices = common::sample_devices();
    let mut selected = 0;
    for (source, device) in &devices {
        // The scheduler takes a CEL error (such as a missing attribute) as an error, not as a
        // plain no: what the README shows must not cause one.
        match common::select(expression, device) {
            Ok(true) => selected += 1,
            Ok(false) => {}
            Err(error) => panic!(
                "{what} on {source} device {}: {expression}: {error}",
                device.name
            ),
        }
    }
    assert!(
        selected > 0,
        "{what} selects no sample device: {expression}"
    );
}

#[test]
fn the_selectors_of_the_readme_claims_evaluate_on_published_devices() {
    let mut checked = 0;
    for block in code_blocks(README, "yaml") {
        for text in split_documents(&block) {
            let object: Value =
                serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap())
                    .unwrap();
            let requests = object["spec"]["spec"]["devices"]["requests"]
                .as_array()
                .into_iter()
                .chain(object["spec"]["devices"]["requests"].as_array())
                .flatten();
            for request in requests {
                for selector in request["exactly"]["selectors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let expression = selector["cel"]["expression"].as_str().unwrap();
                    assert_selects_some(expression, "README: a claim's selector");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 0, "no claim selector found in README");
}

#[test]
fn the_error_examples_are_what_the_parser_says() {
    // The README shows these errors without their input; these are the inputs.
    let inputs = [
        json!({"shaping": {"rx": {"lossy": "1%"}}}),
        json!({"shaping": {"rx": {"loss": "120%"}}}),
        json!({"receiveFilters": [{"id": 1}, {"id": 2}, {"id": "0x800"}]}),
        json!({"interfaceName": "eth0/1"}),
    ];
    let errors: Vec<String> = inputs
        .into_iter()
        .map(|mut doc| {
            doc["apiVersion"] = json!(API_VERSION);
            doc["kind"] = json!("MemberConfig");
            MemberConfig::from_json_value(&doc).unwrap_err().to_string()
        })
        .collect();
    let shown = code_blocks(README, "text")
        .into_iter()
        .find(|b| b.contains("120% is above 100%"))
        .expect("README shows the parser's errors");
    assert_eq!(shown.lines().collect::<Vec<_>>(), errors);
}

#[test]
fn the_first_claim_selects_a_bus_the_node_configuration_offers() {
    // The first claim selects the bus `body`; the NodeConfig example must offer it.
    let node = code_blocks(README, "yaml")
        .into_iter()
        .find(|b| b.contains("kind: NodeConfig"))
        .unwrap();
    let node = NodeConfig::from_yaml_str(&node).unwrap();
    assert!(node.virtual_buses.iter().any(|b| b.name == "body"));
    assert!(README.contains(r#"expression: device.attributes["can.dra.dev"].bus == "body""#));
}

#[test]
fn the_claim_parameter_reference_states_the_real_limits() {
    let row = |field: &str| {
        README
            .lines()
            .find(|line| line.starts_with(&format!("| `{field}` | ")))
            .unwrap_or_else(|| panic!("no README row for {field}"))
    };
    let delay = can_dra_api::TimeSpan::from(can_dra_api::MAX_DELAY).to_string();
    assert!(
        row("delay").contains(&format!("`{delay}`")),
        "{}",
        row("delay")
    );
    let jitter = can_dra_api::TimeSpan::from(can_dra_api::MAX_JITTER).to_string();
    assert!(
        row("jitter").contains(&format!("`{jitter}`")),
        "{}",
        row("jitter")
    );
    for prefix in can_dra_api::RESERVED_INTERFACE_PREFIXES {
        assert!(
            row("interfaceName").contains(&format!("`{prefix}`")),
            "{prefix}: {}",
            row("interfaceName")
        );
    }
}
