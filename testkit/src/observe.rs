//! What iproute2 and can-utils report, as independent observers of the kernel state.

use serde_json::Value;

use crate::command::{TestkitError, describe, run};
use crate::namespace::Namespace;

/// One link as `ip -d -j link show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpLink {
    /// `ifindex`.
    pub index: u32,
    /// `ifname`.
    pub name: String,
    /// `linkinfo.info_kind` (`vxcan`, `vcan`, `can`, ...).
    pub kind: Option<String>,
    /// `mtu`.
    pub mtu: u32,
    /// `UP` is among the `flags`.
    pub up: bool,
    /// `operstate` (`UP`, `DOWN`, `UNKNOWN`, `LOWERLAYERDOWN`, ...).
    pub operstate: String,
    /// The peer's index when it lives in another namespace (`link_index`).
    pub link_index: Option<u32>,
    /// The peer's name when it lives in the same namespace (`link`).
    pub link_name: Option<String>,
    /// `link_netnsid`, set when the peer lives in another namespace.
    pub link_netnsid: Option<i64>,
    /// The raw JSON object, for anything else a test wants to check.
    pub raw: Value,
}

impl IpLink {
    /// Parses the JSON array printed by `ip -d -j link show`.
    ///
    /// ```
    /// let json = r#"[{"ifindex":3,"ifname":"can0","flags":["NOARP","UP"],"mtu":72,
    ///   "operstate":"UNKNOWN","linkinfo":{"info_kind":"vcan"}}]"#;
    /// let links = can_dra_testkit::IpLink::parse_json(json).unwrap();
    /// assert_eq!(links[0].kind.as_deref(), Some("vcan"));
    /// assert!(links[0].up);
    /// ```
    pub fn parse_json(json: &str) -> Result<Vec<Self>, String> {
        let value: Value = serde_json::from_str(json).map_err(|error| error.to_string())?;
        let entries = value.as_array().ok_or("not a JSON array")?;
        entries.iter().map(Self::from_value).collect()
    }

    fn from_value(value: &Value) -> Result<Self, String> {
        let number = |key: &str| value.get(key).and_then(Value::as_u64);
        let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
        let index = number("ifindex")
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("no ifindex in {value}"))?;
        Ok(Self {
            index,
            name: text("ifname").ok_or_else(|| format!("no ifname in {value}"))?,
            kind: value
                .pointer("/linkinfo/info_kind")
                .and_then(Value::as_str)
                .map(str::to_string),
            mtu: number("mtu")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            up: value
                .get("flags")
                .and_then(Value::as_array)
                .is_some_and(|flags| flags.iter().any(|flag| flag.as_str() == Some("UP"))),
            operstate: text("operstate").unwrap_or_default(),
            link_index: number("link_index").and_then(|n| u32::try_from(n).ok()),
            link_name: text("link"),
            link_netnsid: value.get("link_netnsid").and_then(Value::as_i64),
            raw: value.clone(),
        })
    }
}

/// Every link in `ns`, from `ip -d -j link show`.
pub fn links_in(ns: &dyn Namespace) -> Result<Vec<IpLink>, TestkitError> {
    let mut command = ns.command("ip");
    command.args(["-d", "-j", "link", "show"]);
    let output = run(&mut command)?;
    IpLink::parse_json(&output).map_err(|detail| TestkitError::Parse {
        command: describe(&command),
        detail,
    })
}

/// The link called `name` in `ns`, if any.
pub fn link_in(ns: &dyn Namespace, name: &str) -> Result<Option<IpLink>, TestkitError> {
    Ok(links_in(ns)?.into_iter().find(|link| link.name == name))
}

/// Creates a vcan with the given MTU (16 or 72) in `ns` and brings it up, with iproute2.
pub fn add_vcan(ns: &dyn Namespace, name: &str, mtu: u32) -> Result<(), TestkitError> {
    let mtu = mtu.to_string();
    for args in [
        vec!["link", "add", name, "type", "vcan"],
        vec!["link", "set", name, "mtu", &mtu],
        vec!["link", "set", name, "up"],
    ] {
        let mut command = ns.command("ip");
        command.args(&args);
        run(&mut command)?;
    }
    Ok(())
}

/// The rule lines of `cangw -L` in `ns` (each `cangw -A ... # N handled N dropped N deleted`).
pub fn cangw_rules(ns: &dyn Namespace) -> Result<Vec<String>, TestkitError> {
    let mut command = ns.command("cangw");
    command.arg("-L");
    let line = crate::command::describe(&command);
    let output = command.output().map_err(|source| TestkitError::Spawn {
        command: line.clone(),
        source,
    })?;
    // can-utils 2020.11 exits non-zero after a successful listing (it returns the last
    // netlink message length); a listing that failed says so on stderr.
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if !stderr.is_empty() {
        return Err(TestkitError::Failed {
            command: line,
            status: output.status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("cangw "))
        .map(str::to_string)
        .collect())
}

/// The rules of `cangw -L` in `ns` without their frame counters (the `# ...` part), so that
/// listings taken before and after traffic compare equal.
pub fn cangw_rules_uncounted(ns: &dyn Namespace) -> Result<Vec<String>, TestkitError> {
    Ok(cangw_rules(ns)?
        .iter()
        .map(|rule| rule.split('#').next().unwrap_or(rule).trim().to_string())
        .collect())
}

/// The qdiscs of `interface` in `ns` with statistics, from `tc -s -j qdisc show dev IF`.
pub fn tc_qdiscs(ns: &dyn Namespace, interface: &str) -> Result<Vec<Value>, TestkitError> {
    let mut command = ns.command("tc");
    command.args(["-s", "-j", "qdisc", "show", "dev", interface]);
    let output = run(&mut command)?;
    let value: Value = serde_json::from_str(&output).map_err(|error| TestkitError::Parse {
        command: describe(&command),
        detail: error.to_string(),
    })?;
    Ok(value.as_array().cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::Host;

    #[test]
    fn vxcan_ends_report_their_peer_by_index_or_name() {
        // Shapes printed by iproute2 6.1: peer in another namespace, then in the same one.
        let json = r#"[
          {"ifindex":7,"link_index":3,"ifname":"vxh","flags":["NOARP","UP","LOWER_UP"],"mtu":16,
           "operstate":"UP","link_netnsid":0,"linkinfo":{"info_kind":"vxcan"}},
          {"ifindex":8,"link":"vxb","ifname":"vxa","flags":["NOARP"],"mtu":72,
           "operstate":"DOWN","linkinfo":{"info_kind":"vxcan"}}
        ]"#;
        let links = IpLink::parse_json(json).unwrap();
        assert_eq!(links[0].link_index, Some(3));
        assert_eq!(links[0].link_netnsid, Some(0));
        assert!(links[0].up);
        assert_eq!(links[1].link_name.as_deref(), Some("vxb"));
        assert!(!links[1].up);
        assert_eq!(links[1].operstate, "DOWN");
    }

    #[test]
    fn malformed_json_is_an_error() {
        assert!(IpLink::parse_json("{}").is_err());
        assert!(IpLink::parse_json("[{\"ifname\":\"x\"}]").is_err());
    }

    #[test]
    fn the_host_has_a_loopback() {
        let links = links_in(&Host).unwrap();
        assert!(links.iter().any(|link| link.name == "lo"), "{links:?}");
    }
}
