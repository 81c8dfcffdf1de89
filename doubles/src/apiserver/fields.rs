//! Field selectors of the API server double: the field labels each resource may select on, as
//! kube-apiserver converts them, the parsed terms, and matching them against an object. Lists
//! (the store) and watches (the event log) filter with them.

use serde_json::Value;

use super::failure::Failure;

/// One `key=value` (or `key!=value`) term of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldTerm {
    pub(crate) field: String,
    pub(crate) value: String,
    pub(crate) equal: bool,
}

/// How kube-apiserver words the refusal of a field label, which depends on where the resource's
/// field label conversion lives.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// `field label not supported: <label>`: core/v1 kinds (`pkg/apis/core/v1/conversion.go`
    /// `addConversionFuncs`) and custom resources (apiextensions-apiserver
    /// `pkg/apiserver/conversion/converter.go` `crConverter.ConvertFieldLabel`).
    Plain,
    /// `field label not supported for <group/version, Kind=kind>: <label>`: resource.k8s.io/v1
    /// ResourceSlices (`pkg/apis/resource/v1/conversion.go` `addConversionFuncs`).
    ForKind(&'static str),
    /// `"<label>" is not a known field selector: only "metadata.name", "metadata.namespace"`:
    /// kinds without a conversion function of their own (apimachinery `pkg/runtime/conversion.go`
    /// `DefaultMetaV1FieldSelectorConversion`, reached from `Scheme.ConvertFieldLabel`).
    DefaultMeta,
}

/// The field labels a list or watch of one resource may select on, as kube-apiserver converts
/// them before it filters (`handlers/get.go` `ListResource`: a label the conversion refuses is a
/// 400 BadRequest with the conversion's message).
#[derive(Debug)]
pub(crate) struct FieldLabels {
    /// The labels accepted as they are.
    pub(crate) accepted: &'static [&'static str],
    /// Old labels the server rewrites, as (old, current).
    pub(crate) aliases: &'static [(&'static str, &'static str)],
    pub(crate) refusal: Refusal,
}

impl FieldLabels {
    /// The label a selector term selects on, or the 400 kube-apiserver answers.
    fn convert(&self, label: &str) -> Result<&'static str, Failure> {
        if let Some(known) = self.accepted.iter().find(|known| **known == label) {
            return Ok(known);
        }
        if let Some((_, current)) = self.aliases.iter().find(|(old, _)| *old == label) {
            return Ok(current);
        }
        Err(Failure::bad_request(match self.refusal {
            Refusal::Plain => format!("field label not supported: {label}"),
            Refusal::ForKind(kind) => format!("field label not supported for {kind}: {label}"),
            Refusal::DefaultMeta => format!(
                "{label:?} is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
            ),
        }))
    }
}

/// ResourceSlices: `pkg/apis/resource/v1/conversion.go` `addConversionFuncs`.
pub(crate) const SLICE_FIELDS: FieldLabels = FieldLabels {
    accepted: &["metadata.name", "spec.nodeName", "spec.driver"],
    aliases: &[],
    refusal: Refusal::ForKind("resource.k8s.io/v1, Kind=ResourceSlice"),
};

/// Kinds without a field label conversion of their own (ResourceClaims, Leases):
/// `DefaultMetaV1FieldSelectorConversion`.
pub(crate) const META_FIELDS: FieldLabels = FieldLabels {
    accepted: &["metadata.name", "metadata.namespace"],
    aliases: &[],
    refusal: Refusal::DefaultMeta,
};

/// Nodes: `pkg/apis/core/v1/conversion.go` `addConversionFuncs`.
pub(crate) const NODE_FIELDS: FieldLabels = FieldLabels {
    accepted: &["metadata.name", "spec.unschedulable"],
    aliases: &[],
    refusal: Refusal::Plain,
};

/// Pods: `pkg/apis/core/v1/conversion.go` `addConversionFuncs` (`spec.host` is the old name of
/// `spec.nodeName`).
pub(crate) const POD_FIELDS: FieldLabels = FieldLabels {
    accepted: &[
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.podIPs",
        "status.nominatedNodeName",
    ],
    aliases: &[("spec.host", "spec.nodeName")],
    refusal: Refusal::Plain,
};

/// A cluster-scoped custom resource without `selectableFields` (CanBus): only `metadata.name`
/// (`crConverter.ConvertFieldLabel`; `metadata.namespace` is for namespaced ones only).
pub(crate) const CLUSTER_CUSTOM_FIELDS: FieldLabels = FieldLabels {
    accepted: &["metadata.name"],
    aliases: &[],
    refusal: Refusal::Plain,
};

/// Parses a field selector such as `spec.nodeName=node-a,spec.driver=can.dra.dev`, accepting only
/// the labels `labels` allows (kube-apiserver refuses the others with 400).
pub(crate) fn parse_field_selector(
    selector: &str,
    labels: &FieldLabels,
) -> Result<Vec<FieldTerm>, Failure> {
    let mut terms = Vec::new();
    for term in selector.split(',').filter(|t| !t.trim().is_empty()) {
        let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
            (f, v, false)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, v, true)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, v, true)
        } else {
            return Err(Failure::bad_request(format!(
                "invalid selector: '{selector}'; can't understand '{term}'"
            )));
        };
        let field = labels.convert(field.trim())?;
        terms.push(FieldTerm {
            field: field.to_owned(),
            value: value.trim().to_owned(),
            equal,
        });
    }
    Ok(terms)
}

/// The value field label `field` has on `object` (JSON), as the resource's `...ToSelectableFields`
/// function computes it: a string field as is (empty when absent), booleans as `true`/`false`
/// (`spec.hostNetwork` and `spec.unschedulable` default to `false`), and the first pod IP for
/// `status.podIP` (`pkg/registry/core/pod/strategy.go` `ToSelectableFields`).
pub(crate) fn field_value(object: &Value, field: &str) -> String {
    let at = |path: &str| {
        path.split('.')
            .try_fold(object, |value, key| value.get(key))
            .cloned()
    };
    match field {
        "spec.hostNetwork" | "spec.unschedulable" => at(field)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
            .to_string(),
        "status.podIP" | "status.podIPs" => object
            .pointer("/status/podIPs/0/ip")
            .or_else(|| object.pointer("/status/podIP"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => match at(field) {
            Some(Value::String(s)) => s,
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        },
    }
}

/// Whether `object` (JSON) satisfies every term.
pub(crate) fn fields_match(terms: &[FieldTerm], object: &Value) -> bool {
    terms
        .iter()
        .all(|t| (field_value(object, &t.field) == t.value) == t.equal)
}
