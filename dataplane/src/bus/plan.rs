//! The mesh plan: which endpoints a bus has and which can-gw rules connect them. Pure logic,
//! no kernel access, so every case is unit-tested.
//!
//! Rules of the mesh:
//! - one rule per ordered pair of endpoints and frame kind; classic between every pair, FD only
//!   when both ends are FD-capable (a rule carries one frame kind);
//! - no rule from a listen-only member;
//! - every rule sets `IIF_TX_OK`, because a frame's first-ingress ifindex is the sender's index
//!   in its own namespace and may equal the destination's host index by chance (the kernel then
//!   skips the frame silently);
//! - `ECHO` only towards `vcan` destinations, so local sockets there see routed frames; never
//!   towards vxcan, where the echo would come back as copies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::BusError;
use super::kernel::{FLAG_ECHO, FLAG_FD, FLAG_IIF_TX_OK, HostLink, LinkKind, Rule};
use super::model::{BusSpec, CanFilter, DesiredState, MemberSpec};
use super::naming::{host_name, is_owned};
use crate::link;

/// The part an endpoint plays in a bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A member, by id.
    Member(String),
    /// The bus's physical controller (or its stand-in).
    Physical,
    /// The bus's tunnel endpoint.
    Tunnel,
}

/// One host interface taking part in a bus mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host interface name.
    pub name: String,
    /// What the endpoint is.
    pub role: Role,
    /// Whether FD frames may be routed to and from it.
    pub fd: bool,
    /// Whether frames from it are routed (false for listen-only members).
    pub transmits: bool,
    /// Whether routed frames are echoed to local sockets on it (vcan only).
    pub echo: bool,
}

/// A mesh rule between two named host interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedRule {
    /// Source interface.
    pub src: String,
    /// Destination interface.
    pub dst: String,
    /// `CGW_FLAGS_*`.
    pub flags: u16,
}

impl NamedRule {
    /// The rule with interface indexes from `links` (name -> link), or `None` if an end is missing.
    pub fn resolve(&self, links: &BTreeMap<String, HostLink>) -> Option<Rule> {
        Some(Rule {
            src: links.get(&self.src)?.ifindex,
            dst: links.get(&self.dst)?.ifindex,
            flags: self.flags,
        })
    }

    /// Whether the rule carries FD frames.
    pub fn is_fd(&self) -> bool {
        self.flags & FLAG_FD != 0
    }
}

/// The endpoint of a member (its host end).
pub fn member_endpoint(member: &MemberSpec) -> Endpoint {
    Endpoint {
        name: host_name(&member.id),
        role: Role::Member(member.id.clone()),
        fd: member.fd,
        transmits: member.transmits(),
        echo: false,
    }
}

/// Every endpoint of a bus. External interfaces are looked up in `links` (name -> link).
pub fn endpoints(
    bus: &BusSpec,
    links: &BTreeMap<String, HostLink>,
) -> Result<Vec<Endpoint>, BusError> {
    let mut result: Vec<Endpoint> = bus.members.iter().map(member_endpoint).collect();
    for (name, role) in [(&bus.physical, Role::Physical), (&bus.tunnel, Role::Tunnel)] {
        let Some(name) = name else { continue };
        let link = links.get(name).ok_or_else(|| BusError::UnknownInterface {
            bus: bus.name.clone(),
            interface: name.clone(),
        })?;
        if !link.kind.is_can() {
            return Err(BusError::NotCan {
                bus: bus.name.clone(),
                interface: name.clone(),
                kind: link.kind.to_string(),
            });
        }
        result.push(Endpoint {
            name: name.clone(),
            role,
            fd: bus.fd && link.mtu >= super::model::CANFD_MTU,
            transmits: true,
            echo: link.kind == LinkKind::Vcan,
        });
    }
    Ok(result)
}

/// The rules from `src` to `dst` (classic, plus FD when both can carry it); none when `src`
/// does not transmit.
pub fn rules_between(src: &Endpoint, dst: &Endpoint) -> Vec<NamedRule> {
    if !src.transmits || src.name == dst.name {
        return Vec::new();
    }
    let flags = FLAG_IIF_TX_OK | if dst.echo { FLAG_ECHO } else { 0 };
    let mut rules = vec![NamedRule {
        src: src.name.clone(),
        dst: dst.name.clone(),
        flags,
    }];
    if src.fd && dst.fd {
        rules.push(NamedRule {
            src: src.name.clone(),
            dst: dst.name.clone(),
            flags: flags | FLAG_FD,
        });
    }
    rules
}

/// The full mesh among `endpoints`.
pub fn mesh(endpoints: &[Endpoint]) -> BTreeSet<NamedRule> {
    endpoints
        .iter()
        .flat_map(|src| endpoints.iter().flat_map(|dst| rules_between(src, dst)))
        .collect()
}

/// The rules that connect `one` with the `others` (both directions).
pub fn rules_for(one: &Endpoint, others: &[Endpoint]) -> BTreeSet<NamedRule> {
    others
        .iter()
        .filter(|other| other.name != one.name)
        .flat_map(|other| {
            rules_between(one, other)
                .into_iter()
                .chain(rules_between(other, one))
        })
        .collect()
}

/// Checks everything about a desired state that needs no kernel: names, uniqueness, FD on
/// classic buses, filters. Namespace-dependent checks happen when members are placed.
pub fn validate(state: &DesiredState) -> Result<(), BusError> {
    let mut bus_names = BTreeSet::new();
    let mut member_ids: HashMap<&str, &str> = HashMap::new();
    let mut host_names: HashMap<String, &str> = HashMap::new();
    let mut externals: HashMap<&str, &str> = HashMap::new();
    for bus in &state.buses {
        if bus.name.is_empty() {
            return Err(BusError::InvalidBusName {
                name: bus.name.clone(),
            });
        }
        if !bus_names.insert(bus.name.as_str()) {
            return Err(BusError::DuplicateBus {
                bus: bus.name.clone(),
            });
        }
        for external in [&bus.physical, &bus.tunnel].into_iter().flatten() {
            check_interface_name(external).map_err(|reason| BusError::InvalidInterfaceName {
                owner: format!("bus {}", bus.name),
                name: external.clone(),
                reason,
            })?;
            if is_owned(external) {
                return Err(BusError::InvalidInterfaceName {
                    owner: format!("bus {}", bus.name),
                    name: external.clone(),
                    reason: "the name of a member link of this driver",
                });
            }
            if let Some(other) = externals.insert(external, &bus.name) {
                return Err(BusError::InterfaceShared {
                    interface: external.clone(),
                    first: other.to_string(),
                    second: bus.name.clone(),
                });
            }
        }
        for member in &bus.members {
            validate_member(bus, member)?;
            if let Some(other) = member_ids.insert(&member.id, &bus.name) {
                return Err(BusError::DuplicateMember {
                    id: member.id.clone(),
                    first: other.to_string(),
                    second: bus.name.clone(),
                });
            }
            if let Some(other) = host_names.insert(host_name(&member.id), &member.id) {
                return Err(BusError::HostNameCollision {
                    first: other.to_string(),
                    second: member.id.clone(),
                    host: host_name(&member.id),
                });
            }
        }
    }
    Ok(())
}

/// Checks one member of `bus` (names, FD, filters).
pub fn validate_member(bus: &BusSpec, member: &MemberSpec) -> Result<(), BusError> {
    if member.id.is_empty() {
        return Err(BusError::InvalidMemberId {
            bus: bus.name.clone(),
        });
    }
    check_interface_name(&member.interface).map_err(|reason| BusError::InvalidInterfaceName {
        owner: format!("member {}", member.id),
        name: member.interface.clone(),
        reason,
    })?;
    if member.fd && !bus.fd {
        return Err(BusError::FdOnClassicBus {
            bus: bus.name.clone(),
            member: member.id.clone(),
        });
    }
    for filter in member.transmit_allow.iter().chain(&member.receive_filters) {
        check_filter(filter).map_err(|reason| BusError::InvalidFilter {
            member: member.id.clone(),
            filter: *filter,
            reason,
        })?;
    }
    Ok(())
}

fn check_filter(filter: &CanFilter) -> Result<(), &'static str> {
    let limit = if filter.extended { 0x1fff_ffff } else { 0x7ff };
    if filter.id > limit {
        return Err("id does not fit the identifier width");
    }
    if filter.mask > limit {
        return Err("mask does not fit the identifier width");
    }
    Ok(())
}

/// The kernel's rule for link names ([`link::name_problem`]), as the reason of a [`BusError`].
fn check_interface_name(name: &str) -> Result<(), &'static str> {
    link::name_problem(name).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::model::{Access, NetnsRef};

    fn link(name: &str, ifindex: u32, kind: LinkKind, mtu: u32) -> (String, HostLink) {
        (
            name.to_string(),
            HostLink {
                name: name.to_string(),
                ifindex,
                kind,
                mtu,
                up: true,
            },
        )
    }

    fn member(id: &str, fd: bool, access: Access) -> MemberSpec {
        let mut member = MemberSpec::new(id, NetnsRef::Pid(1), "can0");
        member.fd = fd;
        member.access = access;
        member
    }

    fn count(rules: &BTreeSet<NamedRule>, pred: impl Fn(&NamedRule) -> bool) -> usize {
        rules.iter().filter(|rule| pred(rule)).count()
    }

    #[test]
    fn classic_mesh_of_n_members_has_n_times_n_minus_one_rules() {
        for n in [2usize, 3, 16] {
            let mut bus = BusSpec::new("b");
            bus.members = (0..n)
                .map(|i| member(&format!("m{i}"), false, Access::ReadWrite))
                .collect();
            let rules = mesh(&endpoints(&bus, &BTreeMap::new()).unwrap());
            assert_eq!(rules.len(), n * (n - 1));
            assert!(rules.iter().all(|rule| rule.flags == FLAG_IIF_TX_OK));
            assert!(rules.iter().all(|rule| rule.src != rule.dst));
        }
    }

    #[test]
    fn mixed_bus_plans_fd_rules_only_between_fd_endpoints() {
        // Members: a (FD), b (FD), c (classic), d (listen-only FD); physical vcan0 (FD, MTU 72),
        // tunnel tun0 (a vxcan with MTU 16: classic only).
        let mut bus = BusSpec::new("mixed");
        bus.fd = true;
        bus.physical = Some("vcan0".into());
        bus.tunnel = Some("tun0".into());
        bus.members = vec![
            member("a", true, Access::ReadWrite),
            member("b", true, Access::ReadWrite),
            member("c", false, Access::ReadWrite),
            member("d", true, Access::ListenOnly),
        ];
        let links = BTreeMap::from([
            link("vcan0", 3, LinkKind::Vcan, 72),
            link("tun0", 4, LinkKind::Vxcan, 16),
        ]);
        let eps = endpoints(&bus, &links).unwrap();
        let rules = mesh(&eps);
        let [a, b, c, d] = ["a", "b", "c", "d"].map(host_name);
        // Transmitting endpoints: a, b, c, vcan0, tun0 (5), each to the 5 others: 25 classic.
        assert_eq!(count(&rules, |r| !r.is_fd()), 25);
        // FD-capable: a, b, d, vcan0; FD senders among them: a, b, vcan0, each to 3 others: 9.
        assert_eq!(count(&rules, |r| r.is_fd()), 9);
        assert_eq!(
            count(&rules, |r| r.src == d),
            0,
            "listen-only sends nothing"
        );
        assert_eq!(
            count(&rules, |r| r.is_fd() && (r.dst == c || r.src == c)),
            0
        );
        assert_eq!(count(&rules, |r| r.is_fd() && r.dst == "tun0"), 0);
        // ECHO exactly on the rules towards the vcan.
        assert!(
            rules
                .iter()
                .all(|r| (r.flags & FLAG_ECHO != 0) == (r.dst == "vcan0"))
        );
        assert!(rules.iter().all(|r| r.flags & FLAG_IIF_TX_OK != 0));
        assert!(rules.contains(&NamedRule {
            src: a.clone(),
            dst: "vcan0".into(),
            flags: FLAG_IIF_TX_OK | FLAG_ECHO | FLAG_FD,
        }));
        assert!(rules.contains(&NamedRule {
            src: "vcan0".into(),
            dst: b,
            flags: FLAG_IIF_TX_OK | FLAG_FD,
        }));
    }

    #[test]
    fn rules_for_one_member_are_its_slice_of_the_mesh() {
        let mut bus = BusSpec::new("b");
        bus.members = (0..5)
            .map(|i| member(&format!("m{i}"), false, Access::ReadWrite))
            .collect();
        let eps = endpoints(&bus, &BTreeMap::new()).unwrap();
        let whole = mesh(&eps);
        let slice = rules_for(&eps[2], &eps);
        assert_eq!(slice.len(), 8);
        let expected: BTreeSet<_> = whole
            .iter()
            .filter(|r| r.src == eps[2].name || r.dst == eps[2].name)
            .cloned()
            .collect();
        assert_eq!(slice, expected);
    }

    #[test]
    fn external_interfaces_must_exist_and_be_can() {
        let mut bus = BusSpec::new("b");
        bus.physical = Some("can9".into());
        assert!(matches!(
            endpoints(&bus, &BTreeMap::new()),
            Err(BusError::UnknownInterface { ref interface, .. }) if interface == "can9"
        ));
        let links = BTreeMap::from([link("can9", 2, LinkKind::Other("veth".into()), 1500)]);
        let error = endpoints(&bus, &links).unwrap_err();
        assert!(error.to_string().contains("veth"), "{error}");
    }

    #[test]
    fn validation_rejects_bad_input_naming_the_problem() {
        let ok = |bus: BusSpec| validate(&DesiredState { buses: vec![bus] });
        let mut bus = BusSpec::new("b");
        bus.members = vec![member("x", false, Access::ReadWrite)];
        assert!(ok(bus.clone()).is_ok());

        let mut long = bus.clone();
        long.members[0].interface = "a-very-long-name0".into();
        let error = ok(long).unwrap_err();
        assert!(error.to_string().contains("a-very-long-name0"), "{error}");

        let mut fd = bus.clone();
        fd.members[0].fd = true;
        assert!(matches!(ok(fd), Err(BusError::FdOnClassicBus { .. })));

        let mut dup = bus.clone();
        dup.members.push(member("x", false, Access::ReadWrite));
        assert!(matches!(ok(dup), Err(BusError::DuplicateMember { .. })));

        let mut filter = bus.clone();
        filter.members[0].receive_filters.push(CanFilter {
            id: 0x800,
            mask: 0x7ff,
            extended: false,
            invert: false,
        });
        assert!(matches!(ok(filter), Err(BusError::InvalidFilter { .. })));

        let mut shared = bus.clone();
        shared.physical = Some("can0".into());
        let mut other = BusSpec::new("c");
        other.physical = Some("can0".into());
        let error = validate(&DesiredState {
            buses: vec![shared, other],
        })
        .unwrap_err();
        assert!(matches!(error, BusError::InterfaceShared { .. }), "{error}");

        let error = validate(&DesiredState {
            buses: vec![bus.clone(), BusSpec::new("b")],
        })
        .unwrap_err();
        assert!(matches!(error, BusError::DuplicateBus { .. }));
    }
}
