//! An in-memory kernel for unit tests of the bus logic and, behind the `fake` feature, of the
//! crates that drive [`Buses`](super::Buses) (the node daemon). It models what the bus relies on:
//! per-namespace links, vxcan pairs that die together, can-gw rules that are not de-duplicated
//! and vanish with their interfaces, and qdisc/classifier state per end. Mutations are counted
//! and one can be made to fail, to test undo paths.

use std::collections::BTreeMap;

use super::kernel::{
    AccessCounters, End, HostLink, Kernel, KernelError, KernelErrorKind, LinkKind, ObservedRule,
    PairRequest, PodLink, Rule,
};
use super::model::{MemberAccess, MemberShaping, NetnsRef};
use crate::netns::NetnsId;

/// The in-memory kernel. Start from [`FakeKernel::new`] (a host namespace with `lo`).
#[derive(Debug, Default)]
pub struct FakeKernel {
    next_ifindex: u32,
    /// The links of the host namespace.
    pub host: Vec<HostLink>,
    namespaces: BTreeMap<NetnsRef, NetnsId>,
    pod_next: BTreeMap<NetnsId, u32>,
    /// The links inside member namespaces, by namespace and name.
    pub pods: BTreeMap<(NetnsId, String), PodLink>,
    /// The can-gw rules, in kernel order.
    pub rules: Vec<ObservedRule>,
    /// Shaping by end.
    pub shaping: BTreeMap<String, MemberShaping>,
    /// Access policies by host end.
    pub access: BTreeMap<String, MemberAccess>,
    /// can-gw is not loaded: adding a rule fails as a missing module.
    pub gateway_missing: bool,
    /// Mutating calls so far.
    pub mutations: usize,
    /// The mutation with this number (counted from 1) fails.
    pub fail_at: Option<usize>,
}

impl FakeKernel {
    /// A kernel whose host namespace holds only `lo`.
    pub fn new() -> Self {
        let mut kernel = Self {
            next_ifindex: 2,
            ..Self::default()
        };
        kernel.host.push(HostLink {
            name: "lo".into(),
            ifindex: 1,
            kind: LinkKind::Other(String::new()),
            mtu: 65536,
            up: true,
        });
        kernel
    }

    /// A new namespace reachable through `netns`.
    pub fn add_namespace(&mut self, netns: NetnsRef) -> NetnsId {
        let id = NetnsId {
            dev: 4,
            ino: 1000 + self.namespaces.len() as u64,
        };
        self.namespaces.insert(netns, id);
        // Index 1 is the namespace's loopback.
        self.pod_next.insert(id, 2);
        id
    }

    /// A second name for an existing namespace (a pid and a path, say).
    pub fn alias_namespace(&mut self, existing: &NetnsRef, alias: NetnsRef) {
        let id = self.namespaces[existing];
        self.namespaces.insert(alias, id);
    }

    /// The namespace dies: its links go, and with them their vxcan peers and rules.
    pub fn remove_namespace(&mut self, netns: &NetnsRef) {
        let Some(id) = self.namespaces.remove(netns) else {
            return;
        };
        self.namespaces.retain(|_, other| *other != id);
        let peers: Vec<u32> = self
            .pods
            .iter()
            .filter(|((ns, _), _)| *ns == id)
            .filter_map(|(_, pod)| pod.peer_ifindex)
            .collect();
        self.pods.retain(|(ns, _), _| *ns != id);
        for peer in peers {
            self.drop_host(peer);
        }
    }

    /// A link created behind the driver's back (a physical controller, a stray vxcan...).
    pub fn add_host_link(&mut self, name: &str, kind: LinkKind, mtu: u32) -> u32 {
        let ifindex = self.next_ifindex;
        self.next_ifindex += 1;
        self.host.push(HostLink {
            name: name.into(),
            ifindex,
            kind,
            mtu,
            up: true,
        });
        ifindex
    }

    /// A link inside a member namespace, not paired with anything.
    pub fn add_pod_link(&mut self, netns: &NetnsRef, name: &str) {
        let id = self.namespaces[netns];
        let ifindex = self.next_pod_index(id);
        self.pods.insert(
            (id, name.into()),
            PodLink {
                ifindex,
                peer_ifindex: None,
                kind: LinkKind::Vcan,
                mtu: 16,
                up: true,
            },
        );
    }

    /// A rule added behind the driver's back (`cangw -A`).
    pub fn push_rule(&mut self, src: u32, dst: u32, flags: u16, extra: bool) {
        self.rules.push(observed(src, dst, flags, extra));
    }

    /// The ifindex of a host link (0 if there is none).
    pub fn ifindex(&self, name: &str) -> u32 {
        self.host
            .iter()
            .find(|link| link.name == name)
            .map(|link| link.ifindex)
            .unwrap_or(0)
    }

    /// The name of a host link (empty if there is none).
    pub fn name_of(&self, ifindex: u32) -> String {
        self.host
            .iter()
            .find(|link| link.ifindex == ifindex)
            .map(|link| link.name.clone())
            .unwrap_or_default()
    }

    /// The rules as (src name, dst name, flags), in kernel order.
    pub fn named_rules(&self) -> Vec<(String, String, u16)> {
        self.rules
            .iter()
            .map(|rule| (self.name_of(rule.src), self.name_of(rule.dst), rule.flags))
            .collect()
    }

    fn next_pod_index(&mut self, id: NetnsId) -> u32 {
        let next = self.pod_next.entry(id).or_insert(2);
        let ifindex = *next;
        *next += 1;
        ifindex
    }

    fn mutate(&mut self, operation: &str) -> Result<(), KernelError> {
        self.mutations += 1;
        if self.fail_at == Some(self.mutations) {
            return Err(KernelError::new(
                operation,
                KernelErrorKind::Other,
                "injected failure",
            ));
        }
        Ok(())
    }

    fn drop_host(&mut self, ifindex: u32) {
        let Some(position) = self.host.iter().position(|link| link.ifindex == ifindex) else {
            return;
        };
        let link = self.host.remove(position);
        self.pods.retain(|_, pod| pod.peer_ifindex != Some(ifindex));
        self.rules
            .retain(|rule| rule.src != ifindex && rule.dst != ifindex);
        self.shaping.remove(&format!("host:{}", link.name));
        self.access.remove(&link.name);
        let live: Vec<String> = self
            .pods
            .keys()
            .map(|(ns, name)| format!("pod:{}:{name}", ns.ino))
            .collect();
        self.shaping
            .retain(|key, _| key.starts_with("host:") || live.contains(key));
    }

    fn end_key(&self, end: &End) -> Result<String, KernelError> {
        match end {
            End::Host { name } => Ok(format!("host:{name}")),
            End::Pod { netns, interface } => {
                let id = self.namespaces.get(netns).ok_or_else(|| gone(netns))?;
                Ok(format!("pod:{}:{interface}", id.ino))
            }
        }
    }
}

fn observed(src: u32, dst: u32, flags: u16, extra: bool) -> ObservedRule {
    ObservedRule {
        src,
        dst,
        flags,
        extra,
        handled: 0,
        dropped: 0,
        deleted: 0,
        exact: None,
    }
}

fn gone(netns: &NetnsRef) -> KernelError {
    KernelError::new(
        format!("opening network namespace {netns}"),
        KernelErrorKind::NamespaceGone,
        "no such file or directory",
    )
}

impl Kernel for FakeKernel {
    fn namespace_id(&mut self, netns: &NetnsRef) -> Result<NetnsId, KernelError> {
        self.namespaces
            .get(netns)
            .copied()
            .ok_or_else(|| gone(netns))
    }

    fn host_links(&mut self) -> Result<Vec<HostLink>, KernelError> {
        Ok(self.host.clone())
    }

    fn pod_link(&mut self, netns: &NetnsRef, name: &str) -> Result<Option<PodLink>, KernelError> {
        let id = self.namespace_id(netns)?;
        Ok(self.pods.get(&(id, name.to_string())).cloned())
    }

    fn create_pair(&mut self, request: &PairRequest) -> Result<HostLink, KernelError> {
        let operation = format!("creating vxcan pair {}", request.host_name);
        let id = self.namespace_id(&request.netns)?;
        self.mutate(&operation)?;
        if self.host.iter().any(|link| link.name == request.host_name)
            || self.pods.contains_key(&(id, request.pod_name.clone()))
        {
            return Err(KernelError::new(
                operation,
                KernelErrorKind::Exists,
                "EEXIST",
            ));
        }
        let ifindex = self.add_host_link(&request.host_name, LinkKind::Vxcan, request.mtu);
        let pod_index = self.next_pod_index(id);
        self.pods.insert(
            (id, request.pod_name.clone()),
            PodLink {
                ifindex: pod_index,
                peer_ifindex: Some(ifindex),
                kind: LinkKind::Vxcan,
                mtu: request.mtu,
                up: true,
            },
        );
        Ok(self.host[self.host.len() - 1].clone())
    }

    fn delete_link(&mut self, ifindex: u32) -> Result<(), KernelError> {
        self.mutate(&format!("deleting link {ifindex}"))?;
        if !self.host.iter().any(|link| link.ifindex == ifindex) {
            return Err(KernelError::new(
                format!("deleting link {ifindex}"),
                KernelErrorKind::NoDevice,
                "ENODEV",
            ));
        }
        self.drop_host(ifindex);
        Ok(())
    }

    fn rules(&mut self) -> Result<Vec<ObservedRule>, KernelError> {
        Ok(self.rules.clone())
    }

    fn add_rule(&mut self, rule: &Rule) -> Result<(), KernelError> {
        let operation = format!("adding can-gw rule {} -> {}", rule.src, rule.dst);
        if self.gateway_missing {
            return Err(KernelError::new(
                operation,
                KernelErrorKind::ModuleMissing("can-gw"),
                "EPROTONOSUPPORT",
            ));
        }
        self.mutate(&operation)?;
        let exists = |index| self.host.iter().any(|link| link.ifindex == index);
        if !exists(rule.src) || !exists(rule.dst) {
            return Err(KernelError::new(
                operation,
                KernelErrorKind::NoDevice,
                "ENODEV",
            ));
        }
        self.rules
            .push(observed(rule.src, rule.dst, rule.flags, false));
        Ok(())
    }

    fn delete_rule(&mut self, rule: &ObservedRule) -> Result<(), KernelError> {
        let operation = format!("deleting can-gw rule {} -> {}", rule.src, rule.dst);
        self.mutate(&operation)?;
        let position = self
            .rules
            .iter()
            .position(|other| {
                (other.src, other.dst, other.flags, other.extra)
                    == (rule.src, rule.dst, rule.flags, rule.extra)
            })
            .ok_or_else(|| KernelError::new(&operation, KernelErrorKind::Other, "EINVAL"))?;
        self.rules.remove(position);
        Ok(())
    }

    fn shaping(&mut self, end: &End) -> Result<Option<MemberShaping>, KernelError> {
        let key = self.end_key(end)?;
        Ok(self.shaping.get(&key).copied())
    }

    fn apply_shaping(&mut self, end: &End, shaping: &MemberShaping) -> Result<(), KernelError> {
        self.mutate(&format!("shaping {end}"))?;
        let key = self.end_key(end)?;
        self.shaping.insert(key, *shaping);
        Ok(())
    }

    fn clear_shaping(&mut self, end: &End) -> Result<(), KernelError> {
        self.mutate(&format!("clearing shaping on {end}"))?;
        let key = self.end_key(end)?;
        self.shaping.remove(&key);
        Ok(())
    }

    fn access(&mut self, host_name: &str) -> Result<Option<MemberAccess>, KernelError> {
        Ok(self.access.get(host_name).cloned())
    }

    fn apply_access(&mut self, host_name: &str, policy: &MemberAccess) -> Result<(), KernelError> {
        self.mutate(&format!("access policy on {host_name}"))?;
        self.access.insert(host_name.into(), policy.clone());
        Ok(())
    }

    fn clear_access(&mut self, host_name: &str) -> Result<(), KernelError> {
        self.mutate(&format!("clearing access policy on {host_name}"))?;
        self.access.remove(host_name);
        Ok(())
    }

    fn access_counters(&mut self, _host_name: &str) -> Result<AccessCounters, KernelError> {
        Ok(AccessCounters::default())
    }
}
