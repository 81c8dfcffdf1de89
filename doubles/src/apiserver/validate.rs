//! The subset of kube-apiserver's validation the double enforces, so a daemon that breaks an API
//! limit fails here as it would against a real cluster. Limits follow resource.k8s.io/v1 as served by
//! Kubernetes 1.34: at most 128 devices per slice, 32 attributes plus capacities per device, attribute
//! strings of at most 64 characters, DNS names, exactly one node selection field.

use std::collections::BTreeSet;

use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, ResourceClaim, ResourceSlice};

use super::failure::Failure;

/// At most this many devices in one ResourceSlice.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// At most this many attributes and capacities together on one device.
pub const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;
/// At most this many characters in a string or version attribute.
pub const MAX_ATTRIBUTE_STRING_LEN: usize = 64;
/// At most this many conditions on one `status.devices` entry.
pub const MAX_DEVICE_CONDITIONS: usize = 8;
/// At most this many bytes in `networkData.interfaceName`.
pub const MAX_INTERFACE_NAME_LEN: usize = 256;

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
    if spec.pool.name.is_empty()
        || spec.pool.name.len() > 253
        || !spec
            .pool
            .name
            .split('/')
            .all(|part| is_dns_subdomain(part, 253))
    {
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
        let attributes = device.attributes.as_ref();
        let total =
            attributes.map_or(0, |a| a.len()) + device.capacity.as_ref().map_or(0, |c| c.len());
        if total > MAX_ATTRIBUTES_AND_CAPACITIES {
            return Err(invalid(
                &path,
                format!(
                    "Too many: {total}: must have at most {MAX_ATTRIBUTES_AND_CAPACITIES} attributes and capacities combined"
                ),
            ));
        }
        for (key, attribute) in attributes.into_iter().flatten() {
            let apath = format!("{path}.attributes[{key}]");
            if !is_qualified_name(key) {
                return Err(invalid(
                    &apath,
                    "Invalid value: must be a C identifier or <domain>/<C identifier>".into(),
                ));
            }
            let set = [
                attribute.bool.is_some(),
                attribute.int.is_some(),
                attribute.string.is_some(),
                attribute.version.is_some(),
            ];
            if set.iter().filter(|s| **s).count() != 1 {
                return Err(invalid(
                    &apath,
                    "Invalid value: exactly one value must be specified".into(),
                ));
            }
            for (field, value) in [
                ("string", &attribute.string),
                ("version", &attribute.version),
            ] {
                if let Some(value) = value
                    && value.chars().count() > MAX_ATTRIBUTE_STRING_LEN
                {
                    return Err(invalid(
                        &format!("{apath}.{field}"),
                        format!("Too long: may not be more than {MAX_ATTRIBUTE_STRING_LEN} bytes"),
                    ));
                }
            }
        }
    }
    Ok(())
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
        let conditions = entry.conditions.as_deref().unwrap_or_default();
        if conditions.len() > MAX_DEVICE_CONDITIONS {
            return Err(invalid(
                format!("{path}.conditions"),
                format!(
                    "Too many: {}: must have at most {MAX_DEVICE_CONDITIONS} items",
                    conditions.len()
                ),
            ));
        }
        if let Some(interface) = entry
            .network_data
            .as_ref()
            .and_then(|n| n.interface_name.as_ref())
            && interface.len() > MAX_INTERFACE_NAME_LEN
        {
            return Err(invalid(
                format!("{path}.networkData.interfaceName"),
                format!("Too long: may not be more than {MAX_INTERFACE_NAME_LEN} bytes"),
            ));
        }
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
    fn qualified_names_allow_a_domain_prefix() {
        assert!(is_qualified_name("bitrate"));
        assert!(is_qualified_name("can.dra.dev/dataBitrate"));
        assert!(!is_qualified_name("data-bitrate"));
        assert!(!is_qualified_name(&"x".repeat(33)));
    }
}
