//! What the node namespace holds, as independent tools report it (`ip`, `tc` and `cangw` through
//! the test kit's observers, run in the demo's namespace, which is the node's): links, can-gw
//! rules and qdiscs. Comparing a snapshot taken before the daemon did anything with one taken
//! after unprepare shows what was left.

use can_dra_testkit::{Host, cangw_rules, links_in, tc_qdiscs};

/// The kernel objects of the node namespace the driver could create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSnapshot {
    /// Link names, sorted.
    pub links: Vec<String>,
    /// `cangw -L` rules without their frame counters, sorted.
    pub rules: Vec<String>,
    /// Qdiscs as `dev kind handle`, sorted.
    pub qdiscs: Vec<String>,
}

impl KernelSnapshot {
    /// Takes a snapshot.
    pub fn take() -> anyhow::Result<Self> {
        let found = links_in(&Host)?;
        let mut links = Vec::with_capacity(found.len());
        let mut qdiscs = Vec::new();
        for link in found {
            for qdisc in tc_qdiscs(&Host, &link.name)? {
                qdiscs.push(format!(
                    "{} {} {}",
                    link.name,
                    qdisc["kind"].as_str().unwrap_or("?"),
                    qdisc["handle"].as_str().unwrap_or("?")
                ));
            }
            links.push(link.name);
        }
        links.sort();
        qdiscs.sort();
        // Without the `# N handled ...` counters, so that listings compare across traffic.
        let mut rules: Vec<String> = cangw_rules(&Host)?
            .iter()
            .map(|rule| rule.split('#').next().unwrap_or(rule).trim().to_owned())
            .collect();
        rules.sort();
        Ok(Self {
            links,
            rules,
            qdiscs,
        })
    }

    /// What this snapshot has that `before` had not, per kind.
    pub fn added_since(&self, before: &Self) -> Self {
        let added = |now: &[String], then: &[String]| -> Vec<String> {
            now.iter().filter(|x| !then.contains(x)).cloned().collect()
        };
        Self {
            links: added(&self.links, &before.links),
            rules: added(&self.rules, &before.rules),
            qdiscs: added(&self.qdiscs, &before.qdiscs),
        }
    }
}
