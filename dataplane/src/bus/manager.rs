//! [`Buses`]: the node's buses at run time. Members join and leave one at a time, touching only
//! their own link and rules, so the rest of the bus keeps flowing; a failed step undoes what
//! the operation already did.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tracing::{debug, info, info_span, warn};

use super::BusError;
use super::kernel::{End, HostLink, Kernel, KernelErrorKind, ObservedRule, PairRequest, Rule};
use super::model::{BusSpec, DesiredState, MemberSpec};
use super::naming::host_name;
use super::plan::{self, Endpoint, Role};
use crate::netns::NetnsId;

/// The node's buses, and the kernel they live in.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use can_dra_dataplane::bus::model::{BusSpec, MemberSpec, NetnsRef};
/// use can_dra_dataplane::bus::{Buses, system::SystemKernel};
/// let mut buses = Buses::new(SystemKernel::open()?);
/// buses.add_bus(BusSpec::new("body"))?;
/// buses.join("body", MemberSpec::new("claim-1", NetnsRef::Pid(4242), "can0"))?;
/// println!("{:?}", buses.counters("body", "claim-1")?);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Buses<K: Kernel> {
    pub(super) kernel: K,
    pub(super) state: DesiredState,
    /// The namespace identity each placed member lives in, to refuse two members with one
    /// interface name in the same namespace (whatever path or pid names it).
    pub(super) namespaces: HashMap<String, NetnsId>,
}

/// What a member's traffic looked like, from the kernel's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberCounters {
    /// Copies of the member's frames routed to other endpoints (one per destination).
    pub forwarded_from: u64,
    /// Frames routed to the member from other endpoints.
    pub forwarded_to: u64,
    /// Frames can-gw dropped on the member's rules (destination down, queue full).
    pub gateway_dropped: u64,
    /// Frames the member sent that listen-only or the transmit allow-list dropped.
    pub transmit_dropped: u64,
    /// Frames for the member that its receive filters dropped.
    pub receive_dropped: u64,
}

impl<K: Kernel> Buses<K> {
    /// Manages buses through `kernel`, starting from an empty desired state. Nothing is touched
    /// until a bus is added or [`reconcile`](Self::reconcile) runs.
    pub fn new(kernel: K) -> Self {
        Self {
            kernel,
            state: DesiredState::default(),
            namespaces: HashMap::new(),
        }
    }

    /// The desired state as the manager knows it (what a checkpoint should hold).
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// The kernel implementation, for tests that inspect or rig it.
    #[cfg(any(test, feature = "fake"))]
    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// Adds a bus with its external interfaces and any members in `spec`. On failure,
    /// whatever was created for it is removed again.
    pub fn add_bus(&mut self, spec: BusSpec) -> Result<(), BusError> {
        let _span = info_span!("bus", bus = %spec.name).entered();
        let mut candidate = self.state.clone();
        if candidate.bus(&spec.name).is_some() {
            return Err(BusError::DuplicateBus { bus: spec.name });
        }
        candidate.buses.push(spec.clone());
        plan::validate(&candidate)?;

        let members = spec.members.clone();
        let shell = BusSpec {
            members: Vec::new(),
            ..spec
        };
        let links = self.links()?;
        let externals = plan::endpoints(&shell, &links)?;
        // External interfaces are connected to each other here; members bring their own rules.
        let mut added = Vec::new();
        for rule in plan::mesh(&externals) {
            let Some(rule) = rule.resolve(&links) else {
                continue;
            };
            if let Err(error) = self.kernel.add_rule(&rule) {
                self.undo_rules(&added);
                return Err(error.into());
            }
            added.push(rule);
        }
        let name = shell.name.clone();
        self.state.buses.push(shell);
        for member in members {
            if let Err(error) = self.join(&name, member) {
                if let Err(undo) = self.remove_bus(&name) {
                    warn!(%undo, "could not remove the partly built bus");
                }
                return Err(error);
            }
        }
        info!("bus added");
        Ok(())
    }

    /// Removes a bus: its members' links (with their rules, qdiscs and filters) and the rules
    /// between its external interfaces.
    pub fn remove_bus(&mut self, name: &str) -> Result<(), BusError> {
        let _span = info_span!("bus", bus = %name).entered();
        let bus = self
            .state
            .bus(name)
            .cloned()
            .ok_or_else(|| BusError::UnknownBus { bus: name.into() })?;
        for member in &bus.members {
            self.leave(name, &member.id)?;
        }
        let links = self.links()?;
        let externals = plan::endpoints(
            &BusSpec {
                members: Vec::new(),
                ..bus
            },
            &links,
        )
        .unwrap_or_default();
        let wanted: Vec<_> = plan::mesh(&externals)
            .iter()
            .filter_map(|rule| rule.resolve(&links))
            .collect();
        if !wanted.is_empty() {
            let mut observed = self.kernel.rules()?;
            for rule in wanted {
                // Delete every copy: a duplicate left by a crash would otherwise survive.
                while let Some(position) = observed.iter().position(|o| o.as_rule() == Some(rule)) {
                    let found = observed.remove(position);
                    self.kernel.delete_rule(&found)?;
                }
            }
        }
        self.state.buses.retain(|other| other.name != name);
        info!("bus removed");
        Ok(())
    }

    /// Adds a member to a bus: creates its link straight into its namespace, installs its
    /// access policy and shaping, then the rules to and from every other endpoint. Other
    /// members are not touched. On failure the member's link is deleted, which takes its
    /// rules and qdiscs with it.
    pub fn join(&mut self, bus_name: &str, member: MemberSpec) -> Result<(), BusError> {
        let _span = info_span!("member", bus = %bus_name, member = %member.id).entered();
        let bus = self
            .state
            .bus(bus_name)
            .cloned()
            .ok_or_else(|| BusError::UnknownBus {
                bus: bus_name.into(),
            })?;
        let mut candidate = self.state.clone();
        if let Some(target) = candidate.bus_mut(bus_name) {
            target.members.push(member.clone());
        }
        plan::validate(&candidate)?;
        let netns_id = self.check_namespace(&member)?;
        let mut links = self.links()?;
        let host = host_name(&member.id);
        if let Some(stale) = links.remove(&host) {
            // Left by an earlier run for this member id: start clean.
            debug!(link = %host, "removing a stale link of this member");
            self.kernel.delete_link(stale.ifindex)?;
        }
        if self
            .kernel
            .pod_link(&member.netns, &member.interface)?
            .is_some()
        {
            return Err(BusError::InterfaceTaken {
                member: member.id.clone(),
                interface: member.interface.clone(),
                netns: member.netns.to_string(),
                other: None,
            });
        }
        let created = self.create_member(&member)?;
        if let Err(error) = self.connect_member(&bus, &member, &created, &mut links) {
            if let Err(undo) = self.kernel.delete_link(created.ifindex) {
                warn!(%undo, "could not delete the half-joined member's link");
            }
            return Err(error);
        }
        if let Some(target) = self.state.bus_mut(bus_name) {
            target.members.push(member.clone());
        }
        self.namespaces.insert(member.id, netns_id);
        info!(link = %created.name, "member joined");
        Ok(())
    }

    /// Removes a member: deleting its host end deletes the pair, and the kernel drops the
    /// rules, qdiscs and filters attached to it. A link already gone (the pod's namespace was
    /// destroyed) is fine.
    pub fn leave(&mut self, bus_name: &str, member_id: &str) -> Result<(), BusError> {
        let _span = info_span!("member", bus = %bus_name, member = %member_id).entered();
        let bus = self
            .state
            .bus(bus_name)
            .ok_or_else(|| BusError::UnknownBus {
                bus: bus_name.into(),
            })?;
        if bus.member(member_id).is_none() {
            return Err(BusError::UnknownMember {
                bus: bus_name.into(),
                id: member_id.into(),
            });
        }
        let host = host_name(member_id);
        if let Some(link) = self.links()?.get(&host) {
            match self.kernel.delete_link(link.ifindex) {
                Ok(()) => {}
                Err(error) if error.kind == KernelErrorKind::NoDevice => {}
                Err(error) => return Err(error.into()),
            }
        }
        if let Some(target) = self.state.bus_mut(bus_name) {
            target.members.retain(|member| member.id != member_id);
        }
        self.namespaces.remove(member_id);
        info!("member left");
        Ok(())
    }

    /// Replaces a bus's external interfaces (its physical controller and its tunnel end),
    /// leaving its members in place: rules that only the old externals needed are deleted (every
    /// copy), rules the new ones need are added once. Calling it again with the same interfaces
    /// changes nothing, and duplicates a crash left behind are removed. The new interfaces must
    /// exist; nothing is changed when one does not.
    pub fn set_externals(
        &mut self,
        bus_name: &str,
        physical: Option<String>,
        tunnel: Option<String>,
    ) -> Result<(), BusError> {
        let _span = info_span!("bus", bus = %bus_name).entered();
        let old = self
            .state
            .bus(bus_name)
            .cloned()
            .ok_or_else(|| BusError::UnknownBus {
                bus: bus_name.into(),
            })?;
        let new = BusSpec {
            physical,
            tunnel,
            ..old.clone()
        };
        let mut candidate = self.state.clone();
        if let Some(target) = candidate.bus_mut(bus_name) {
            *target = new.clone();
        }
        plan::validate(&candidate)?;
        let links = self.links()?;
        let wanted: BTreeSet<Rule> = plan::mesh(&plan::endpoints(&new, &links)?)
            .iter()
            .filter_map(|rule| rule.resolve(&links))
            .collect();
        // An old external that is gone took its rules with it, so a failure here only means
        // fewer rules to look for: the members' rules are then checked against `wanted` alone.
        let before: BTreeSet<Rule> = plan::endpoints(&old, &links)
            .map(|endpoints| {
                plan::mesh(&endpoints)
                    .iter()
                    .filter_map(|rule| rule.resolve(&links))
                    .collect()
            })
            .unwrap_or_default();
        let mut kept = BTreeSet::new();
        for observed in self.kernel.rules()? {
            let Some(rule) = observed.as_rule() else {
                continue;
            };
            if wanted.contains(&rule) && kept.insert(rule) {
                continue;
            }
            if wanted.contains(&rule) || before.contains(&rule) {
                self.kernel.delete_rule(&observed)?;
            }
        }
        for rule in wanted.difference(&kept) {
            self.kernel.add_rule(rule)?;
        }
        if let Some(target) = self.state.bus_mut(bus_name) {
            *target = new;
        }
        info!(physical = ?self.state.bus(bus_name).and_then(|b| b.physical.clone()),
            tunnel = ?self.state.bus(bus_name).and_then(|b| b.tunnel.clone()),
            "bus externals set");
        Ok(())
    }

    /// Frames forwarded and dropped for one member, from the can-gw rule counters and the
    /// access module's drop counters.
    pub fn counters(
        &mut self,
        bus_name: &str,
        member_id: &str,
    ) -> Result<MemberCounters, BusError> {
        let bus = self
            .state
            .bus(bus_name)
            .ok_or_else(|| BusError::UnknownBus {
                bus: bus_name.into(),
            })?;
        let member = bus
            .member(member_id)
            .ok_or_else(|| BusError::UnknownMember {
                bus: bus_name.into(),
                id: member_id.into(),
            })?;
        let host = host_name(member_id);
        let restricted = member.access_policy().is_some();
        let links = self.links()?;
        let Some(link) = links.get(&host) else {
            return Ok(MemberCounters::default());
        };
        let mut counters = MemberCounters::default();
        for rule in self.kernel.rules()? {
            if rule.src == link.ifindex {
                counters.forwarded_from += rule.handled;
                counters.gateway_dropped += rule.dropped;
            } else if rule.dst == link.ifindex {
                counters.forwarded_to += rule.handled;
                counters.gateway_dropped += rule.dropped;
            }
        }
        if restricted {
            let access = self.kernel.access_counters(&host)?;
            counters.transmit_dropped = access.transmit_dropped;
            counters.receive_dropped = access.receive_dropped;
        }
        Ok(counters)
    }

    /// Every host link, by name.
    pub(super) fn links(&mut self) -> Result<BTreeMap<String, HostLink>, BusError> {
        Ok(self
            .kernel
            .host_links()?
            .into_iter()
            .map(|link| (link.name.clone(), link))
            .collect())
    }

    /// Resolves the member's namespace and refuses an interface name another member already
    /// uses in that namespace.
    pub(super) fn check_namespace(&mut self, member: &MemberSpec) -> Result<NetnsId, BusError> {
        let id =
            self.kernel
                .namespace_id(&member.netns)
                .map_err(|error| BusError::NamespaceGone {
                    member: member.id.clone(),
                    netns: member.netns.to_string(),
                    detail: error.detail,
                })?;
        let clash = self
            .state
            .buses
            .iter()
            .flat_map(|bus| &bus.members)
            .find(|other| {
                other.id != member.id
                    && other.interface == member.interface
                    && self.namespaces.get(&other.id) == Some(&id)
            });
        if let Some(other) = clash {
            return Err(BusError::InterfaceTaken {
                member: member.id.clone(),
                interface: member.interface.clone(),
                netns: member.netns.to_string(),
                other: Some(other.id.clone()),
            });
        }
        Ok(id)
    }

    /// Creates the member's pair; then access and shaping, so restrictions are in force before
    /// a rule routes anything. On failure the pair is deleted again.
    pub(super) fn create_member(&mut self, member: &MemberSpec) -> Result<HostLink, BusError> {
        let request = PairRequest {
            host_name: host_name(&member.id),
            netns: member.netns.clone(),
            pod_name: member.interface.clone(),
            mtu: member.mtu(),
        };
        let created = self.kernel.create_pair(&request).map_err(|error| {
            if error.kind == KernelErrorKind::Exists {
                BusError::InterfaceTaken {
                    member: member.id.clone(),
                    interface: member.interface.clone(),
                    netns: member.netns.to_string(),
                    other: None,
                }
            } else {
                error.into()
            }
        })?;
        if let Err(error) = self.configure_member(member) {
            if let Err(undo) = self.kernel.delete_link(created.ifindex) {
                warn!(%undo, "could not delete a half-configured member link");
            }
            return Err(error);
        }
        Ok(created)
    }

    /// Brings the member's access policy and shaping to the desired state. Returns whether
    /// anything changed.
    pub(super) fn configure_member(&mut self, member: &MemberSpec) -> Result<bool, BusError> {
        let host = host_name(&member.id);
        let mut changed = false;
        let wanted = member.access_policy();
        if self.kernel.access(&host)? != wanted {
            match &wanted {
                Some(policy) => self.kernel.apply_access(&host, policy)?,
                None => self.kernel.clear_access(&host)?,
            }
            changed = true;
        }
        let ends = [
            (End::Host { name: host }, member.effective_rx_shaping()),
            (
                End::Pod {
                    netns: member.netns.clone(),
                    interface: member.interface.clone(),
                },
                member.effective_tx_shaping(),
            ),
        ];
        for (end, wanted) in ends {
            if self.kernel.shaping(&end)? != wanted {
                match &wanted {
                    Some(shaping) => self.kernel.apply_shaping(&end, shaping)?,
                    None => self.kernel.clear_shaping(&end)?,
                }
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Adds the rules between a freshly created member and the bus's other endpoints.
    fn connect_member(
        &mut self,
        bus: &BusSpec,
        member: &MemberSpec,
        created: &HostLink,
        links: &mut BTreeMap<String, HostLink>,
    ) -> Result<(), BusError> {
        links.insert(created.name.clone(), created.clone());
        let others = plan::endpoints(bus, links)?;
        let one = plan::member_endpoint(member);
        for rule in plan::rules_for(&one, &others) {
            let Some(resolved) = rule.resolve(links) else {
                // A member whose link vanished (its pod died) has nothing to connect to.
                debug!(src = %rule.src, dst = %rule.dst, "skipping a rule to a missing link");
                continue;
            };
            self.kernel.add_rule(&resolved)?;
        }
        Ok(())
    }

    fn undo_rules(&mut self, added: &[super::kernel::Rule]) {
        if added.is_empty() {
            return;
        }
        let observed: Vec<ObservedRule> = self.kernel.rules().unwrap_or_default();
        for rule in added {
            if let Some(found) = observed.iter().find(|o| o.as_rule() == Some(*rule))
                && let Err(undo) = self.kernel.delete_rule(found)
            {
                warn!(%undo, "could not remove a rule while undoing");
            }
        }
    }
}

/// Whether an endpoint is a member (and not an external interface).
pub(super) fn is_member(endpoint: &Endpoint) -> bool {
    matches!(endpoint.role, Role::Member(_))
}
