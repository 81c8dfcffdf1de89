//! Names of pools and slices, and the field selectors that list them.
//!
//! Two kinds of pool exist. A node's own pool is named after the node and its slices carry
//! `spec.nodeName`; a `CanBus`'s pool is `canbus/<bus>` and its slices carry no node name
//! (`allNodes` or a node selector). Every name stays a DNS subdomain of at most 253 characters:
//! one that would be longer is shortened with a stable hash ([`fnv1a32`]).

/// The first segment of every bus pool's name.
pub const BUS_POOL_PREFIX: &str = "canbus/";

/// The longest pool name or slice name (a DNS subdomain) the API accepts.
pub const MAX_NAME: usize = 253;

/// FNV-1a, 32 bits: a stable hash to shorten over-long names (std's hasher is not stable across
/// releases).
///
/// ```
/// use can_dra_cluster::naming::fnv1a32;
/// assert_eq!(fnv1a32(""), 0x811c_9dc5);
/// assert_eq!(fnv1a32("a"), 0xe40c_292c);
/// ```
pub fn fnv1a32(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// The pool of bus `bus`: `canbus/<bus>`, or `canbus/<hash>` should that exceed 253 characters.
///
/// ```
/// use can_dra_cluster::naming::pool_name;
/// assert_eq!(pool_name("powertrain"), "canbus/powertrain");
/// ```
pub fn pool_name(bus: &str) -> String {
    let name = format!("{BUS_POOL_PREFIX}{bus}");
    if name.len() <= MAX_NAME {
        name
    } else {
        format!("{BUS_POOL_PREFIX}{:08x}", fnv1a32(bus))
    }
}

/// Whether `pool` is the pool of a cluster-wide bus rather than a node's own.
///
/// ```
/// use can_dra_cluster::naming::is_bus_pool;
/// assert!(is_bus_pool("canbus/powertrain"));
/// assert!(!is_bus_pool("node-a"));
/// ```
pub fn is_bus_pool(pool: &str) -> bool {
    pool.starts_with(BUS_POOL_PREFIX)
}

/// The name of slice `index` of bus `bus`'s pool: `canbus-<bus>-<driver>-<index>`, or
/// `<hash>-<index>.canbus.<driver>` should that exceed 253 characters.
///
/// ```
/// use can_dra_cluster::naming::bus_slice_name;
/// assert_eq!(bus_slice_name("powertrain", "can.dra.dev", 0), "canbus-powertrain-can.dra.dev-0");
/// ```
pub fn bus_slice_name(bus: &str, driver: &str, index: usize) -> String {
    let name = format!("canbus-{bus}-{driver}-{index}");
    if name.len() <= MAX_NAME {
        name
    } else {
        format!(
            "{:08x}-{index}.canbus.{driver}",
            fnv1a32(&format!("{bus}\0{driver}"))
        )
    }
}

/// The name of slice `index` of node `node`'s pool: `<node>-<driver>-<index>`, or
/// `<hash of node and driver>-<index>.<driver>` should that exceed 253 characters.
///
/// ```
/// use can_dra_cluster::naming::node_slice_name;
/// assert_eq!(node_slice_name("node-a", "can.dra.dev", 0), "node-a-can.dra.dev-0");
/// assert!(node_slice_name(&"n".repeat(253), "can.dra.dev", 7).len() <= 253);
/// ```
pub fn node_slice_name(node: &str, driver: &str, index: usize) -> String {
    let name = format!("{node}-{driver}-{index}");
    if name.len() <= MAX_NAME {
        name
    } else {
        format!(
            "{:08x}-{index}.{driver}",
            fnv1a32(&format!("{node}\0{driver}"))
        )
    }
}

/// The field selector of `driver`'s slices that belong to no single node, where bus pools live:
/// `spec.driver=<driver>,spec.nodeName=` (an absent node name selects as empty). kube-apiserver
/// accepts only `metadata.name`, `spec.nodeName` and `spec.driver` for ResourceSlices, so a pool
/// is picked from these by `spec.pool.name` on the client.
///
/// ```
/// use can_dra_cluster::naming::bus_pools_selector;
/// assert_eq!(bus_pools_selector("can.dra.dev"), "spec.driver=can.dra.dev,spec.nodeName=");
/// ```
pub fn bus_pools_selector(driver: &str) -> String {
    format!("spec.driver={driver},spec.nodeName=")
}

/// The field selector of `driver`'s slices on node `node`: `spec.nodeName=<node>,spec.driver=<driver>`.
///
/// ```
/// use can_dra_cluster::naming::node_pools_selector;
/// assert_eq!(node_pools_selector("can.dra.dev", "node-a"), "spec.nodeName=node-a,spec.driver=can.dra.dev");
/// ```
pub fn node_pools_selector(driver: &str, node: &str) -> String {
    format!("spec.nodeName={node},spec.driver={driver}")
}

/// The field selector of all of `driver`'s slices: `spec.driver=<driver>`.
pub fn driver_selector(driver: &str) -> String {
    format!("spec.driver={driver}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_bus_names_stay_within_limits() {
        let long = format!("{}.bus", "x".repeat(60)).repeat(4);
        let long = &long[..250];
        assert!(pool_name(long).len() <= MAX_NAME);
        assert_ne!(pool_name(long), pool_name(&long.replace('x', "y")));
        let name = bus_slice_name(long, "can.dra.dev", 3);
        assert!(name.len() <= MAX_NAME);
        assert!(
            name.split('.').all(|l| !l.is_empty() && l.len() <= 63),
            "{name}"
        );
    }

    #[test]
    fn long_node_names_stay_dns_subdomains() {
        let node = format!("{}.example", "n".repeat(63));
        let node = [node.as_str(); 4].join(".");
        let name = node_slice_name(&node, "can.dra.dev", 12);
        assert!(name.len() <= MAX_NAME, "{}", name.len());
        assert!(
            name.split('.').all(|l| !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')),
            "{name}"
        );
        assert_ne!(
            name,
            node_slice_name(&node.replace('n', "m"), "can.dra.dev", 12)
        );
    }
}
