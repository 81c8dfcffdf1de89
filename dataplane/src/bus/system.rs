//! [`SystemKernel`]: the [`Kernel`] trait over the real kernel, through the `link` and
//! `gateway` modules, and the `shaping` and `access` modules for tc state.
//!
//! Namespace handles are opened per operation and never cached: holding one would keep a dead
//! pod's namespace (and its links) alive.

use std::time::Duration;

use crate::access;
use crate::gateway::{self, FrameKind, GatewayError, GwRule};
use crate::link::{CanMtu, LinkError, LinkInfo, Links, VxcanSpec};
use crate::netlink::RouteSocket;
use crate::netns::{Netns, NetnsError, NetnsId};
use crate::shaping;

use super::kernel::{
    AccessCounters, End, FLAG_ECHO, FLAG_FD, FLAG_IIF_TX_OK, HostLink, Kernel, KernelError,
    KernelErrorKind, LinkKind, ObservedRule, PairRequest, PodLink, Rule,
};
use super::model::{CANFD_MTU, CanFilter, MemberAccess, MemberShaping, NetnsRef};

/// The hop limit put on every mesh rule: a routed frame is never routed again, whatever
/// `max_hops` the can-gw module was loaded with, so echoes on a `vcan` cannot become copies.
pub const RULE_HOP_LIMIT: u8 = 1;

/// The real kernel, seen from one host namespace.
#[derive(Debug)]
pub struct SystemKernel {
    links: Links,
    gateway: RouteSocket,
}

impl SystemKernel {
    /// Works in the calling thread's namespace (the node's host namespace).
    pub fn open() -> Result<Self, KernelError> {
        let netns = Netns::current().map_err(|e| namespace_error("the current namespace", &e))?;
        Self::open_in(&netns)
    }

    /// Works in `netns` as the host namespace (tests use a fresh namespace per test).
    pub fn open_in(netns: &Netns) -> Result<Self, KernelError> {
        let links = Links::open_in(netns).map_err(|e| link_error("opening links", e))?;
        let gateway = RouteSocket::open_in(netns).map_err(|e| {
            KernelError::new(
                format!("opening a netlink socket in {}", netns.label()),
                KernelErrorKind::Other,
                e.to_string(),
            )
        })?;
        Ok(Self { links, gateway })
    }
}

fn open_netns(netns: &NetnsRef) -> Result<Netns, KernelError> {
    match netns {
        NetnsRef::Path(path) => Netns::from_path(path),
        NetnsRef::Pid(pid) => Netns::from_pid(*pid),
    }
    .map_err(|error| namespace_error(&netns.to_string(), &error))
}

fn namespace_error(label: &str, error: &NetnsError) -> KernelError {
    KernelError::new(
        format!("opening network namespace {label}"),
        KernelErrorKind::NamespaceGone,
        error.to_string(),
    )
}

fn link_error(operation: &str, error: LinkError) -> KernelError {
    let kind = match &error {
        LinkError::Exists { .. } | LinkError::IndexInUse { .. } => KernelErrorKind::Exists,
        LinkError::NotFound { .. } => KernelErrorKind::NoDevice,
        LinkError::PermissionDenied { .. } => KernelErrorKind::Permission,
        LinkError::ModuleMissing { module, .. } => KernelErrorKind::ModuleMissing(module),
        LinkError::Namespace(_) => KernelErrorKind::NamespaceGone,
        _ => KernelErrorKind::Other,
    };
    KernelError::new(operation, kind, error.to_string())
}

fn gateway_error(operation: &str, error: GatewayError) -> KernelError {
    let kind = match &error {
        GatewayError::NoSuchInterface { .. } => KernelErrorKind::NoDevice,
        GatewayError::PermissionDenied { .. } => KernelErrorKind::Permission,
        GatewayError::ModuleMissing { .. } => KernelErrorKind::ModuleMissing("can-gw"),
        _ => KernelErrorKind::Other,
    };
    KernelError::new(operation, kind, error.to_string())
}

fn link_kind(kind: Option<&str>) -> LinkKind {
    match kind {
        Some("can") => LinkKind::Can,
        Some("vcan") => LinkKind::Vcan,
        Some("vxcan") => LinkKind::Vxcan,
        other => LinkKind::Other(other.unwrap_or_default().to_string()),
    }
}

fn host_link(info: LinkInfo) -> HostLink {
    HostLink {
        kind: link_kind(info.kind.as_deref()),
        name: info.name,
        ifindex: info.index,
        mtu: info.mtu,
        up: info.up,
    }
}

/// The gateway rule for a mesh rule: flags as planned, no filter, the hop limit.
pub fn gw_rule(rule: &Rule) -> GwRule {
    let frames = if rule.flags & FLAG_FD != 0 {
        FrameKind::Fd
    } else {
        FrameKind::Classic
    };
    let mut gw = GwRule::new(rule.src, rule.dst, frames);
    gw.echo = rule.flags & FLAG_ECHO != 0;
    gw.iif_tx_ok = rule.flags & FLAG_IIF_TX_OK != 0;
    gw.limit_hops = Some(RULE_HOP_LIMIT);
    gw
}

/// A dumped rule in the bus's terms: anything but the bus's own shape counts as an extra.
pub fn observed_rule(stats: &gateway::GwRuleStats) -> ObservedRule {
    let rule = stats.rule.normalized();
    let mut flags = 0;
    if rule.echo {
        flags |= FLAG_ECHO;
    }
    if rule.iif_tx_ok {
        flags |= FLAG_IIF_TX_OK;
    }
    if rule.frames == FrameKind::Fd {
        flags |= FLAG_FD;
    }
    let extra = stats.modifies_frames
        || rule.src_tstamp
        || rule.filter.is_some()
        || rule.limit_hops != Some(RULE_HOP_LIMIT);
    ObservedRule {
        src: rule.src,
        dst: rule.dst,
        flags,
        extra,
        handled: u64::from(stats.handled),
        dropped: u64::from(stats.dropped),
        deleted: u64::from(stats.deleted),
        exact: (!stats.modifies_frames).then_some(stats.rule),
    }
}

impl Kernel for SystemKernel {
    fn namespace_id(&mut self, netns: &NetnsRef) -> Result<NetnsId, KernelError> {
        open_netns(netns).map(|handle| handle.id())
    }

    fn host_links(&mut self) -> Result<Vec<HostLink>, KernelError> {
        let links = self
            .links
            .list()
            .map_err(|e| link_error("listing host links", e))?;
        Ok(links.into_iter().map(host_link).collect())
    }

    fn pod_link(&mut self, netns: &NetnsRef, name: &str) -> Result<Option<PodLink>, KernelError> {
        let operation = format!("looking up {name} in {netns}");
        let handle = open_netns(netns)?;
        let mut links = Links::open_in(&handle).map_err(|e| link_error(&operation, e))?;
        let info = links.by_name(name).map_err(|e| link_error(&operation, e))?;
        Ok(info.map(|info| PodLink {
            ifindex: info.index,
            peer_ifindex: info.peer_index,
            kind: link_kind(info.kind.as_deref()),
            mtu: info.mtu,
            up: info.up,
        }))
    }

    fn create_pair(&mut self, request: &PairRequest) -> Result<HostLink, KernelError> {
        let operation = format!(
            "creating vxcan pair {} <-> {} in {}",
            request.host_name, request.pod_name, request.netns
        );
        let handle = open_netns(&request.netns)?;
        let mtu = if request.mtu >= CANFD_MTU {
            CanMtu::Fd
        } else {
            CanMtu::Classic
        };
        let spec = VxcanSpec::new(&request.host_name, &request.pod_name, mtu);
        let pair = self
            .links
            .create_vxcan(&spec, &handle)
            .map_err(|e| link_error(&operation, e))?;
        Ok(HostLink {
            name: pair.host.name,
            ifindex: pair.host.index,
            kind: LinkKind::Vxcan,
            mtu: mtu.bytes(),
            up: true,
        })
    }

    fn delete_link(&mut self, ifindex: u32) -> Result<(), KernelError> {
        self.links
            .delete(ifindex)
            .map_err(|e| link_error(&format!("deleting link {ifindex}"), e))
    }

    fn rules(&mut self) -> Result<Vec<ObservedRule>, KernelError> {
        let rules = gateway::list(&mut self.gateway)
            .map_err(|e| gateway_error("listing can-gw rules", e))?;
        Ok(rules.iter().map(observed_rule).collect())
    }

    fn add_rule(&mut self, rule: &Rule) -> Result<(), KernelError> {
        let gw = gw_rule(rule);
        gateway::add(&mut self.gateway, &gw).map_err(|e| gateway_error(&format!("adding {gw}"), e))
    }

    fn delete_rule(&mut self, rule: &ObservedRule) -> Result<(), KernelError> {
        let operation = format!("deleting can-gw rule if{} -> if{}", rule.src, rule.dst);
        let exact = rule.exact.ok_or_else(|| {
            KernelError::new(
                &operation,
                KernelErrorKind::Other,
                "the rule modifies frames; only removing one of its interfaces removes it",
            )
        })?;
        gateway::delete(&mut self.gateway, &exact).map_err(|e| gateway_error(&operation, e))
    }

    fn shaping(&mut self, end: &End) -> Result<Option<MemberShaping>, KernelError> {
        let operation = format!("reading shaping on {end}");
        let (mut socket, ifindex) = self.end_socket(end, &operation)?;
        let socket = socket.as_mut().unwrap_or(&mut self.gateway);
        match shaping::read(socket, ifindex) {
            Ok(found) => Ok(found.map(|found| from_shaping(&found))),
            // Someone else's qdisc under our handle: report something no spec equals, so the
            // caller replaces (or clears) it.
            Err(shaping::ShapingError::Unrecognised { .. }) => Ok(Some(MemberShaping {
                bitrate: Some(0),
                ..MemberShaping::default()
            })),
            Err(error) => Err(shaping_error(&operation, error)),
        }
    }

    fn apply_shaping(&mut self, end: &End, wanted: &MemberShaping) -> Result<(), KernelError> {
        let operation = format!("shaping {end}");
        let (mut socket, ifindex) = self.end_socket(end, &operation)?;
        let socket = socket.as_mut().unwrap_or(&mut self.gateway);
        shaping::apply(socket, ifindex, &to_shaping(wanted))
            .map_err(|error| shaping_error(&operation, error))
    }

    fn clear_shaping(&mut self, end: &End) -> Result<(), KernelError> {
        let operation = format!("clearing shaping on {end}");
        let (mut socket, ifindex) = self.end_socket(end, &operation)?;
        let socket = socket.as_mut().unwrap_or(&mut self.gateway);
        shaping::clear(socket, ifindex).map_err(|error| shaping_error(&operation, error))
    }

    fn access(&mut self, host_name: &str) -> Result<Option<MemberAccess>, KernelError> {
        let operation = format!("reading the access policy of {host_name}");
        let ifindex = self.host_index(host_name, &operation)?;
        match access::read(&mut self.gateway, ifindex) {
            Ok(found) => Ok(from_access(&found)),
            // Filters in a shape the access module does not build: report the open policy,
            // which no member asks for explicitly, so the caller replaces or clears them.
            Err(access::AccessError::Unrecognised { .. }) => Ok(Some(MemberAccess::default())),
            Err(error) => Err(access_error(&operation, error)),
        }
    }

    fn apply_access(&mut self, host_name: &str, policy: &MemberAccess) -> Result<(), KernelError> {
        let operation = format!("installing the access policy of {host_name}");
        let ifindex = self.host_index(host_name, &operation)?;
        access::apply(&mut self.gateway, ifindex, &to_access(policy))
            .map_err(|error| access_error(&operation, error))
    }

    fn clear_access(&mut self, host_name: &str) -> Result<(), KernelError> {
        let operation = format!("clearing the access policy of {host_name}");
        let ifindex = self.host_index(host_name, &operation)?;
        access::clear(&mut self.gateway, ifindex).map_err(|error| access_error(&operation, error))
    }

    fn access_counters(&mut self, host_name: &str) -> Result<AccessCounters, KernelError> {
        let operation = format!("reading the access counters of {host_name}");
        let ifindex = self.host_index(host_name, &operation)?;
        let counters = access::counters(&mut self.gateway, ifindex)
            .map_err(|error| access_error(&operation, error))?;
        Ok(AccessCounters {
            transmit_dropped: counters.transmit_dropped,
            receive_dropped: counters.receive_dropped,
        })
    }
}

impl SystemKernel {
    fn host_index(&mut self, name: &str, operation: &str) -> Result<u32, KernelError> {
        self.links
            .by_name(name)
            .map_err(|e| link_error(operation, e))?
            .map(|info| info.index)
            .ok_or_else(|| KernelError::new(operation, KernelErrorKind::NoDevice, "no such link"))
    }

    /// The socket and ifindex for one end: the host socket for the host end (`None`), a
    /// socket opened inside the member's namespace for its end.
    fn end_socket(
        &mut self,
        end: &End,
        operation: &str,
    ) -> Result<(Option<RouteSocket>, u32), KernelError> {
        match end {
            End::Host { name } => Ok((None, self.host_index(name, operation)?)),
            End::Pod { netns, interface } => {
                let handle = open_netns(netns)?;
                let mut links = Links::open_in(&handle).map_err(|e| link_error(operation, e))?;
                let ifindex = links
                    .by_name(interface)
                    .map_err(|e| link_error(operation, e))?
                    .map(|info| info.index)
                    .ok_or_else(|| {
                        KernelError::new(operation, KernelErrorKind::NoDevice, "no such link")
                    })?;
                let socket = RouteSocket::open_in(&handle).map_err(|e| {
                    KernelError::new(operation, KernelErrorKind::Other, e.to_string())
                })?;
                Ok((Some(socket), ifindex))
            }
        }
    }
}

fn shaping_error(operation: &str, error: shaping::ShapingError) -> KernelError {
    use shaping::ShapingError as E;
    let kind = match &error {
        E::ModuleMissing { module, .. } => KernelErrorKind::ModuleMissing(module),
        E::NoDevice { .. } => KernelErrorKind::NoDevice,
        E::PermissionDenied { .. } => KernelErrorKind::Permission,
        _ => KernelErrorKind::Other,
    };
    KernelError::new(operation, kind, error.to_string())
}

fn access_error(operation: &str, error: access::AccessError) -> KernelError {
    use access::AccessError as E;
    let kind = match &error {
        E::ModuleMissing { .. } => KernelErrorKind::ModuleMissing("cls_basic/em_canid/act_gact"),
        E::NoDevice { .. } => KernelErrorKind::NoDevice,
        E::PermissionDenied { .. } => KernelErrorKind::Permission,
        _ => KernelErrorKind::Other,
    };
    KernelError::new(operation, kind, error.to_string())
}

/// The shaping module's spec for a member's shaping (default queue limit).
pub fn to_shaping(wanted: &MemberShaping) -> shaping::Shaping {
    shaping::Shaping {
        bitrate: wanted.bitrate,
        data_bitrate: wanted.data_bitrate,
        delay: Duration::from_micros(u64::from(wanted.delay_us)),
        jitter: Duration::from_micros(u64::from(wanted.jitter_us)),
        loss_ppm: wanted.loss_ppm,
        duplicate_ppm: wanted.duplicate_ppm,
        ..shaping::Shaping::default()
    }
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

/// A member shaping from what the shaping module read back.
pub fn from_shaping(found: &shaping::Shaping) -> MemberShaping {
    MemberShaping {
        bitrate: found.bitrate,
        data_bitrate: found.data_bitrate,
        delay_us: micros(found.delay),
        jitter_us: micros(found.jitter),
        loss_ppm: found.loss_ppm,
        duplicate_ppm: found.duplicate_ppm,
    }
}

fn to_match(filter: &CanFilter) -> access::CanMatch {
    access::CanMatch {
        id: filter.id,
        mask: filter.mask,
        extended: filter.extended,
        invert: filter.invert,
    }
}

fn from_match(entry: &access::CanMatch) -> CanFilter {
    CanFilter {
        id: entry.id,
        mask: entry.mask,
        extended: entry.extended,
        invert: entry.invert,
    }
}

/// The access module's policy for a member's policy.
pub fn to_access(policy: &MemberAccess) -> access::AccessPolicy {
    let transmit = if policy.listen_only {
        access::TxPolicy::Nothing
    } else if policy.transmit_allow.is_empty() {
        access::TxPolicy::All
    } else {
        access::TxPolicy::Allow(policy.transmit_allow.iter().map(to_match).collect())
    };
    let receive = (!policy.receive_filters.is_empty())
        .then(|| policy.receive_filters.iter().map(to_match).collect());
    access::AccessPolicy { transmit, receive }
}

/// A member policy from what the access module read back (`None` when unrestricted).
pub fn from_access(found: &access::AccessPolicy) -> Option<MemberAccess> {
    let found = found.normalized();
    let (listen_only, transmit_allow) = match &found.transmit {
        access::TxPolicy::All => (false, Vec::new()),
        access::TxPolicy::Nothing => (true, Vec::new()),
        access::TxPolicy::Allow(entries) => (false, entries.iter().map(from_match).collect()),
    };
    let receive_filters: Vec<CanFilter> = found
        .receive
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(from_match)
        .collect();
    let policy = MemberAccess {
        listen_only,
        transmit_allow,
        receive_filters,
    };
    (!policy.is_open()).then_some(policy)
}
