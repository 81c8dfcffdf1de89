//! `NodeConfig`: the kubelet plugin's configuration file, saying which physical CAN controllers to
//! publish and which node-local virtual buses to offer.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::decode::{self, API_VERSION};
use crate::error::{ConfigError, FieldPath};
use crate::member::{check_data_bitrate, check_nominal_bitrate};
use crate::value::{Bitrate, DEFAULT_BUS_BITRATE, ValueError};

/// The `kind` of a [`NodeConfig`] document.
pub const NODE_CONFIG_KIND: &str = "NodeConfig";
/// Member slots published per device when the config does not say.
pub const DEFAULT_SLOTS: u32 = 8;
/// Most member slots one device may publish.
pub const MAX_SLOTS: u32 = 64;
/// Longest virtual bus name; device names append a slot suffix and must stay within API limits.
pub const MAX_BUS_NAME_LEN: usize = 40;

/// The kubelet plugin's `--config` file.
///
/// ```
/// use can_dra_api::NodeConfig;
///
/// let config = NodeConfig::from_yaml_str(
///     "apiVersion: can.dra.dev/v1alpha1
/// kind: NodeConfig
/// physical:
///   exclude: [\"can9\"]
/// virtualBuses:
/// - name: body
///   bitrate: 125k
/// ",
/// )?;
/// assert!(config.publishes_physical("can0"));
/// assert!(!config.publishes_physical("can9"));
/// assert_eq!(config.physical.slots, 8);
/// assert_eq!(config.virtual_buses[0].bitrate.to_string(), "125kbit");
/// # Ok::<(), can_dra_api::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// Must be `can.dra.dev/v1alpha1`.
    #[serde(default)]
    pub api_version: String,
    /// Must be `NodeConfig`.
    #[serde(default)]
    pub kind: String,
    /// Which physical controllers to publish.
    #[serde(default)]
    pub physical: PhysicalConfig,
    /// Node-local virtual buses.
    #[serde(default)]
    pub virtual_buses: Vec<VirtualBusConfig>,
}

impl Default for NodeConfig {
    /// Publish every physical controller with 8 slots; no virtual buses.
    fn default() -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: NODE_CONFIG_KIND.to_owned(),
            physical: PhysicalConfig::default(),
            virtual_buses: Vec::new(),
        }
    }
}

/// Which physical CAN controllers to publish, and how many member slots each gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PhysicalConfig {
    /// Interface name patterns to publish; default `["*"]`. An empty list publishes none.
    #[serde(default = "default_include")]
    pub include: Vec<GlobPattern>,
    /// Interface name patterns never to publish, even when included; default none.
    #[serde(default)]
    pub exclude: Vec<GlobPattern>,
    /// Member slots per controller, 1..=64; default 8.
    #[serde(default = "default_slots")]
    pub slots: u32,
}

impl Default for PhysicalConfig {
    fn default() -> Self {
        Self {
            include: default_include(),
            exclude: Vec::new(),
            slots: DEFAULT_SLOTS,
        }
    }
}

fn default_include() -> Vec<GlobPattern> {
    vec![GlobPattern("*".to_owned())]
}

fn default_slots() -> u32 {
    DEFAULT_SLOTS
}

fn default_bus_bitrate() -> Bitrate {
    DEFAULT_BUS_BITRATE
}

/// A node-local virtual bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualBusConfig {
    /// Bus name: a DNS label of at most 40 characters, unique on the node.
    pub name: String,
    /// Nominal bitrate, 1 kbit/s ..= 1 Mbit/s; default 500 kbit/s.
    #[serde(default = "default_bus_bitrate")]
    pub bitrate: Bitrate,
    /// Whether the bus carries CAN FD frames; default `false`.
    #[serde(default)]
    pub fd: bool,
    /// FD data-phase bitrate (only with `fd: true`); absent means the nominal bitrate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bitrate: Option<Bitrate>,
    /// Member slots, 1..=64; default 8.
    #[serde(default = "default_slots")]
    pub slots: u32,
}

impl NodeConfig {
    /// Parses and validates a YAML document.
    ///
    /// ```
    /// use can_dra_api::NodeConfig;
    /// let err = NodeConfig::from_yaml_str(
    ///     "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\nphysical:\n  slots: 0\n",
    /// )
    /// .unwrap_err();
    /// assert_eq!(err.to_string(), "physical.slots: 0 is below 1");
    /// ```
    pub fn from_yaml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = decode::yaml_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        decode::check_type_meta(&self.api_version, &self.kind, NODE_CONFIG_KIND)?;
        let root = FieldPath::root();
        check_slots(&root.key("physical").key("slots"), self.physical.slots)?;
        let buses = root.key("virtualBuses");
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, bus) in self.virtual_buses.iter().enumerate() {
            let path = buses.index(i);
            check_bus_name(&path.key("name"), &bus.name)?;
            if let Some(first) = seen.insert(&bus.name, i) {
                return Err(path.key("name").error(format!(
                    "{:?} is already used by virtualBuses[{first}]",
                    bus.name
                )));
            }
            check_nominal_bitrate(&path.key("bitrate"), bus.bitrate)?;
            if let Some(data) = bus.data_bitrate {
                let field = path.key("dataBitrate");
                if !bus.fd {
                    return Err(field.error("is only allowed with fd: true"));
                }
                check_data_bitrate(&field, bus.bitrate, data)?;
            }
            check_slots(&path.key("slots"), bus.slots)?;
        }
        Ok(())
    }

    /// Whether the physical controller `interface` is published: it matches an `include` pattern and no
    /// `exclude` pattern.
    pub fn publishes_physical(&self, interface: &str) -> bool {
        self.physical.publishes(interface)
    }
}

impl PhysicalConfig {
    /// Whether `interface` matches an `include` pattern and no `exclude` pattern.
    pub fn publishes(&self, interface: &str) -> bool {
        self.include.iter().any(|p| p.matches(interface))
            && !self.exclude.iter().any(|p| p.matches(interface))
    }
}

fn check_slots(path: &FieldPath, slots: u32) -> Result<(), ConfigError> {
    if slots < 1 {
        return Err(path.error(format!("{slots} is below 1")));
    }
    if slots > MAX_SLOTS {
        return Err(path.error(format!("{slots} is above {MAX_SLOTS}")));
    }
    Ok(())
}

/// A DNS label (RFC 1123): lowercase letters, digits and `-`, starting and ending with a letter or digit.
fn check_bus_name(path: &FieldPath, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(path.error("is empty"));
    }
    if name.len() > MAX_BUS_NAME_LEN {
        return Err(path.error(format!(
            "{name:?} is {} characters long, at most {MAX_BUS_NAME_LEN} are allowed",
            name.len()
        )));
    }
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !name.chars().all(valid_char)
        || !edge_ok(name.chars().next())
        || !edge_ok(name.chars().last())
    {
        return Err(path.error(format!(
            "{name:?} is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
        )));
    }
    Ok(())
}

/// A shell-style pattern over interface names: `*` matches any run of characters, `?` exactly one,
/// everything else itself.
///
/// ```
/// use can_dra_api::GlobPattern;
/// let p: GlobPattern = "can?".parse().unwrap();
/// assert!(p.matches("can0") && !p.matches("can10"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GlobPattern(String);

impl GlobPattern {
    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches the whole pattern.
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }
}

/// Wildcard matching with single-star backtracking: linear in practice, never exponential, because
/// only the most recent `*` needs revisiting.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl FromStr for GlobPattern {
    type Err = ValueError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |rule: String| ValueError::BadName {
            input: input.to_owned(),
            rule,
        };
        if input.is_empty() {
            return Err(ValueError::Empty);
        }
        for c in input.chars() {
            match c {
                '[' | ']' | '{' | '}' | '\\' => {
                    return Err(bad(format!(
                        "contains '{c}'; only '*' and '?' are special in patterns"
                    )));
                }
                '/' | ':' => {
                    return Err(bad(format!("contains '{c}', which no interface name has")));
                }
                c if c.is_whitespace() => return Err(bad("contains whitespace".to_owned())),
                c if !c.is_ascii_graphic() => {
                    return Err(bad(format!(
                        "contains {c:?}; only printable ASCII is allowed"
                    )));
                }
                _ => {}
            }
        }
        Ok(Self(input.to_owned()))
    }
}

impl fmt::Display for GlobPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for GlobPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for GlobPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matching() {
        let m = |p: &str, n: &str| glob_match(p.as_bytes(), n.as_bytes());
        assert!(m("*", "can0"));
        assert!(m("*", ""));
        assert!(m("can*", "can"));
        assert!(m("can*", "can12"));
        assert!(!m("can*", "vcan0"));
        assert!(m("*can*", "vcan0"));
        assert!(m("can?", "can1"));
        assert!(!m("can?", "can"));
        assert!(!m("can?", "can10"));
        assert!(m("c*n*0", "can_usb0"));
        assert!(!m("c*n*0", "can_usb1"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(m("**", "x"));
        assert!(!m("", "x"));
        assert!(m("", ""));
        // Pathological backtracking input still finishes quickly.
        assert!(!m("*a*a*a*a*a*a*b", &"a".repeat(200)));
    }
}
