//! Failed API calls, answered the way kube-apiserver does: an HTTP status plus a `meta/v1` `Status`
//! body whose `reason` and `code` clients such as kube-rs inspect (`is_not_found`, conflicts).

use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use serde_json::json;

/// A failed request: what the double answers instead of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) code: StatusCode,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    /// `details.kind` and `details.name`, when the failure is about one object.
    pub(crate) subject: Option<(String, String)>,
}

impl Failure {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            subject: None,
        }
    }

    fn about(mut self, resource: &str, name: &str) -> Self {
        self.subject = Some((resource.to_owned(), name.to_owned()));
        self
    }

    /// 404 for a path no endpoint serves (same message as kube-apiserver).
    pub(crate) fn unknown_path() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// 404 for a named object that does not exist. `resource` is `plural.group` (`nodes` for core).
    pub(crate) fn not_found(resource: &str, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{resource} {name:?} not found"),
        )
        .about(resource, name)
    }

    /// A failure a test asked for, with the reason kube-apiserver gives that status code.
    pub(crate) fn injected(code: u16) -> Self {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let reason = match code.as_u16() {
            400 => "BadRequest",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Self::new(
            code,
            reason,
            format!("failure injected by the test ({code})"),
        )
    }

    /// 405 for a known resource path and a verb the double does not serve.
    pub(crate) fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({method} {path})"
            ),
        )
    }

    /// 409 for an object that exists already.
    pub(crate) fn already_exists(resource: &str, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{resource} {name:?} already exists"),
        )
        .about(resource, name)
    }

    /// 409 for an update based on a stale `resourceVersion` (optimistic concurrency).
    pub(crate) fn stale(resource: &str, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {resource} {name:?}: the object has been modified; \
                 please apply your changes to the latest version and try again"
            ),
        )
        .about(resource, name)
    }

    /// 409 for a server-side apply that would take fields another manager owns, without `force`.
    pub(crate) fn apply_conflict(resource: &str, name: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Apply failed with 1 conflict: {}", detail.into()),
        )
        .about(resource, name)
    }

    /// 400 for a malformed request (bad JSON, wrong kind, missing query parameter).
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 415 for a PATCH type the double does not implement.
    pub(crate) fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/apply-patch+yaml (got {content_type:?})"
            ),
        )
    }

    /// 422 for an object that breaks a validation rule. `kind` is e.g. `ResourceSlice.resource.k8s.io`.
    pub(crate) fn invalid(kind: &str, name: &str, field: &str, rule: impl Into<String>) -> Self {
        let rule = rule.into();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("{kind} {name:?} is invalid: {field}: {rule}"),
        )
        .about(kind, name)
    }

    /// The `meta/v1` `Status` object of this failure.
    pub(crate) fn status_body(&self) -> serde_json::Value {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some((kind, name)) = &self.subject {
            body["details"] = json!({ "name": name, "kind": kind });
        }
        body
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.code,
            [(header::CONTENT_TYPE, "application/json")],
            self.status_body().to_string(),
        )
            .into_response()
    }
}
