//! Authentication, RBAC and the claim-status authorization of the API server double, opt-in per
//! instance: until a test calls [`ApiServer::enable_rbac`](super::ApiServer::enable_rbac) every
//! request is served and its bearer token only recorded.
//!
//! With RBAC on, every request to a resource path is authenticated and authorized before it is
//! served, rule by rule as kube-apiserver does:
//!
//! - **Authentication** (`staging/src/k8s.io/apiserver/pkg/authentication/request/bearertoken`,
//!   `.../authentication/serviceaccount/util.go` `UserInfo`): a bearer token the test registered
//!   ([`ApiServer::add_token`](super::ApiServer::add_token)) maps to its [`User`]; an unknown token
//!   gets 401 `Unauthorized`; a request without a token is `system:anonymous` in group
//!   `system:unauthenticated`. A ServiceAccount is `system:serviceaccount:<ns>:<name>` in groups
//!   `system:serviceaccounts`, `system:serviceaccounts:<ns>` and `system:authenticated`; a token
//!   bound to a pod also carries the pod's node in the extra
//!   `authentication.kubernetes.io/node-name`.
//! - **Request attributes** (`staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`
//!   `NewRequestInfo`): GET (or HEAD) of an object is `get`, of a collection `list`, or `watch`
//!   with `watch=true`; POST `create`, PUT `update`, PATCH `patch`, DELETE of an object
//!   `delete`, of a collection `deletecollection`. A list or watch whose field selector requires
//!   `metadata.name=<n>` is authorized for the name `<n>`.
//! - **Authorization** (`plugin/pkg/auth/authorizer/rbac/rbac.go` `RBACAuthorizer.Authorize` and
//!   `RuleAllows`; `pkg/registry/rbac/validation/rule.go` `VisitRulesFor` and `appliesToUser`;
//!   `pkg/apis/rbac/v1/evaluation_helpers.go` `VerbMatches`, `APIGroupMatches`, `ResourceMatches`,
//!   `ResourceNameMatches`): the rules of every ClusterRoleBinding's ClusterRole, and in a
//!   namespace those of its RoleBindings' Roles or ClusterRoles, whose subjects name the user, one
//!   of its groups or its ServiceAccount. A request is allowed iff one rule matches its verb (or
//!   `*`), API group (or `*`), resource or `resource/subresource` (or `*`, or `*/subresource`)
//!   and, if the rule lists `resourceNames`, its object name. Group `system:masters` is allowed
//!   everything (the privileged-group authorizer in front of RBAC,
//!   `pkg/kubeapiserver/authorizer/config.go`).
//!   A denied request gets 403 `Forbidden` with the message of
//!   `staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go`
//!   `ForbiddenStatusError`, e.g. `nodes "n" is forbidden: User "system:serviceaccount:a:b" cannot
//!   get resource "nodes" in API group "" at the cluster scope`.
//! - **Claim-status authorization** from Kubernetes 1.36 on
//!   ([`ApiServer::set_minor_version`](super::ApiServer::set_minor_version); feature gate
//!   `DRAResourceClaimGranularStatusAuthorization`, beta and on by default in 1.36;
//!   `pkg/registry/resource/utils.go` `AuthorizedForDeviceStatus`): a write to a claim's status
//!   that adds, removes or changes `status.devices` entries of a driver also needs the verb
//!   `associated-node:<verb>` or `arbitrary-node:<verb>` on the synthetic subresource
//!   `resourceclaims/driver`, in the claim's namespace, with the driver name as the resource
//!   name. `associated-node` is tried first, and only when the allocation's node selector names
//!   exactly one node (`nodeNameFromAllocation`) and the caller is a ServiceAccount whose token
//!   carries exactly that node (`saAssociatedWithAllocatedNode`); otherwise, as for an allocation
//!   from a pool that spans nodes, only `arbitrary-node` counts. Refused writes get 422 `Invalid`
//!   with a `status.devices: Forbidden` cause, as the status strategy's `ValidateUpdate` answers.

use std::collections::{BTreeMap, BTreeSet};

use http::StatusCode;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, AllocationResult, ResourceClaim};

use super::failure::Failure;
use super::validate::is_dns_subdomain;

/// The user-info extra key of a pod-bound ServiceAccount token that names the pod's node
/// (`staging/src/k8s.io/apiserver/pkg/authentication/serviceaccount/util.go` `NodeNameKey`).
pub const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const MASTERS: &str = "system:masters";
const RESOURCE_GROUP: &str = "resource.k8s.io";
/// The minor version from which the double authorizes `status.devices` per driver.
const GRANULAR_STATUS_AUTHORIZATION_SINCE: u32 = 36;
/// The minor version a double starts as.
const DEFAULT_MINOR_VERSION: u32 = 34;

/// Who a request comes from, as an authenticator reports it (`user.Info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user name, e.g. `system:serviceaccount:can-dra:can-dra-kubelet-plugin`.
    pub name: String,
    /// The groups, e.g. `system:serviceaccounts`.
    pub groups: Vec<String>,
    /// The extra attributes, such as [`NODE_NAME_KEY`].
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    /// ServiceAccount `namespace/name`, as its token authenticates it.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            name: format!("{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ],
            extra: BTreeMap::new(),
        }
    }

    /// The same user with the node claim of a token bound to a pod on `node`.
    pub fn on_node(mut self, node: &str) -> Self {
        self.extra
            .insert(NODE_NAME_KEY.to_owned(), vec![node.to_owned()]);
        self
    }

    /// A cluster administrator (group `system:masters`), for a test's own set-up calls.
    pub fn admin() -> Self {
        Self {
            name: "kubernetes-admin".to_owned(),
            groups: vec![MASTERS.to_owned(), "system:authenticated".to_owned()],
            extra: BTreeMap::new(),
        }
    }

    /// A request without credentials.
    pub fn anonymous() -> Self {
        Self {
            name: "system:anonymous".to_owned(),
            groups: vec!["system:unauthenticated".to_owned()],
            extra: BTreeMap::new(),
        }
    }

    /// `namespace` of a ServiceAccount user name (`serviceaccount.SplitUsername`).
    fn service_account_namespace(&self) -> Option<&str> {
        let rest = self.name.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
        let (namespace, name) = rest.split_once(':')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some(namespace)
    }
}

/// Errors reading RBAC objects.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    /// A document is not YAML or not a valid RBAC object.
    #[error("RBAC document {index}: {message}")]
    Document {
        /// The document's position in the stream (from 0).
        index: usize,
        /// What was wrong.
        message: String,
    },
}

/// The RBAC objects the double authorizes with: usually the chart's rendered roles and bindings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RbacPolicy {
    /// ClusterRoles, by their names.
    pub cluster_roles: Vec<ClusterRole>,
    /// Roles, in their namespaces.
    pub roles: Vec<Role>,
    /// ClusterRoleBindings.
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    /// RoleBindings, in their namespaces.
    pub role_bindings: Vec<RoleBinding>,
}

impl RbacPolicy {
    /// The ClusterRoles, Roles and bindings of a multi-document YAML stream, such as
    /// `deploy/manifests/can-dra.yaml`; documents of other kinds are skipped.
    pub fn from_yaml(text: &str) -> Result<Self, RbacError> {
        let mut policy = Self::default();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let fail = |message: String| RbacError::Document { index, message };
            let value: serde_json::Value =
                serde::Deserialize::deserialize(document).map_err(|e| fail(e.to_string()))?;
            let kind = value.get("kind").and_then(serde_json::Value::as_str);
            let added = match kind {
                Some("ClusterRole") => decode_into(value, &mut policy.cluster_roles),
                Some("Role") => decode_into(value, &mut policy.roles),
                Some("ClusterRoleBinding") => decode_into(value, &mut policy.cluster_role_bindings),
                Some("RoleBinding") => decode_into(value, &mut policy.role_bindings),
                _ => Ok(()),
            };
            added.map_err(|e| fail(e.to_string()))?;
        }
        Ok(policy)
    }

    /// The rules `role_ref` names, for a binding in `namespace` (`None`: a ClusterRoleBinding).
    fn rules_of(&self, role_ref: &RoleRef, namespace: Option<&str>) -> &[PolicyRule] {
        let rules = match (role_ref.kind.as_str(), namespace) {
            ("ClusterRole", _) => self
                .cluster_roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(role_ref.name.as_str()))
                .and_then(|r| r.rules.as_deref()),
            ("Role", Some(namespace)) => self
                .roles
                .iter()
                .find(|r| {
                    r.metadata.name.as_deref() == Some(role_ref.name.as_str())
                        && r.metadata.namespace.as_deref() == Some(namespace)
                })
                .and_then(|r| r.rules.as_deref()),
            _ => None,
        };
        rules.unwrap_or_default()
    }

    /// `RBACAuthorizer.Authorize`: whether a rule bound to the user allows the request.
    fn allows(&self, request: &Attributes<'_>) -> bool {
        let rules_allow =
            |rules: &[PolicyRule]| rules.iter().any(|rule| rule_allows(request, rule));
        let cluster_wide = self.cluster_role_bindings.iter().any(|binding| {
            applies_to(binding.subjects.as_deref(), request.user, "")
                && rules_allow(self.rules_of(&binding.role_ref, None))
        });
        let in_namespace = request.namespace.is_some_and(|namespace| {
            self.role_bindings.iter().any(|binding| {
                binding.metadata.namespace.as_deref() == Some(namespace)
                    && applies_to(binding.subjects.as_deref(), request.user, namespace)
                    && rules_allow(self.rules_of(&binding.role_ref, Some(namespace)))
            })
        });
        cluster_wide || in_namespace
    }
}

fn decode_into<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    into: &mut Vec<T>,
) -> Result<(), serde_json::Error> {
    into.push(serde_json::from_value(value)?);
    Ok(())
}

/// `appliesToUser` for any of `subjects`; `namespace` defaults a ServiceAccount subject's.
fn applies_to(subjects: Option<&[Subject]>, user: &User, namespace: &str) -> bool {
    subjects
        .unwrap_or_default()
        .iter()
        .any(|subject| match subject.kind.as_str() {
            "User" => user.name == subject.name,
            "Group" => user.groups.contains(&subject.name),
            "ServiceAccount" => {
                let account_namespace = subject
                    .namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or(namespace);
                !account_namespace.is_empty()
                    && user.name
                        == format!(
                            "{SERVICE_ACCOUNT_PREFIX}{account_namespace}:{}",
                            subject.name
                        )
            }
            _ => false,
        })
}

/// `RuleAllows` for a resource request.
fn rule_allows(request: &Attributes<'_>, rule: &PolicyRule) -> bool {
    let combined = match request.subresource {
        Some(sub) => format!("{}/{sub}", request.resource),
        None => request.resource.to_owned(),
    };
    verb_matches(rule, &request.verb)
        && api_group_matches(rule, request.api_group)
        && resource_matches(rule, &combined, request.subresource)
        && resource_name_matches(rule, request.name.as_deref().unwrap_or_default())
}

/// `VerbMatches`.
fn verb_matches(rule: &PolicyRule, verb: &str) -> bool {
    rule.verbs.iter().any(|v| v == "*" || v == verb)
}

/// `APIGroupMatches`.
fn api_group_matches(rule: &PolicyRule, group: &str) -> bool {
    rule.api_groups
        .iter()
        .flatten()
        .any(|g| g == "*" || g == group)
}

/// `ResourceMatches`: `*`, the exact `resource[/subresource]`, or `*/<subresource>`.
fn resource_matches(rule: &PolicyRule, combined: &str, subresource: Option<&str>) -> bool {
    rule.resources.iter().flatten().any(|r| {
        r == "*"
            || r == combined
            || subresource.is_some_and(|sub| r.strip_prefix("*/") == Some(sub))
    })
}

/// `ResourceNameMatches`: a rule without `resourceNames` matches every name.
fn resource_name_matches(rule: &PolicyRule, name: &str) -> bool {
    match rule.resource_names.as_deref() {
        None | Some([]) => true,
        Some(names) => names.iter().any(|n| n == name),
    }
}

/// The attributes a resource request is authorized by (`authorizer.Attributes`).
#[derive(Debug, Clone)]
struct Attributes<'a> {
    user: &'a User,
    verb: String,
    api_group: &'a str,
    resource: &'a str,
    subresource: Option<&'a str>,
    namespace: Option<&'a str>,
    name: Option<String>,
}

impl Attributes<'_> {
    /// `ForbiddenStatusError`: 403 with the message kube-apiserver writes, about `group/resource`
    /// and the object name.
    fn forbidden(&self) -> Failure {
        let resource = match self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.to_owned(),
        };
        let scope = match self.namespace {
            Some(namespace) => format!("in the namespace {namespace:?}"),
            None => "at the cluster scope".to_owned(),
        };
        let why = format!(
            "User {:?} cannot {} resource {resource:?} in API group {:?} {scope}",
            self.user.name, self.verb, self.api_group
        );
        // `apierrors.NewForbidden`: the group-qualified resource, then the name if any.
        let qualified = if self.api_group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.api_group)
        };
        let name = self.name.clone().unwrap_or_default();
        let message = if name.is_empty() {
            format!("{qualified} is forbidden: {why}")
        } else {
            format!("{qualified} {name:?} is forbidden: {why}")
        };
        Failure {
            code: StatusCode::FORBIDDEN,
            reason: "Forbidden",
            message,
            subject: Some((self.resource.to_owned(), name)),
        }
    }
}

/// The double's authentication and authorization settings (part of the store).
#[derive(Debug)]
pub(crate) struct Authz {
    /// `None` until a test turns RBAC on.
    pub(crate) policy: Option<RbacPolicy>,
    pub(crate) tokens: BTreeMap<String, User>,
    pub(crate) minor: u32,
}

impl Default for Authz {
    fn default() -> Self {
        Self {
            policy: None,
            tokens: BTreeMap::new(),
            minor: DEFAULT_MINOR_VERSION,
        }
    }
}

impl Authz {
    /// The minor version served.
    pub(crate) fn minor(&self) -> u32 {
        self.minor
    }

    /// The user a request's bearer token authenticates.
    fn authenticate(&self, token: Option<&str>) -> Result<User, Failure> {
        match token {
            None => Ok(User::anonymous()),
            Some(token) => self.tokens.get(token).cloned().ok_or_else(|| Failure {
                code: StatusCode::UNAUTHORIZED,
                reason: "Unauthorized",
                message: "Unauthorized".to_owned(),
                subject: None,
            }),
        }
    }

    fn allows(&self, request: &Attributes<'_>) -> bool {
        request.user.groups.iter().any(|g| g == MASTERS)
            || self.policy.as_ref().is_some_and(|p| p.allows(request))
    }
}

/// `NewRequestInfo`'s verb: what an HTTP method on an object or a collection asks for.
fn request_verb(method: &str, named: bool, query: &[(String, String)]) -> String {
    let flag = |key: &str| {
        query
            .iter()
            .any(|(k, v)| k == key && matches!(v.as_str(), "true" | "1"))
    };
    match (method, named) {
        ("GET" | "HEAD", true) => "get",
        ("GET" | "HEAD", false) if flag("watch") => "watch",
        ("GET" | "HEAD", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "",
    }
    .to_owned()
}

/// The name a field selector pins a list or watch to (`RequiresExactMatch("metadata.name")`).
fn selected_name(query: &[(String, String)]) -> Option<String> {
    let selector = query
        .iter()
        .find(|(k, _)| k == "fieldSelector")
        .map(|(_, v)| v.as_str())?;
    selector.split(',').find_map(|term| {
        let (field, value) = term.split_once("==").or_else(|| {
            term.split_once('=')
                .filter(|(field, _)| !field.ends_with('!'))
        })?;
        (field.trim() == "metadata.name" && !value.is_empty()).then(|| value.trim().to_owned())
    })
}

/// Where a request points, parsed from its path.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) group: String,
    pub(crate) resource: String,
    pub(crate) subresource: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
}

/// Authenticates and authorizes a request to `target`: the user it comes from, or `None` while
/// RBAC is off; 401 for an unknown token, 403 for a request no bound rule allows.
pub(crate) fn authorize(
    authz: &Authz,
    method: &str,
    target: &Target,
    query: &[(String, String)],
    token: Option<&str>,
) -> Result<Option<User>, Failure> {
    if authz.policy.is_none() {
        return Ok(None);
    }
    let user = authz.authenticate(token)?;
    let verb = request_verb(method, target.name.is_some(), query);
    let name = match verb.as_str() {
        "list" | "watch" => selected_name(query),
        _ => target.name.clone(),
    };
    let request = Attributes {
        user: &user,
        verb,
        api_group: &target.group,
        resource: &target.resource,
        subresource: target.subresource.as_deref(),
        namespace: target.namespace.as_deref(),
        name,
    };
    if !authz.allows(&request) {
        return Err(request.forbidden());
    }
    Ok(Some(user))
}

/// `AuthorizedForDeviceStatus` for a server-side apply of `status.devices` (verb `patch`) to a
/// claim `namespace/name` whose devices were `old_devices` and that the apply would leave as
/// `updated` (the store's preview). Checked only with RBAC on (`user` is `Some`) and from 1.36
/// on; a write the store would refuse anyway is left to the store.
pub(crate) fn authorize_device_status(
    authz: &Authz,
    user: Option<&User>,
    namespace: &str,
    name: &str,
    old_devices: &[AllocatedDeviceStatus],
    updated: ResourceClaim,
) -> Result<(), Failure> {
    let Some(user) = user else {
        return Ok(());
    };
    if authz.minor < GRANULAR_STATUS_AUTHORIZATION_SINCE {
        return Ok(());
    }
    let new_status = updated.status.unwrap_or_default();
    let new_devices = new_status.devices.unwrap_or_default();
    let drivers = modified_drivers(&new_devices, old_devices);
    if drivers.is_empty() {
        return Ok(());
    }
    let associated = associated_with_node(
        user,
        node_name_from_allocation(new_status.allocation.as_ref()),
    );
    let verbs: Vec<String> = if associated {
        vec![
            "associated-node:patch".into(),
            "arbitrary-node:patch".into(),
        ]
    } else {
        vec!["arbitrary-node:patch".into()]
    };
    let mut causes = Vec::new();
    for driver in drivers {
        let attempts: Vec<Attributes<'_>> = verbs
            .iter()
            .map(|verb| Attributes {
                user,
                verb: verb.clone(),
                api_group: RESOURCE_GROUP,
                resource: "resourceclaims",
                subresource: Some("driver"),
                namespace: Some(namespace),
                name: Some(driver.clone()),
            })
            .collect();
        if attempts.iter().any(|a| authz.allows(a)) {
            continue;
        }
        // `checkDriverAuthorization` reports the first verb's denial.
        let first = attempts[0].forbidden();
        causes.push(format!(
            "status.devices: Forbidden: changing status.devices requires \
             resource=\"resourceclaims/driver\", verb=\"[{}]\" permission: {}",
            verbs.join(" "),
            first.message
        ));
    }
    if causes.is_empty() {
        return Ok(());
    }
    let kind = "ResourceClaim.resource.k8s.io";
    let message = if causes.len() == 1 {
        format!("{kind} {name:?} is invalid: {}", causes[0])
    } else {
        format!("{kind} {name:?} is invalid: [{}]", causes.join(", "))
    };
    Err(Failure {
        code: StatusCode::UNPROCESSABLE_ENTITY,
        reason: "Invalid",
        message,
        subject: Some((kind.to_owned(), name.to_owned())),
    })
}

/// `getModifiedDrivers`: the drivers whose entries were added, removed or changed, keyed by
/// driver, pool, device and shareID.
fn modified_drivers(
    new: &[AllocatedDeviceStatus],
    old: &[AllocatedDeviceStatus],
) -> BTreeSet<String> {
    let mut before: BTreeMap<_, &AllocatedDeviceStatus> =
        old.iter().map(|d| (status_key(d), d)).collect();
    let mut drivers = BTreeSet::new();
    for entry in new {
        if before.remove(&status_key(entry)) != Some(entry) {
            drivers.insert(entry.driver.clone());
        }
    }
    drivers.extend(before.values().map(|d| d.driver.clone()));
    drivers
}

/// `deviceKey`: driver, pool, device and shareID of a status entry.
fn status_key(d: &AllocatedDeviceStatus) -> (&str, &str, &str, Option<&str>) {
    (&d.driver, &d.pool, &d.device, d.share_id.as_deref())
}

/// `nodeNameFromAllocation`: the node of a selector with one term holding exactly one
/// `metadata.name In [<node>]` field requirement, else none.
fn node_name_from_allocation(allocation: Option<&AllocationResult>) -> Option<&str> {
    let selector = allocation?.node_selector.as_ref()?;
    let [term] = selector.node_selector_terms.as_slice() else {
        return None;
    };
    if term
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        return None;
    }
    let [field] = term.match_fields.as_deref()? else {
        return None;
    };
    if field.key != "metadata.name" || field.operator != "In" {
        return None;
    }
    match field.values.as_deref()? {
        [node] => Some(node.as_str()),
        _ => None,
    }
}

/// `saAssociatedWithAllocatedNode`: a ServiceAccount whose token names exactly one valid node,
/// the allocated one.
fn associated_with_node(user: &User, allocated: Option<&str>) -> bool {
    let Some(allocated) = allocated.filter(|n| !n.is_empty()) else {
        return false;
    };
    if user.service_account_namespace().is_none() {
        return false;
    }
    match user.extra.get(NODE_NAME_KEY).map(Vec::as_slice) {
        Some([node]) => is_dns_subdomain(node, 253) && node == allocated,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
