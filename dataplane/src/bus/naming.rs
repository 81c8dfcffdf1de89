//! Names: every link the driver creates on the host (a member's host end, the two ends of a
//! cross-node bus's tunnel pair) and which names are the driver's. The kernel's rules for
//! interface names are [`crate::link::validate_name`]; the rules for names users choose are
//! `can_dra_api::InterfaceName`'s.
//!
//! The host end is named `cdra` + 11 hex digits of a stable hash of the member id, so the
//! driver recognises its own links after a restart (by prefix) and finds a member's link again
//! without a lookup table. The hash is FNV-1a, written out here because `std`'s hasher is not
//! guaranteed to stay the same across Rust releases.

use crate::link::MAX_NAME_LEN;

/// The prefix of every host-side link the driver owns.
pub const HOST_PREFIX: &str = "cdra";

/// Prefix of the end of a tunnel pair that joins the bus mesh.
pub const MESH_PREFIX: &str = "vxtm-";

/// Prefix of the end of a tunnel pair that carries the tunnel endpoint's raw socket.
pub const TUNNEL_PREFIX: &str = "vxtt-";

/// Every prefix of a link name the driver creates: no member interface and no published
/// controller may have one (the API refuses them as interface names too).
pub const RESERVED_PREFIXES: [&str; 3] = [HOST_PREFIX, MESH_PREFIX, TUNNEL_PREFIX];

/// The longest bus name used verbatim in tunnel link names (15 bytes minus the prefix).
const MAX_VERBATIM: usize = MAX_NAME_LEN - MESH_PREFIX.len();

const HASH_DIGITS: usize = MAX_NAME_LEN - HOST_PREFIX.len();

/// The host-end interface name for a member id.
///
/// ```
/// use can_dra_dataplane::bus::naming::{host_name, is_owned};
/// let name = host_name("claim-7/can");
/// assert_eq!(name.len(), 15);
/// assert!(is_owned(&name));
/// assert_eq!(name, host_name("claim-7/can"));
/// ```
pub fn host_name(member_id: &str) -> String {
    let hash = fnv1a64(member_id.as_bytes());
    let digits = format!("{hash:016x}");
    format!("{HOST_PREFIX}{}", &digits[..HASH_DIGITS])
}

/// Whether an interface name has the shape of a host end this driver creates.
pub fn is_owned(name: &str) -> bool {
    name.len() == MAX_NAME_LEN
        && name
            .strip_prefix(HOST_PREFIX)
            .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The two link names of a cross-node bus's tunnel pair: (mesh end, endpoint end). A bus name
/// longer than 10 bytes is replaced by the first 10 hex digits of its SHA-256.
///
/// ```
/// use can_dra_dataplane::bus::naming::tunnel_link_names;
/// assert_eq!(tunnel_link_names("body"), ("vxtm-body".to_string(), "vxtt-body".to_string()));
/// let (mesh, _) = tunnel_link_names("a-bus-name-longer-than-ten");
/// assert_eq!(mesh.len(), 15);
/// ```
pub fn tunnel_link_names(bus: &str) -> (String, String) {
    use sha2::{Digest, Sha256};
    let short = if bus.len() <= MAX_VERBATIM {
        bus.to_owned()
    } else {
        let digest = Sha256::digest(bus.as_bytes());
        digest
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
            .chars()
            .take(MAX_VERBATIM)
            .collect()
    };
    (
        format!("{MESH_PREFIX}{short}"),
        format!("{TUNNEL_PREFIX}{short}"),
    )
}

/// Whether a host link is one end of a tunnel pair.
pub fn is_tunnel_link(name: &str) -> bool {
    name.starts_with(MESH_PREFIX) || name.starts_with(TUNNEL_PREFIX)
}

/// Whether a link has a name the driver reserves for its own ([`RESERVED_PREFIXES`]): a
/// member's host end or a tunnel pair end, made by this daemon or an earlier one.
///
/// ```
/// use can_dra_dataplane::bus::naming::{host_name, is_driver_link, tunnel_link_names};
/// assert!(is_driver_link(&host_name("claim-7/can")));
/// assert!(is_driver_link(&tunnel_link_names("body").0));
/// assert!(!is_driver_link("can0"));
/// ```
pub fn is_driver_link(name: &str) -> bool {
    RESERVED_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // Vectors from the FNV reference (draft-eastlake-fnv): "" and "a".
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn host_name_is_prefix_plus_eleven_hex_digits_of_the_hash() {
        // fnv1a64("a") = af63dc4c8601ec8c: the first 11 digits follow the prefix.
        assert_eq!(host_name("a"), "cdraaf63dc4c860");
        assert_ne!(host_name("a"), host_name("b"));
    }

    #[test]
    fn only_our_shape_of_name_is_owned() {
        assert!(is_owned("cdraaf63dc4c860"));
        assert!(!is_owned("cdra0"), "too short");
        assert!(!is_owned("cdraxf63dc4c860"), "not hex");
        assert!(!is_owned("vxcanf63dc4c860"));
    }

    #[test]
    fn tunnel_links_keep_short_bus_names_and_hash_long_ones() {
        assert_eq!(
            tunnel_link_names("body"),
            ("vxtm-body".to_owned(), "vxtt-body".to_owned())
        );
        let (mesh, tunnel) = tunnel_link_names("a-very-long-bus-name");
        assert_eq!((mesh.len(), tunnel.len()), (15, 15));
        assert_eq!(mesh[5..], tunnel[5..]);
        assert_ne!(tunnel_link_names("a-very-long-bus-name-2").0, mesh);
        assert!(is_tunnel_link(&mesh) && is_tunnel_link(&tunnel));
        assert!(!is_tunnel_link("can0"));
    }
}
