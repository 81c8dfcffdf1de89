//! The subset of kube-apiserver's validation the double enforces, so a daemon that breaks an API
//! limit fails here as it would against a real cluster. Each check names the function of
//! `pkg/apis/resource/validation/validation.go` (or apimachinery) it restates; limits follow
//! resource.k8s.io/v1 as served by Kubernetes 1.34: at most 128 devices per slice, 32 attributes
//! plus capacities per device, attribute and capacity names that are C identifiers optionally
//! qualified by a DNS subdomain, string and version attributes of at most 64 bytes (versions in
//! semver), DNS names, exactly one node selection field; claim `status.devices` entries naming
//! allocated devices, with at most 8 valid conditions and bounded network data. The first broken
//! rule is reported (kube-apiserver lists them all).

use std::collections::BTreeSet;

use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, ResourceClaim, ResourceSlice};

use super::failure::Failure;

/// At most this many devices in one ResourceSlice.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// At most this many attributes and capacities together on one device.
pub const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;
/// At most this many bytes in a string or version attribute (`DeviceAttributeMaxValueLength`).
pub const MAX_ATTRIBUTE_STRING_LEN: usize = 64;
/// At most this many conditions on one `status.devices` entry.
pub const MAX_DEVICE_CONDITIONS: usize = 8;
/// At most this many bytes in `networkData.interfaceName`.
pub const MAX_INTERFACE_NAME_LEN: usize = 256;
/// At most this many bytes in `networkData.hardwareAddress`.
pub const MAX_HARDWARE_ADDRESS_LEN: usize = 128;
/// At most this many `networkData.ips`.
pub const MAX_IPS: usize = 16;
/// At most this many bytes of JSON in a `status.devices` entry's `data`.
pub const MAX_DEVICE_STATUS_DATA_LEN: usize = 10 * 1024;
/// metav1.Condition limits (apimachinery `pkg/apis/meta/v1/validation/validation.go`).
const MAX_CONDITION_REASON_LEN: usize = 1024;
const MAX_CONDITION_MESSAGE_LEN: usize = 32 * 1024;

const SLICE_KIND: &str = "ResourceSlice.resource.k8s.io";
const CLAIM_KIND: &str = "ResourceClaim.resource.k8s.io";

/// Whether `s` is a DNS label (RFC 1123): 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a DNS subdomain (RFC 1123): dot-separated DNS labels, at most `max` characters.
pub fn is_dns_subdomain(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.split('.').all(is_dns_label)
}

fn is_c_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= 32
}

fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((domain, name)) => is_dns_subdomain(domain, 63) && is_c_identifier(name),
        None => is_c_identifier(s),
    }
}

/// Checks a ResourceSlice as kube-apiserver would on create or update.
pub(crate) fn slice(slice: &ResourceSlice) -> Result<(), Failure> {
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    let invalid = |field: &str, rule: String| Failure::invalid(SLICE_KIND, name, field, rule);
    if !is_dns_subdomain(name, 253) {
        return Err(invalid(
            "metadata.name",
            format!("Invalid value: {name:?}: must be a DNS subdomain"),
        ));
    }
    let spec = &slice.spec;
    if !is_dns_subdomain(&spec.driver, 63) {
        return Err(invalid(
            "spec.driver",
            format!(
                "Invalid value: {:?}: must be a DNS subdomain of at most 63 characters",
                spec.driver
            ),
        ));
    }
    if !is_pool_name(&spec.pool.name) {
        return Err(invalid(
            "spec.pool.name",
            format!(
                "Invalid value: {:?}: must be DNS subdomains separated by '/'",
                spec.pool.name
            ),
        ));
    }
    if spec.pool.generation < 0 {
        return Err(invalid(
            "spec.pool.generation",
            "Invalid value: must be greater than or equal to 0".into(),
        ));
    }
    if spec.pool.resource_slice_count <= 0 {
        return Err(invalid(
            "spec.pool.resourceSliceCount",
            "Invalid value: must be greater than 0".into(),
        ));
    }
    let selections = [
        spec.node_name.as_deref().is_some_and(|n| !n.is_empty()),
        spec.node_selector.is_some(),
        spec.all_nodes == Some(true),
        spec.per_device_node_selection == Some(true),
    ];
    if selections.iter().filter(|set| **set).count() != 1 {
        return Err(invalid(
            "spec",
            "Invalid value: exactly one of `nodeName`, `nodeSelector`, `allNodes`, `perDeviceNodeSelection` is required".into(),
        ));
    }
    let devices = spec.devices.as_deref().unwrap_or_default();
    if devices.len() > MAX_DEVICES_PER_SLICE {
        return Err(invalid(
            "spec.devices",
            format!(
                "Too many: {}: must have at most {MAX_DEVICES_PER_SLICE} items",
                devices.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, device) in devices.iter().enumerate() {
        let path = format!("spec.devices[{i}]");
        if !is_dns_label(&device.name) {
            return Err(invalid(
                &format!("{path}.name"),
                format!("Invalid value: {:?}: must be a DNS label", device.name),
            ));
        }
        if !seen.insert(device.name.as_str()) {
            return Err(invalid(
                &format!("{path}.name"),
                format!("Duplicate value: {:?}", device.name),
            ));
        }
        device_fields(device, &path).map_err(|(field, rule)| invalid(&field, rule))?;
    }
    Ok(())
}

/// `validateDevice`: attribute and capacity names (`validateQualifiedName`), their combined count
/// (`ResourceSliceMaxAttributesAndCapacitiesPerDevice`), and each attribute
/// (`validateDeviceAttribute`). Returns the field path and the rule broken.
fn device_fields(
    device: &k8s_openapi::api::resource::v1::Device,
    path: &str,
) -> Result<(), (String, String)> {
    let attributes = device.attributes.as_ref();
    let capacity = device.capacity.as_ref();
    for (key, kind) in attributes
        .into_iter()
        .flat_map(|a| a.keys().map(|k| (k, "attributes")))
        .chain(
            capacity
                .into_iter()
                .flat_map(|c| c.keys().map(|k| (k, "capacity"))),
        )
    {
        if !is_qualified_name(key) {
            return Err((
                format!("{path}.{kind}[{key}]"),
                format!(
                    "Invalid value: {key:?}: must be a C identifier of at most 32 characters, optionally prefixed by a DNS subdomain of at most 63 and '/'"
                ),
            ));
        }
    }
    let total = attributes.map_or(0, |a| a.len()) + capacity.map_or(0, |c| c.len());
    if total > MAX_ATTRIBUTES_AND_CAPACITIES {
        return Err((
            path.to_owned(),
            format!(
                "Invalid value: {total}: the total number of attributes and capacities must not exceed {MAX_ATTRIBUTES_AND_CAPACITIES}"
            ),
        ));
    }
    for (key, attribute) in attributes.into_iter().flatten() {
        let apath = format!("{path}.attributes[{key}]");
        let set = [
            attribute.bool.is_some(),
            attribute.int.is_some(),
            attribute.string.is_some(),
            attribute.version.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err((
                apath,
                "Invalid value: exactly one value must be specified".into(),
            ));
        }
        if let Some(version) = &attribute.version
            && !is_semver(version)
        {
            return Err((
                format!("{apath}.version"),
                format!(
                    "Invalid value: {version:?}: must be a string compatible with semver.org spec 2.0.0"
                ),
            ));
        }
        for (field, value) in [
            ("string", &attribute.string),
            ("version", &attribute.version),
        ] {
            if let Some(value) = value
                && value.len() > MAX_ATTRIBUTE_STRING_LEN
            {
                return Err((
                    format!("{apath}.{field}"),
                    format!("Too long: may not be more than {MAX_ATTRIBUTE_STRING_LEN} bytes"),
                ));
            }
        }
    }
    Ok(())
}

/// A numeric semver identifier: digits without a leading zero.
fn is_numeric_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

/// `semverRe` of `validation.go`: `MAJOR.MINOR.PATCH`, then optional `-prerelease` and `+build`
/// dot-separated identifiers.
fn is_semver(s: &str) -> bool {
    let alphanumeric =
        |id: &str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let (rest, build) = match s.split_once('+') {
        Some((rest, build)) => (rest, Some(build)),
        None => (s, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (rest, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| is_numeric_identifier(p))
        && pre.is_none_or(|pre| {
            pre.split('.').all(|id| {
                alphanumeric(id)
                    && (is_numeric_identifier(id) || !id.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        && build.is_none_or(|build| build.split('.').all(alphanumeric))
}

/// Checks that an update does not change a field kube-apiserver keeps immutable.
pub(crate) fn slice_update(old: &ResourceSlice, new: &ResourceSlice) -> Result<(), Failure> {
    let name = new.metadata.name.as_deref().unwrap_or_default();
    let immutable = |field: &str| {
        Failure::invalid(
            SLICE_KIND,
            name,
            field,
            "Invalid value: field is immutable".to_owned(),
        )
    };
    if old.spec.driver != new.spec.driver {
        return Err(immutable("spec.driver"));
    }
    if old.spec.pool.name != new.spec.pool.name {
        return Err(immutable("spec.pool.name"));
    }
    if old.spec.node_name != new.spec.node_name {
        return Err(immutable("spec.nodeName"));
    }
    Ok(())
}

/// Checks `status.devices` entries: each names a device allocated to the claim, keys are unique,
/// and the bounded fields stay within their limits.
pub(crate) fn device_status(
    claim: &ResourceClaim,
    devices: &[AllocatedDeviceStatus],
) -> Result<(), Failure> {
    let name = claim.metadata.name.as_deref().unwrap_or_default();
    let invalid = |field: String, rule: String| Failure::invalid(CLAIM_KIND, name, &field, rule);
    let allocated: BTreeSet<_> = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r.driver.as_str(),
                r.pool.as_str(),
                r.device.as_str(),
                r.share_id.as_deref(),
            )
        })
        .collect();
    let mut seen = BTreeSet::new();
    for (i, entry) in devices.iter().enumerate() {
        let path = format!("status.devices[{i}]");
        let key = (
            entry.driver.as_str(),
            entry.pool.as_str(),
            entry.device.as_str(),
            entry.share_id.as_deref(),
        );
        // The entry's own fields first (kube-apiserver reports them before the allocation check).
        entry_fields(entry).map_err(|(field, rule)| invalid(format!("{path}.{field}"), rule))?;
        if !allocated.contains(&key) {
            return Err(invalid(
                path,
                format!(
                    "Invalid value: {}/{}/{}: must be an allocated device in the claim",
                    entry.driver, entry.pool, entry.device
                ),
            ));
        }
        if !seen.insert(key) {
            return Err(invalid(
                path,
                "Duplicate value: same driver, pool, device and shareID".into(),
            ));
        }
    }
    Ok(())
}

/// `validateDeviceStatus` for one entry, but for the allocation check: names, shareID, conditions
/// (`metav1validation.ValidateConditions`), data and network data (`validateNetworkDeviceData`).
/// Returns the field path below the entry and the rule broken.
fn entry_fields(entry: &AllocatedDeviceStatus) -> Result<(), (String, String)> {
    if !is_dns_subdomain(&entry.driver, 63) {
        return Err((
            "driver".into(),
            format!(
                "Invalid value: {:?}: must be a DNS subdomain of at most 63 characters",
                entry.driver
            ),
        ));
    }
    if !is_pool_name(&entry.pool) {
        return Err((
            "pool".into(),
            format!(
                "Invalid value: {:?}: must be DNS subdomains separated by '/'",
                entry.pool
            ),
        ));
    }
    if !is_dns_label(&entry.device) {
        return Err((
            "device".into(),
            format!("Invalid value: {:?}: must be a DNS label", entry.device),
        ));
    }
    if let Some(share) = &entry.share_id
        && !is_uid(share)
    {
        return Err((
            "shareID".into(),
            format!("Invalid value: {share:?}: must be a lowercase UUID in 8-4-4-4-12 format"),
        ));
    }
    let conditions = entry.conditions.as_deref().unwrap_or_default();
    if conditions.len() > MAX_DEVICE_CONDITIONS {
        return Err((
            "conditions".into(),
            format!(
                "Too many: {}: must have at most {MAX_DEVICE_CONDITIONS} items",
                conditions.len()
            ),
        ));
    }
    let mut types = BTreeSet::new();
    for (i, condition) in conditions.iter().enumerate() {
        condition_fields(condition)
            .map_err(|(field, rule)| (format!("conditions[{i}].{field}"), rule))?;
        if !types.insert(condition.type_.as_str()) {
            return Err((
                format!("conditions[{i}].type"),
                format!("Duplicate value: {:?}", condition.type_),
            ));
        }
    }
    if let Some(data) = &entry.data {
        let text = serde_json::to_string(&data.0).unwrap_or_default();
        if text.len() > MAX_DEVICE_STATUS_DATA_LEN {
            return Err((
                "data".into(),
                format!("Too long: may not be more than {MAX_DEVICE_STATUS_DATA_LEN} bytes"),
            ));
        }
        if !data.0.is_object() {
            return Err((
                "data".into(),
                "Invalid value: \"<value omitted>\": must be a valid JSON object".into(),
            ));
        }
    }
    let Some(network) = &entry.network_data else {
        return Ok(());
    };
    if network
        .interface_name
        .as_ref()
        .is_some_and(|n| n.len() > MAX_INTERFACE_NAME_LEN)
    {
        return Err((
            "networkData.interfaceName".into(),
            format!("Too long: may not be more than {MAX_INTERFACE_NAME_LEN} bytes"),
        ));
    }
    if network
        .hardware_address
        .as_ref()
        .is_some_and(|a| a.len() > MAX_HARDWARE_ADDRESS_LEN)
    {
        return Err((
            "networkData.hardwareAddress".into(),
            format!("Too long: may not be more than {MAX_HARDWARE_ADDRESS_LEN} bytes"),
        ));
    }
    let ips = network.ips.as_deref().unwrap_or_default();
    if ips.len() > MAX_IPS {
        return Err((
            "networkData.ips".into(),
            format!("Too many: {}: must have at most {MAX_IPS} items", ips.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, ip) in ips.iter().enumerate() {
        let field = format!("networkData.ips[{i}]");
        interface_address(ip).map_err(|rule| (field.clone(), rule))?;
        if !seen.insert(ip.as_str()) {
            return Err((field, format!("Duplicate value: {ip:?}")));
        }
    }
    Ok(())
}

/// `validatePoolName`: DNS subdomains separated by `/`, at most 253 characters in all.
fn is_pool_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('/').all(|part| is_dns_subdomain(part, 253))
}

/// `validateUID`: a lowercase UUID, 8-4-4-4-12 hexadecimal digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, len)| {
            g.len() == len
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// apimachinery `IsValidInterfaceAddress`: an address in CIDR form whose address part is
/// canonical (`10.9.8.7/24`, `2001:db8::1/64`).
fn interface_address(text: &str) -> Result<(), String> {
    let cidr = || {
        format!(
            "Invalid value: {text:?}: must be a valid address in CIDR form, (e.g. 10.9.8.7/24 or 2001:db8::1/64)"
        )
    };
    let (address, prefix) = text.split_once('/').ok_or_else(cidr)?;
    let ip: std::net::IpAddr = address.parse().map_err(|_| cidr())?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let prefix_ok = is_numeric_identifier(prefix) && prefix.parse::<u8>().is_ok_and(|p| p <= bits);
    if !prefix_ok {
        return Err(cidr());
    }
    let canonical = format!("{ip}/{prefix}");
    if canonical != text {
        return Err(format!(
            "Invalid value: {text:?}: must be in canonical form ({canonical:?})"
        ));
    }
    Ok(())
}

/// A label name (`ValidateLabelName`): an optional DNS subdomain prefix and `/`, then a name of
/// at most 63 characters of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn is_label_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    prefix.is_none_or(|p| is_dns_subdomain(p, 253))
        && !name.is_empty()
        && name.len() <= 63
        && edge(name.bytes().next())
        && edge(name.bytes().last())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A condition reason: `^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`.
fn is_condition_reason(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_alphabetic)
        && bytes
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b',' | b':'))
}

/// `ValidateCondition` (apimachinery `pkg/apis/meta/v1/validation/validation.go`).
fn condition_fields(
    condition: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
) -> Result<(), (String, String)> {
    if !is_label_name(&condition.type_) {
        return Err((
            "type".into(),
            format!(
                "Invalid value: {:?}: must be a qualified name",
                condition.type_
            ),
        ));
    }
    if !matches!(condition.status.as_str(), "True" | "False" | "Unknown") {
        return Err((
            "status".into(),
            format!(
                "Unsupported value: {:?}: supported values: \"False\", \"True\", \"Unknown\"",
                condition.status
            ),
        ));
    }
    if condition.observed_generation.is_some_and(|g| g < 0) {
        return Err((
            "observedGeneration".into(),
            "Invalid value: must be greater than or equal to zero".into(),
        ));
    }
    // Go's zero time, 0001-01-01T00:00:00Z, is "unset".
    if condition.last_transition_time.0.as_second() == -62_135_596_800 {
        return Err((
            "lastTransitionTime".into(),
            "Required value: must be set".into(),
        ));
    }
    if condition.reason.is_empty() {
        return Err(("reason".into(), "Required value: must be set".into()));
    }
    if !is_condition_reason(&condition.reason) {
        return Err((
            "reason".into(),
            format!(
                "Invalid value: {:?}: a condition reason must start with alphabetic character, optionally followed by a string of alphanumeric characters or '_,:', and must end with an alphanumeric character or '_'",
                condition.reason
            ),
        ));
    }
    if condition.reason.len() > MAX_CONDITION_REASON_LEN {
        return Err((
            "reason".into(),
            format!("Too long: may not be more than {MAX_CONDITION_REASON_LEN} bytes"),
        ));
    }
    if condition.message.len() > MAX_CONDITION_MESSAGE_LEN {
        return Err((
            "message".into(),
            format!("Too long: may not be more than {MAX_CONDITION_MESSAGE_LEN} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_follow_rfc_1123() {
        assert!(is_dns_label("can0-m3"));
        assert!(!is_dns_label("can_0"));
        assert!(!is_dns_label("-can0"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("node-a-can.dra.dev-0", 253));
        assert!(!is_dns_subdomain("node..a", 253));
    }

    #[test]
    fn versions_follow_semver_2() {
        for good in [
            "1.2.3",
            "0.0.0",
            "1.2.3-rc.1",
            "1.2.3-alpha-1+build.20240305",
            "10.20.30",
        ] {
            assert!(is_semver(good), "{good}");
        }
        for bad in [
            "1.2",
            "01.2.3",
            "1.2.3-01",
            "1.2.3-",
            "1.2.3+",
            "v1.2.3",
            "1.2.3-a..b",
        ] {
            assert!(!is_semver(bad), "{bad}");
        }
    }

    #[test]
    fn interface_addresses_are_canonical_cidrs() {
        assert!(interface_address("10.9.8.7/24").is_ok());
        assert!(interface_address("2001:db8::1/64").is_ok());
        assert!(interface_address("10.9.8.7").is_err());
        assert!(interface_address("10.9.8.7/33").is_err());
        assert!(
            interface_address("2001:0db8::1/64")
                .unwrap_err()
                .contains("canonical")
        );
    }

    #[test]
    fn condition_reasons_and_types_follow_metav1() {
        assert!(is_condition_reason("Ready"));
        assert!(is_condition_reason("Bus_Joined:a,b"));
        assert!(!is_condition_reason("not ready"));
        assert!(!is_condition_reason("Ready:"));
        assert!(is_label_name("can.dra.dev/Joined"));
        assert!(!is_label_name("Joined/"));
        assert!(is_uid("00000000-0000-4000-8000-000000000001"));
        assert!(!is_uid("00000000-0000-4000-8000-00000000000G"));
    }

    #[test]
    fn qualified_names_allow_a_domain_prefix() {
        assert!(is_qualified_name("bitrate"));
        assert!(is_qualified_name("can.dra.dev/dataBitrate"));
        assert!(!is_qualified_name("data-bitrate"));
        assert!(!is_qualified_name(&"x".repeat(33)));
    }
}
