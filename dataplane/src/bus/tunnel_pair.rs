//! Tunnel pairs on [`Buses`]: the vxcan pair whose mesh end is an external interface of a
//! cross-node bus and whose tunnel end the tunnel endpoint reads and writes. Both ends live in
//! the daemon's own namespace ([`own_namespace`]); their names come from
//! [`tunnel_link_names`](super::naming::tunnel_link_names). A failed attach leaves neither a
//! half-made pair nor rules it added.

use std::collections::BTreeSet;
use std::path::PathBuf;

use tracing::{info, info_span, warn};

use super::kernel::{KernelErrorKind, ObservedRule, PairRequest, Rule};
use super::manager::Buses;
use super::model::{BusSpec, CAN_MTU, CANFD_MTU, DesiredState, NetnsRef};
use super::naming::{host_name, is_owned, is_tunnel_link};
use super::{BusError, kernel::Kernel};

/// The daemon's own network namespace, where tunnel pairs live with both ends.
pub fn own_namespace() -> NetnsRef {
    NetnsRef::Path(PathBuf::from("/proc/self/ns/net"))
}

impl<K: Kernel> Buses<K> {
    /// Makes sure the tunnel pair `mesh.tunnel` / `tunnel_link` exists, up and with the mesh's
    /// MTU, and that it (with `mesh.physical`) is an external interface of the mesh, which is
    /// added if it does not exist yet. A mesh without a tunnel changes nothing. On failure the
    /// pair, if this call created it, is deleted and the rules are as they were.
    pub fn attach_tunnel(&mut self, mesh: BusSpec, tunnel_link: &str) -> Result<(), BusError> {
        let Some(mesh_link) = mesh.tunnel.clone() else {
            return Ok(());
        };
        let _span = info_span!("tunnel", bus = %mesh.name, link = %mesh_link).entered();
        let rules_before = self.kernel.rules()?;
        let created = self.ensure_pair(&mesh_link, tunnel_link, mesh.fd)?;
        let joined = if self.state.bus(&mesh.name).is_none() {
            self.add_bus(mesh)
        } else {
            let (name, physical) = (mesh.name, mesh.physical);
            self.set_externals(&name, physical, Some(mesh_link.clone()))
        };
        if let Err(error) = joined {
            if let Some(ifindex) = created
                && let Err(undo) = self.kernel.delete_link(ifindex)
            {
                warn!(%undo, "could not delete the half-attached tunnel pair");
            }
            self.restore_rules(&rules_before);
            return Err(error);
        }
        info!("tunnel pair attached");
        Ok(())
    }

    /// Takes the tunnel pair (and the physical attachment) out of mesh `mesh`, removing the
    /// mesh when no member is left, and deletes both pair ends (`links`), if they exist.
    pub fn detach_tunnel(&mut self, mesh: &str, links: [&str; 2]) -> Result<(), BusError> {
        let _span = info_span!("tunnel", bus = %mesh).entered();
        if let Some(bus) = self.state.bus(mesh) {
            if bus.members.is_empty() {
                self.remove_bus(mesh)?;
            } else {
                self.set_externals(mesh, None, None)?;
            }
        }
        for name in links {
            self.delete_named(name)?;
        }
        info!("tunnel pair detached");
        Ok(())
    }

    /// The tunnel pair ends on the host ([`is_tunnel_link`]).
    pub fn tunnel_links(&mut self) -> Result<Vec<String>, BusError> {
        Ok(self
            .kernel
            .host_links()?
            .into_iter()
            .map(|link| link.name)
            .filter(|name| is_tunnel_link(name))
            .collect())
    }

    /// Deletes the leftover tunnel link `name` (its pair goes with it), if there is one. A mesh
    /// that still has it as its tunnel (adopted at start-up, see
    /// [`adopt_externals`](Self::adopt_externals)) loses its external interfaces first.
    pub fn delete_tunnel_link(&mut self, name: &str) -> Result<(), BusError> {
        let meshes: Vec<String> = self
            .state
            .buses
            .iter()
            .filter(|bus| bus.tunnel.as_deref() == Some(name))
            .map(|bus| bus.name.clone())
            .collect();
        for mesh in meshes {
            self.set_externals(&mesh, None, None)?;
        }
        self.delete_named(name)
    }

    /// Gives every bus of `desired` named in `adopt` that has members but no external
    /// interfaces those its members' host ends have can-gw rules with in the kernel: a tunnel
    /// pair end ([`is_tunnel_link`]) as its tunnel, any other link that is not a member's as its
    /// physical controller. Only reads the kernel.
    pub fn adopt_externals(
        &mut self,
        desired: &mut DesiredState,
        adopt: &BTreeSet<String>,
    ) -> Result<(), BusError> {
        let mut wanted: Vec<&mut BusSpec> = desired
            .buses
            .iter_mut()
            .filter(|bus| {
                adopt.contains(&bus.name)
                    && !bus.members.is_empty()
                    && bus.physical.is_none()
                    && bus.tunnel.is_none()
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let links = self.kernel.host_links()?;
        let rules = self.kernel.rules()?;
        let ifindex = |name: &str| links.iter().find(|l| l.name == name).map(|l| l.ifindex);
        for bus in &mut wanted {
            let hosts: BTreeSet<u32> = bus
                .members
                .iter()
                .filter_map(|member| ifindex(&host_name(&member.id)))
                .collect();
            for rule in &rules {
                let other = match (hosts.contains(&rule.src), hosts.contains(&rule.dst)) {
                    (true, false) => rule.dst,
                    (false, true) => rule.src,
                    _ => continue,
                };
                let Some(link) = links.iter().find(|l| l.ifindex == other) else {
                    continue;
                };
                if is_owned(&link.name) {
                    continue;
                }
                let slot = if is_tunnel_link(&link.name) {
                    &mut bus.tunnel
                } else {
                    &mut bus.physical
                };
                slot.get_or_insert_with(|| link.name.clone());
            }
        }
        Ok(())
    }

    /// Creates the pair `mesh_link` / `tunnel_link` unless both ends exist, up and with the
    /// right MTU; whatever is left of a broken pair is deleted first. Returns the ifindex of the
    /// mesh end when this call created the pair.
    fn ensure_pair(
        &mut self,
        mesh_link: &str,
        tunnel_link: &str,
        fd: bool,
    ) -> Result<Option<u32>, BusError> {
        let mtu = if fd { CANFD_MTU } else { CAN_MTU };
        let links = self.kernel.host_links()?;
        let find = |name: &str| links.iter().find(|link| link.name == name);
        let intact = [mesh_link, tunnel_link]
            .iter()
            .all(|name| find(name).is_some_and(|link| link.mtu == mtu && link.up));
        if intact {
            return Ok(None);
        }
        for name in [mesh_link, tunnel_link] {
            if let Some(link) = find(name) {
                self.kernel.delete_link(link.ifindex)?;
            }
        }
        let created = self.kernel.create_pair(&PairRequest {
            host_name: mesh_link.to_owned(),
            netns: own_namespace(),
            pod_name: tunnel_link.to_owned(),
            mtu,
        })?;
        Ok(Some(created.ifindex))
    }

    /// Deletes the host link `name`, if there is one.
    fn delete_named(&mut self, name: &str) -> Result<(), BusError> {
        if let Some(link) = self.links()?.get(name) {
            match self.kernel.delete_link(link.ifindex) {
                Ok(()) => {}
                Err(error) if error.kind == KernelErrorKind::NoDevice => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Brings the rules back to `before` as far as their interfaces still exist: rules added
    /// since are deleted, rules deleted since are added again. Best effort, for undo paths.
    fn restore_rules(&mut self, before: &[ObservedRule]) {
        let Ok(now) = self.kernel.rules() else {
            warn!("could not read the rules while undoing");
            return;
        };
        let mut expected: Vec<Rule> = before.iter().filter_map(ObservedRule::as_rule).collect();
        for observed in &now {
            let Some(rule) = observed.as_rule() else {
                continue;
            };
            if let Some(position) = expected.iter().position(|r| *r == rule) {
                expected.remove(position);
            } else if let Err(undo) = self.kernel.delete_rule(observed) {
                warn!(%undo, "could not remove a rule while undoing");
            }
        }
        let Ok(links) = self.kernel.host_links() else {
            return;
        };
        let exists = |ifindex: u32| links.iter().any(|link| link.ifindex == ifindex);
        for rule in expected {
            if exists(rule.src)
                && exists(rule.dst)
                && let Err(undo) = self.kernel.add_rule(&rule)
            {
                warn!(%undo, "could not restore a rule while undoing");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use super::own_namespace;
    use crate::bus::Buses;
    use crate::bus::fake::FakeKernel;
    use crate::bus::kernel::LinkKind;
    use crate::bus::model::{BusSpec, MemberSpec, NetnsRef};

    const MESH: &str = "vxtm-x";
    const TUNNEL: &str = "vxtt-x";

    /// A kernel with the daemon's namespace, a controller `can0` and a pod namespace `a`.
    fn kernel() -> FakeKernel {
        let mut kernel = FakeKernel::new();
        kernel.add_namespace(own_namespace());
        kernel.add_namespace(NetnsRef::Path(PathBuf::from("/run/netns/a")));
        kernel.add_host_link("can0", LinkKind::Can, 16);
        kernel
    }

    fn mesh() -> BusSpec {
        let mut mesh = BusSpec::new("x");
        mesh.physical = Some("can0".into());
        mesh.tunnel = Some(MESH.into());
        mesh
    }

    fn with_member() -> Buses<FakeKernel> {
        let mut buses = Buses::new(kernel());
        buses.add_bus(BusSpec::new("x")).unwrap();
        let netns = NetnsRef::Path(PathBuf::from("/run/netns/a"));
        buses
            .join("x", MemberSpec::new("a", netns, "can0"))
            .unwrap();
        buses
    }

    fn has_pair(kernel: &FakeKernel) -> (bool, bool) {
        (
            kernel.host.iter().any(|link| link.name == MESH),
            kernel.pods.keys().any(|(_, name)| name == TUNNEL),
        )
    }

    fn rules(kernel: &FakeKernel) -> BTreeSet<(String, String, u16)> {
        kernel.named_rules().into_iter().collect()
    }

    /// Attaches the mesh with every mutation of a successful attach failing in turn: each
    /// failure leaves no pair, the rules and the desired state as they were.
    fn every_failure_leaves_nothing(start: fn() -> Buses<FakeKernel>) {
        let mut probe = start();
        let first = probe.kernel_mut().mutations;
        probe.attach_tunnel(mesh(), TUNNEL).unwrap();
        let steps = probe.kernel_mut().mutations - first;
        assert!(steps >= 3, "the pair and two rules at least: {steps}");
        assert_eq!(has_pair(probe.kernel_mut()), (true, true));
        for step in 1..=steps {
            let mut buses = start();
            let before = (rules(buses.kernel_mut()), buses.state().clone());
            let at = buses.kernel_mut().mutations + step;
            buses.kernel_mut().fail_at = Some(at);
            let error = buses.attach_tunnel(mesh(), TUNNEL).unwrap_err();
            assert!(
                error.to_string().contains("injected"),
                "step {step}: {error}"
            );
            let kernel = buses.kernel_mut();
            kernel.fail_at = None;
            assert_eq!(has_pair(kernel), (false, false), "step {step}");
            let after = (rules(buses.kernel_mut()), buses.state().clone());
            assert_eq!(after, before, "step {step}");
        }
    }

    #[test]
    fn a_failed_attach_of_a_new_mesh_leaves_no_half_made_pair() {
        every_failure_leaves_nothing(|| Buses::new(kernel()));
    }

    #[test]
    fn a_failed_attach_to_a_bus_with_members_leaves_no_half_made_pair() {
        every_failure_leaves_nothing(with_member);
    }

    #[test]
    fn detaching_deletes_the_pair_and_its_rules_and_keeps_the_member() {
        let mut buses = with_member();
        let members_only = rules(buses.kernel_mut());
        buses.attach_tunnel(mesh(), TUNNEL).unwrap();
        assert_eq!(
            rules(buses.kernel_mut()).len(),
            6,
            "member, tunnel, can0 meshed"
        );
        assert_eq!(buses.tunnel_links().unwrap(), vec![MESH.to_owned()]);

        buses.detach_tunnel("x", [MESH, TUNNEL]).unwrap();
        assert_eq!(has_pair(buses.kernel_mut()), (false, false));
        assert_eq!(rules(buses.kernel_mut()), members_only);
        let bus = buses.state().bus("x").unwrap();
        assert_eq!((bus.members.len(), bus.tunnel.clone()), (1, None));
        assert!(buses.tunnel_links().unwrap().is_empty());
    }

    #[test]
    fn deleting_a_leftover_tunnel_link_takes_it_out_of_its_mesh_first() {
        let mut buses = with_member();
        buses.attach_tunnel(mesh(), TUNNEL).unwrap();
        buses.delete_tunnel_link(MESH).unwrap();
        assert_eq!(has_pair(buses.kernel_mut()), (false, false));
        let bus = buses.state().bus("x").unwrap();
        assert_eq!((bus.physical.clone(), bus.tunnel.clone()), (None, None));
        assert!(
            rules(buses.kernel_mut()).is_empty(),
            "one member, no externals"
        );
        buses.delete_tunnel_link(MESH).unwrap();
    }
}
