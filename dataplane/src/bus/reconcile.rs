//! Reconcile: bring the kernel in line with a desired state, typically the checkpoint after a
//! restart or a crash.
//!
//! 1. Validate the desired state; resolve every member's namespace (a member whose namespace is
//!    gone is skipped and reported, and its link counts as an orphan); refuse two members with
//!    one interface name in one namespace. Look up external interfaces. Nothing is changed
//!    before all of this passed.
//! 2. Links: keep a member's host end when its peer is the member's interface with the right
//!    MTU; otherwise recreate it. Delete every link with the driver's prefix that no desired
//!    member owns.
//! 3. Access policy and shaping per member: compare with what is in place, apply the difference.
//! 4. Rules: dump can-gw rules; among those the driver manages (touching one of its links, or
//!    joining two external interfaces of one bus) keep the first copy of each desired rule and
//!    delete the rest (duplicates, stale flags, rules with extras); add what is missing.
//!
//! Running it twice in a row changes nothing the second time.

use std::collections::{BTreeSet, HashMap};

use tracing::{info, info_span, warn};

use super::kernel::{HostLink, Kernel, Rule};
use super::manager::Buses;
use super::model::{DesiredState, MemberSpec};
use super::naming::{host_name, is_owned};
use super::plan;
use super::{BusError, model::BusSpec};

/// A member left out of a reconcile, and why (typically: its pod's namespace is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedMember {
    /// The bus.
    pub bus: String,
    /// The member id.
    pub member: String,
    /// Why it was skipped.
    pub reason: String,
}

/// What a reconcile changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Host links created (member host ends).
    pub links_created: Vec<String>,
    /// Host links deleted (orphans, or broken pairs that were recreated).
    pub links_deleted: Vec<String>,
    /// can-gw rules added.
    pub rules_added: usize,
    /// can-gw rules deleted (orphans and duplicates).
    pub rules_deleted: usize,
    /// Members whose access policy or shaping was changed.
    pub members_configured: Vec<String>,
    /// Members that could not be placed.
    pub skipped: Vec<SkippedMember>,
}

impl ReconcileReport {
    /// Whether the kernel was already in the desired state.
    pub fn is_noop(&self) -> bool {
        self.links_created.is_empty()
            && self.links_deleted.is_empty()
            && self.rules_added == 0
            && self.rules_deleted == 0
            && self.members_configured.is_empty()
    }
}

impl<K: Kernel> Buses<K> {
    /// Makes the kernel match `desired` and adopts it as the current state. See the module docs
    /// for the algorithm. Bad input fails before anything is changed.
    pub fn reconcile(&mut self, desired: DesiredState) -> Result<ReconcileReport, BusError> {
        let _span = info_span!("reconcile", buses = desired.buses.len()).entered();
        plan::validate(&desired)?;
        let mut report = ReconcileReport::default();

        // 1. Resolve namespaces and external interfaces, before touching anything.
        let mut namespaces = HashMap::new();
        let mut placed: Vec<(String, MemberSpec)> = Vec::new();
        let mut seen_interfaces: HashMap<(crate::netns::NetnsId, String), String> = HashMap::new();
        for bus in &desired.buses {
            for member in &bus.members {
                match self.kernel.namespace_id(&member.netns) {
                    Ok(id) => {
                        let key = (id, member.interface.clone());
                        if let Some(other) = seen_interfaces.insert(key, member.id.clone()) {
                            return Err(BusError::InterfaceTaken {
                                member: member.id.clone(),
                                interface: member.interface.clone(),
                                netns: member.netns.to_string(),
                                other: Some(other),
                            });
                        }
                        namespaces.insert(member.id.clone(), id);
                        placed.push((bus.name.clone(), member.clone()));
                    }
                    Err(error) => report.skipped.push(SkippedMember {
                        bus: bus.name.clone(),
                        member: member.id.clone(),
                        reason: error.to_string(),
                    }),
                }
            }
        }
        let mut links = self.links()?;
        for bus in &desired.buses {
            let shell = BusSpec {
                members: Vec::new(),
                ..bus.clone()
            };
            plan::endpoints(&shell, &links)?;
        }
        // From here on the desired state is the manager's intention, even if a kernel step
        // fails: a later reconcile continues from it.
        self.state = desired.clone();
        self.namespaces = namespaces;

        // 2. Links.
        let mut wanted_hosts = BTreeSet::new();
        let mut ready: Vec<(String, MemberSpec)> = Vec::new();
        for (bus, member) in placed {
            let _span = info_span!("member", bus = %bus, member = %member.id).entered();
            let host = host_name(&member.id);
            wanted_hosts.insert(host.clone());
            match self.ensure_link(&member, links.get(&host), &mut report) {
                Ok(()) => ready.push((bus, member)),
                Err(error) => {
                    warn!(%error, "member skipped");
                    report.skipped.push(SkippedMember {
                        bus,
                        member: member.id.clone(),
                        reason: error.to_string(),
                    });
                }
            }
        }
        for (name, link) in &links {
            if is_owned(name) && !wanted_hosts.contains(name) {
                info!(link = %name, "deleting an orphan link");
                self.kernel.delete_link(link.ifindex)?;
                report.links_deleted.push(name.clone());
            }
        }
        if !report.links_created.is_empty() || !report.links_deleted.is_empty() {
            links = self.links()?;
        }

        // 3. Access and shaping.
        for (_, member) in &ready {
            if self.configure_member(member)? {
                report.members_configured.push(member.id.clone());
            }
        }

        // 4. Rules.
        let ready_ids: BTreeSet<&str> = ready.iter().map(|(_, m)| m.id.as_str()).collect();
        let mut desired_rules = BTreeSet::new();
        let mut external_pairs = BTreeSet::new();
        for bus in &desired.buses {
            let present = BusSpec {
                members: bus
                    .members
                    .iter()
                    .filter(|member| ready_ids.contains(member.id.as_str()))
                    .cloned()
                    .collect(),
                ..bus.clone()
            };
            let endpoints = plan::endpoints(&present, &links)?;
            let externals: Vec<u32> = endpoints
                .iter()
                .filter(|endpoint| !super::manager::is_member(endpoint))
                .filter_map(|endpoint| links.get(&endpoint.name).map(|link| link.ifindex))
                .collect();
            for &a in &externals {
                for &b in &externals {
                    external_pairs.insert((a, b));
                }
            }
            desired_rules.extend(
                plan::mesh(&endpoints)
                    .iter()
                    .filter_map(|rule| rule.resolve(&links)),
            );
        }
        let owned: BTreeSet<u32> = links
            .values()
            .filter(|link| is_owned(&link.name))
            .map(|link| link.ifindex)
            .collect();
        let mut kept: BTreeSet<Rule> = BTreeSet::new();
        for observed in self.kernel.rules()? {
            let managed = owned.contains(&observed.src)
                || owned.contains(&observed.dst)
                || external_pairs.contains(&(observed.src, observed.dst));
            if !managed {
                continue;
            }
            match observed.as_rule() {
                Some(rule) if desired_rules.contains(&rule) && kept.insert(rule) => {}
                _ => {
                    info!(
                        src = observed.src,
                        dst = observed.dst,
                        flags = observed.flags,
                        "deleting an orphan or duplicate rule"
                    );
                    self.kernel.delete_rule(&observed)?;
                    report.rules_deleted += 1;
                }
            }
        }
        for rule in desired_rules.difference(&kept) {
            self.kernel.add_rule(rule)?;
            report.rules_added += 1;
        }

        info!(?report, "reconciled");
        Ok(report)
    }

    /// Keeps a member's link when it is intact, otherwise (re)creates it.
    fn ensure_link(
        &mut self,
        member: &MemberSpec,
        existing: Option<&HostLink>,
        report: &mut ReconcileReport,
    ) -> Result<(), BusError> {
        let pod = self.kernel.pod_link(&member.netns, &member.interface)?;
        if let Some(host) = existing {
            let intact = pod.as_ref().is_some_and(|pod| {
                pod.peer_ifindex == Some(host.ifindex)
                    && pod.mtu == member.mtu()
                    && pod.up
                    && host.mtu == member.mtu()
                    && host.up
            });
            if intact {
                return Ok(());
            }
            info!(link = %host.name, "recreating a broken member link");
            self.kernel.delete_link(host.ifindex)?;
            report.links_deleted.push(host.name.clone());
        } else if pod.is_some() {
            return Err(BusError::InterfaceTaken {
                member: member.id.clone(),
                interface: member.interface.clone(),
                netns: member.netns.to_string(),
                other: None,
            });
        }
        let created = self.create_member(member)?;
        report.links_created.push(created.name);
        Ok(())
    }
}
