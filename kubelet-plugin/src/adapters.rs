//! The node's CAN adapters over time: which links the node publishes as controllers, and
//! keeping the node driver's slot table and the node's ResourceSlices in step with them when an
//! adapter appears, goes away or changes state (bus-off, down, bit rate, ...).
//!
//! [`AdapterWatch::run`] reacts to link notifications at once (the data plane's
//! [`LinkMonitor`], on a thread of its own) and lists the links again periodically as a safety
//! net. Every pass compares the inventory found with the one served: only a difference is
//! logged, handed to the driver and published, so the pool generation moves only on real
//! changes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use can_dra_api::NodeConfig;
use can_dra_cluster::publisher::PublishReport;
use can_dra_dataplane::bus::naming::is_driver_link;
use can_dra_dataplane::link::{CanController, LinkError, LinkEvent, LinkMonitor, Links};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::inventory::{Inventory, PhysicalController};
use crate::node::{NodeDriver, NodeError, physical_controller};
use crate::slices::{SliceError, SlicePublisher};

/// How often the links are listed again even without notifications.
pub const RELIST_INTERVAL: Duration = Duration::from_secs(10);

/// How long the monitor thread waits for a notification before it looks whether it should stop.
const MONITOR_POLL: Duration = Duration::from_millis(500);

/// Errors following the adapters.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The links could not be listed.
    #[error("listing the node's CAN links: {0}")]
    Listing(#[from] LinkError),
    /// The blocking listing task failed.
    #[error("the link listing task failed: {0}")]
    Task(String),
    /// The driver refused the new inventory.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The slices could not be published.
    #[error(transparent)]
    Publish(#[from] SliceError),
}

/// The links published as controllers: every CAN link but the driver's own member and tunnel
/// links, and the far end of a pair whose other end is one of them (a member's pod end that
/// ended up in this namespace). A vxcan of another tool stays eligible: it is how a wire or ECU
/// stand-in is attached. Sorted by interface name, so that two listings of the same links
/// compare equal.
pub fn published_controllers(found: &[CanController]) -> Vec<PhysicalController> {
    let driver_indexes: Vec<u32> = found
        .iter()
        .filter(|c| is_driver_link(&c.name))
        .map(|c| c.index)
        .collect();
    let mut published: Vec<PhysicalController> = found
        .iter()
        .filter(|c| !is_driver_link(&c.name))
        .filter(|c| {
            !c.peer_index
                .is_some_and(|peer| driver_indexes.contains(&peer))
        })
        .map(physical_controller)
        .collect();
    published.sort_by(|a, b| a.interface.cmp(&b.interface));
    published
}

/// Lists the node's links (blocking netlink) and builds the inventory the configuration asks for.
pub fn list_inventory(config: &NodeConfig) -> Result<Inventory, AdapterError> {
    let found = Links::open()?.can_controllers()?;
    Ok(Inventory::from_config(
        published_controllers(&found),
        config,
    ))
}

/// [`list_inventory`] on the blocking pool.
pub async fn list_inventory_async(config: &NodeConfig) -> Result<Inventory, AdapterError> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || list_inventory(&config))
        .await
        .map_err(|e| AdapterError::Task(e.to_string()))?
}

/// One difference between two inventories, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterChange {
    /// A controller is published that was not.
    Appeared {
        /// The interface.
        interface: String,
        /// Its state, driver and rates, as published.
        summary: String,
    },
    /// A published controller is gone (unplugged, deleted or no longer selected).
    Vanished {
        /// The interface.
        interface: String,
    },
    /// A published controller changed.
    Changed {
        /// The interface.
        interface: String,
        /// What changed, `field: before -> after`, comma separated.
        what: String,
    },
}

impl fmt::Display for AdapterChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Appeared { interface, summary } => write!(f, "{interface} appeared ({summary})"),
            Self::Vanished { interface } => write!(f, "{interface} is gone"),
            Self::Changed { interface, what } => write!(f, "{interface} changed: {what}"),
        }
    }
}

fn summary(c: &PhysicalController) -> String {
    let rate =
        |r: Option<can_dra_api::Bitrate>| r.map_or_else(|| "unset".to_owned(), |r| r.to_string());
    format!(
        "state {}, controller {}, bitrate {}, fd {}, {} slots",
        c.state_name(),
        c.controller,
        rate(c.bitrate),
        c.fd,
        c.slots
    )
}

fn differences(before: &PhysicalController, after: &PhysicalController) -> String {
    let mut what = Vec::new();
    let mut field = |name: &str, old: String, new: String| {
        if old != new {
            what.push(format!("{name}: {old} -> {new}"));
        }
    };
    let rate =
        |r: Option<can_dra_api::Bitrate>| r.map_or_else(|| "unset".to_owned(), |r| r.to_string());
    field(
        "state",
        before.state_name().to_owned(),
        after.state_name().to_owned(),
    );
    field("bitrate", rate(before.bitrate), rate(after.bitrate));
    field(
        "dataBitrate",
        rate(before.data_bitrate),
        rate(after.data_bitrate),
    );
    field("fd", before.fd.to_string(), after.fd.to_string());
    field(
        "controller",
        before.controller.clone(),
        after.controller.clone(),
    );
    field("slots", before.slots.to_string(), after.slots.to_string());
    what.join(", ")
}

/// The controller differences from `before` to `after`, by interface name.
pub fn changes(before: &Inventory, after: &Inventory) -> Vec<AdapterChange> {
    let find = |inventory: &Inventory, name: &str| {
        inventory
            .physical
            .iter()
            .find(|c| c.interface == name)
            .cloned()
    };
    let mut names: Vec<&str> = before
        .physical
        .iter()
        .chain(&after.physical)
        .map(|c| c.interface.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| match (find(before, name), find(after, name)) {
            (None, Some(new)) => Some(AdapterChange::Appeared {
                interface: name.to_owned(),
                summary: summary(&new),
            }),
            (Some(_), None) => Some(AdapterChange::Vanished {
                interface: name.to_owned(),
            }),
            (Some(old), Some(new)) if old != new => Some(AdapterChange::Changed {
                interface: name.to_owned(),
                what: differences(&old, &new),
            }),
            _ => None,
        })
        .collect()
}

/// Keeps the driver's slots and the node's slices following the adapters.
#[derive(Debug)]
pub struct AdapterWatch {
    driver: Arc<NodeDriver>,
    publisher: SlicePublisher,
    config: NodeConfig,
    /// Whether the driver's inventory still has to be published (a publish failed).
    unpublished: bool,
}

impl AdapterWatch {
    /// A watch for a driver whose current inventory is already published.
    pub fn new(driver: Arc<NodeDriver>, publisher: SlicePublisher, config: NodeConfig) -> Self {
        Self {
            driver,
            publisher,
            config,
            unpublished: false,
        }
    }

    /// Serves and publishes `found` (controllers as listed, before the configuration filters
    /// them) if it differs from what the driver serves, or if an earlier publish failed.
    /// Returns the changes; the publish report when something was published.
    pub async fn apply(
        &mut self,
        mut found: Vec<PhysicalController>,
    ) -> Result<(Vec<AdapterChange>, Option<PublishReport>), AdapterError> {
        // Listing order is the kernel's ifindex order; only the set matters.
        found.sort_by(|a, b| a.interface.cmp(&b.interface));
        let next = Inventory::from_config(found, &self.config);
        let current = self.driver.inventory();
        let changes = changes(&current, &next);
        if next != current {
            for change in &changes {
                tracing::info!(%change, "CAN adapter change");
            }
            let kept = self.driver.apply_inventory(next.clone()).await?;
            if !kept.is_empty() {
                tracing::warn!(
                    devices = ?kept,
                    "devices of a vanished controller stay served (Unhealthy) until their claims are unprepared"
                );
            }
            self.unpublished = true;
        }
        if !self.unpublished {
            return Ok((changes, None));
        }
        let report = self.publisher.publish(&next).await?;
        self.unpublished = false;
        tracing::info!(
            generation = report.generation,
            created = report.created,
            updated = report.updated,
            deleted = report.deleted,
            "ResourceSlices republished"
        );
        Ok((changes, Some(report)))
    }

    async fn refresh(&mut self) {
        let listed = tokio::task::spawn_blocking(|| -> Result<_, AdapterError> {
            Ok(Links::open()?.can_controllers()?)
        })
        .await
        .map_err(|e| AdapterError::Task(e.to_string()));
        let outcome = match listed {
            Ok(Ok(found)) => self.apply(published_controllers(&found)).await.map(drop),
            Ok(Err(error)) | Err(error) => Err(error),
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "following the CAN adapters failed; retrying at the next change or listing");
        }
    }

    /// Follows the adapters until `shutdown`: on every CAN link notification, and every
    /// `interval` in any case (also right at the start, to catch what changed before the
    /// monitor was listening).
    pub async fn run(mut self, interval: Duration, shutdown: CancellationToken) {
        let (sender, receiver) = mpsc::unbounded_channel();
        spawn_monitor(sender);
        let mut events = Some(receiver);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                event = next_event(&mut events) => {
                    match event {
                        Some(event) => tracing::debug!(?event, "CAN link notification"),
                        None => {
                            tracing::warn!("link notifications stopped; relying on periodic listing");
                            events = None;
                            continue;
                        }
                    }
                    // One listing answers a burst of notifications.
                    if let Some(receiver) = events.as_mut() {
                        while receiver.try_recv().is_ok() {}
                    }
                }
            }
            self.refresh().await;
        }
    }
}

async fn next_event(events: &mut Option<mpsc::UnboundedReceiver<LinkEvent>>) -> Option<LinkEvent> {
    match events {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Forwards the CAN link notifications but those about the driver's own links (member links come
/// and go with every attach) until the receiver is dropped. The monitor blocks, so it gets a thread.
fn spawn_monitor(sender: mpsc::UnboundedSender<LinkEvent>) {
    let spawned = std::thread::Builder::new()
        .name("can-link-monitor".into())
        .spawn(move || {
            let mut monitor = match LinkMonitor::open() {
                Ok(monitor) => monitor,
                Err(error) => {
                    tracing::warn!(%error, "cannot follow link notifications");
                    return;
                }
            };
            while !sender.is_closed() {
                match monitor.next_event(MONITOR_POLL) {
                    Ok(Some(event)) => {
                        let about = match &event {
                            LinkEvent::Added(c) | LinkEvent::Removed(c) => c,
                            LinkEvent::Changed { after, .. } => after,
                        };
                        if !is_driver_link(&about.name) && sender.send(event).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%error, "reading link notifications failed");
                        return;
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the link monitor thread");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use can_dra_dataplane::link::{CanKind, CanState, OperState};

    use super::*;

    fn link(name: &str, kind: CanKind, up: bool, state: Option<CanState>) -> CanController {
        CanController {
            index: 7 + u32::try_from(name.len()).unwrap() * 100 + u32::from(name.as_bytes()[0]),
            name: name.into(),
            kind,
            mtu: 16,
            up,
            operstate: if up { OperState::Up } else { OperState::Down },
            bitrate: Some(500_000),
            data_bitrate: None,
            fd: false,
            state,
            ctrlmode: None,
            driver: None,
            peer_index: None,
        }
    }

    #[test]
    fn member_links_are_never_adapters_and_down_links_are_stopped() {
        let found = [
            link("can0", CanKind::Can, true, Some(CanState::ErrorActive)),
            link("cdra0123456789a", CanKind::Vxcan, true, None),
            link("vxtm-body", CanKind::Vxcan, true, None),
            link("ecu0", CanKind::Vxcan, true, None),
            link("vcan0", CanKind::Vcan, false, None),
            link("vcan1", CanKind::Vcan, true, None),
            link("cdra", CanKind::Vcan, true, None),
            link("vxtt-body", CanKind::Vxcan, true, None),
        ];
        let published: Vec<(String, Option<CanState>)> = published_controllers(&found)
            .into_iter()
            .map(|c| (c.interface, c.state))
            .collect();
        assert_eq!(
            published,
            [
                ("can0".to_owned(), Some(CanState::ErrorActive)),
                ("ecu0".to_owned(), None),
                ("vcan0".to_owned(), Some(CanState::Stopped)),
                ("vcan1".to_owned(), None),
            ]
        );
    }

    #[test]
    fn a_member_end_left_beside_its_host_end_is_never_an_adapter() {
        let host_end = CanController {
            index: 40,
            peer_index: Some(41),
            ..link("cdra0123456789a", CanKind::Vxcan, true, None)
        };
        let pod_end = CanController {
            index: 41,
            peer_index: Some(40),
            ..link("can7", CanKind::Vxcan, true, None)
        };
        let stand_in = CanController {
            index: 42,
            peer_index: Some(43),
            ..link("can8", CanKind::Vxcan, true, None)
        };
        let other_end = CanController {
            index: 43,
            peer_index: Some(42),
            ..link("ecu8", CanKind::Vxcan, true, None)
        };
        let published: Vec<String> =
            published_controllers(&[host_end, pod_end, stand_in, other_end])
                .into_iter()
                .map(|c| c.interface)
                .collect();
        assert_eq!(published, ["can8", "ecu8"]);
    }

    #[test]
    fn changes_name_the_interface_and_what_changed() {
        let config = NodeConfig::default();
        let inventory =
            |links: &[CanController]| Inventory::from_config(published_controllers(links), &config);
        let before = inventory(&[
            link("can0", CanKind::Can, true, Some(CanState::ErrorActive)),
            link("can1", CanKind::Can, true, Some(CanState::ErrorActive)),
        ]);
        let after = inventory(&[
            link("can0", CanKind::Can, true, Some(CanState::BusOff)),
            link("can2", CanKind::Can, true, Some(CanState::ErrorActive)),
        ]);
        let listed: Vec<String> = changes(&before, &after)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert_eq!(listed[0], "can0 changed: state: error-active -> bus-off");
        assert_eq!(listed[1], "can1 is gone");
        assert!(
            listed[2].starts_with("can2 appeared (state error-active"),
            "{}",
            listed[2]
        );
        assert!(changes(&after, &after).is_empty());
    }
}
