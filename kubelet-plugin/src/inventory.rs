//! The node's CAN inventory as the ResourceSlice publisher sees it, and the devices it offers.
//!
//! The input is plain data: the physical controllers found on the node ([`PhysicalController`],
//! filled from the data plane's link enumeration) and the node-local virtual buses of the plugin
//! configuration ([`VirtualBus`]). [`Inventory::slots`] turns it into member slots, one device per
//! slot, named `<if>-m<k>` and `<bus>-m<k>`; [`Inventory::devices`] gives them as resource.k8s.io/v1
//! devices with the attributes users select on in CEL.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use can_dra_api::{Bitrate, NodeConfig};
use can_dra_cluster::attribute;
use can_dra_dataplane::bus::naming::is_driver_link;
/// The controller state of [`PhysicalController::state`], the data plane's own.
pub use can_dra_dataplane::link::CanState;
use k8s_openapi::api::resource::v1::{Device, DeviceAttribute};

/// Attribute strings are capped by the API (resource.k8s.io/v1: at most 64 characters).
pub const MAX_ATTRIBUTE_STRING_LEN: usize = 64;

/// A physical CAN controller on the node (a netdev of link kind `can`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysicalController {
    /// The interface name, e.g. `can0`.
    pub interface: String,
    /// The kernel driver, e.g. `gs_usb`.
    pub controller: String,
    /// The configured nominal bitrate; `None` if the interface has none configured yet.
    pub bitrate: Option<Bitrate>,
    /// The configured FD data bitrate, if any.
    pub data_bitrate: Option<Bitrate>,
    /// Whether CAN FD is enabled.
    pub fd: bool,
    /// The controller state as the kernel reports it; `None` when it reports none (a `vcan`
    /// stand-in), published as [`CanState::UNKNOWN`]. A link that is down is
    /// [`CanState::Stopped`] whatever its kind.
    pub state: Option<CanState>,
    /// How many member slots to offer.
    pub slots: u32,
}

impl PhysicalController {
    /// The state as published in the `state` attribute and logged: the kernel's name in lower
    /// case (`error-active`, `bus-off`, ...), [`CanState::UNKNOWN`] when none is reported.
    pub fn state_name(&self) -> &'static str {
        self.state.map_or(CanState::UNKNOWN, CanState::as_str)
    }
}

/// A node-local virtual bus from the plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualBus {
    /// The bus name, a DNS label (checked by `NodeConfig`).
    pub name: String,
    /// Nominal bitrate.
    pub bitrate: Bitrate,
    /// Whether the bus carries CAN FD frames.
    pub fd: bool,
    /// FD data bitrate, if FD.
    pub data_bitrate: Option<Bitrate>,
    /// How many member slots to offer.
    pub slots: u32,
}

/// Everything the node publishes in its pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Physical controllers (already filtered by the configuration).
    pub physical: Vec<PhysicalController>,
    /// Node-local virtual buses.
    pub virtual_buses: Vec<VirtualBus>,
}

/// What a member slot belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SlotBus {
    /// A physical controller, by interface name.
    Physical {
        /// The host interface.
        interface: String,
    },
    /// A node-local virtual bus, by name.
    Virtual {
        /// The bus name.
        name: String,
    },
}

/// One member slot: one device in the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The device name, `<if>-m<k>` or `<bus>-m<k>`.
    pub device: String,
    /// The bus the slot joins.
    pub bus: SlotBus,
    /// The slot index `k`.
    pub index: u32,
}

/// The inventory cannot be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    /// Two slots would get the same device name (say a controller `body` and a virtual bus `body`).
    #[error("device name {device:?} is claimed by both {first} and {second}; rename one of them")]
    DuplicateDevice {
        /// The colliding device name.
        device: String,
        /// The first owner.
        first: String,
        /// The second owner.
        second: String,
    },
}

impl fmt::Display for SlotBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Physical { interface } => write!(f, "physical controller {interface:?}"),
            Self::Virtual { name } => write!(f, "virtual bus {name:?}"),
        }
    }
}

impl Inventory {
    /// Builds the inventory from the controllers found on the node and the plugin configuration:
    /// controllers pass `physical.include`/`exclude` and get `physical.slots` slots; virtual buses
    /// come from `virtualBuses` (an FD bus without a data bitrate uses its nominal bitrate).
    /// Links the driver creates itself (member host ends, tunnel pairs) are never controllers,
    /// whatever the patterns say: after a restart they are there, and the default `*` matches.
    pub fn from_config(found: Vec<PhysicalController>, config: &NodeConfig) -> Self {
        let physical = found
            .into_iter()
            .filter(|c| !is_driver_link(&c.interface))
            .filter(|c| config.publishes_physical(&c.interface))
            .map(|c| PhysicalController {
                slots: config.physical.slots,
                ..c
            })
            .collect();
        let virtual_buses = config
            .virtual_buses
            .iter()
            .map(|bus| VirtualBus {
                name: bus.name.clone(),
                bitrate: bus.bitrate,
                fd: bus.fd,
                data_bitrate: if bus.fd {
                    Some(bus.data_bitrate.unwrap_or(bus.bitrate))
                } else {
                    None
                },
                slots: bus.slots,
            })
            .collect();
        Self {
            physical,
            virtual_buses,
        }
    }

    /// Every member slot, in a deterministic order: physical controllers by interface name, then
    /// virtual buses by name, each with its slots `0..slots`.
    pub fn slots(&self) -> Result<Vec<Slot>, InventoryError> {
        let mut physical: Vec<&PhysicalController> = self.physical.iter().collect();
        physical.sort_by(|a, b| a.interface.cmp(&b.interface));
        let mut buses: Vec<&VirtualBus> = self.virtual_buses.iter().collect();
        buses.sort_by(|a, b| a.name.cmp(&b.name));
        let sources = physical
            .into_iter()
            .map(|c| {
                (
                    device_prefix(&c.interface),
                    SlotBus::Physical {
                        interface: c.interface.clone(),
                    },
                    c.slots,
                )
            })
            .chain(buses.into_iter().map(|b| {
                (
                    device_prefix(&b.name),
                    SlotBus::Virtual {
                        name: b.name.clone(),
                    },
                    b.slots,
                )
            }));
        let mut owners: BTreeMap<String, SlotBus> = BTreeMap::new();
        let mut slots = Vec::new();
        for (prefix, bus, count) in sources {
            for index in 0..count {
                let device = format!("{prefix}-m{index}");
                if let Some(first) = owners.get(&device) {
                    return Err(InventoryError::DuplicateDevice {
                        device,
                        first: first.to_string(),
                        second: bus.to_string(),
                    });
                }
                owners.insert(device.clone(), bus.clone());
                slots.push(Slot {
                    device,
                    bus: bus.clone(),
                    index,
                });
            }
        }
        Ok(slots)
    }

    /// The device names of [`slots`](Self::slots).
    pub fn device_names(&self) -> Result<BTreeSet<String>, InventoryError> {
        Ok(self.slots()?.into_iter().map(|s| s.device).collect())
    }

    /// The pool's devices with their attributes, in [`slots`](Self::slots) order.
    pub fn devices(&self) -> Result<Vec<Device>, InventoryError> {
        let physical: BTreeMap<&str, &PhysicalController> = self
            .physical
            .iter()
            .map(|c| (c.interface.as_str(), c))
            .collect();
        let buses: BTreeMap<&str, &VirtualBus> = self
            .virtual_buses
            .iter()
            .map(|b| (b.name.as_str(), b))
            .collect();
        let devices = self
            .slots()?
            .into_iter()
            .map(|slot| {
                let mut attributes = BTreeMap::new();
                attributes.insert(attribute::SLOT.to_owned(), int(i64::from(slot.index)));
                match &slot.bus {
                    SlotBus::Physical { interface } => {
                        attributes.insert(attribute::TYPE.to_owned(), string("physical"));
                        attributes.insert(attribute::BUS.to_owned(), string(interface));
                        attributes.insert(attribute::INTERFACE.to_owned(), string(interface));
                        if let Some(c) = physical.get(interface.as_str()) {
                            attributes.insert(attribute::FD.to_owned(), boolean(c.fd));
                            attributes
                                .insert(attribute::CONTROLLER.to_owned(), string(&c.controller));
                            attributes.insert(attribute::STATE.to_owned(), string(c.state_name()));
                            insert_rates(
                                &mut attributes,
                                c.bitrate,
                                c.fd.then_some(c.data_bitrate).flatten(),
                            );
                        }
                    }
                    SlotBus::Virtual { name } => {
                        attributes.insert(attribute::TYPE.to_owned(), string("virtual"));
                        attributes.insert(attribute::BUS.to_owned(), string(name));
                        if let Some(b) = buses.get(name.as_str()) {
                            attributes.insert(attribute::FD.to_owned(), boolean(b.fd));
                            insert_rates(
                                &mut attributes,
                                Some(b.bitrate),
                                b.fd.then_some(b.data_bitrate).flatten(),
                            );
                        }
                    }
                }
                Device {
                    name: slot.device,
                    attributes: Some(attributes),
                    ..Device::default()
                }
            })
            .collect();
        Ok(devices)
    }
}

fn insert_rates(
    attributes: &mut BTreeMap<String, DeviceAttribute>,
    bitrate: Option<Bitrate>,
    data_bitrate: Option<Bitrate>,
) {
    if let Some(rate) = bitrate {
        attributes.insert(
            attribute::BITRATE.to_owned(),
            int(i64::from(rate.bits_per_second())),
        );
    }
    if let Some(rate) = data_bitrate {
        attributes.insert(
            attribute::DATA_BITRATE.to_owned(),
            int(i64::from(rate.bits_per_second())),
        );
    }
}

fn int(value: i64) -> DeviceAttribute {
    DeviceAttribute {
        int: Some(value),
        ..DeviceAttribute::default()
    }
}

fn boolean(value: bool) -> DeviceAttribute {
    DeviceAttribute {
        bool: Some(value),
        ..DeviceAttribute::default()
    }
}

/// A string attribute, cut to the API's 64 characters (interface names have at most 15 bytes
/// and kernel driver names are short, so this only guards against odd input).
fn string(value: &str) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(value.chars().take(MAX_ATTRIBUTE_STRING_LEN).collect()),
        ..DeviceAttribute::default()
    }
}

/// Whether `s` is a DNS label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The device-name prefix for an interface or bus name: the name itself when it is a DNS label,
/// otherwise a lower-cased form with other characters turned into `-`, plus a hash of the original
/// so that distinct names (`CAN0` and `can0`) never share a prefix. Deterministic across runs.
///
/// ```
/// use can_dra_kubelet_plugin::inventory::device_prefix;
/// assert_eq!(device_prefix("can0"), "can0");
/// assert!(device_prefix("can_fd.1").starts_with("can-fd-1-"));
/// assert_ne!(device_prefix("CAN0"), device_prefix("can0"));
/// ```
pub fn device_prefix(name: &str) -> String {
    if is_dns_label(name) && name.len() <= 40 {
        return name.to_owned();
    }
    let mut cleaned = String::new();
    for c in name.chars().take(40) {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            cleaned.push(c);
        } else if !cleaned.ends_with('-') {
            cleaned.push('-');
        }
    }
    let cleaned = cleaned.trim_matches('-');
    let cleaned = if cleaned.is_empty() { "if" } else { cleaned };
    format!("{cleaned}-{:08x}", fnv1a32(name))
}

/// FNV-1a, 32 bits: a stable hash for names (std's hasher is not stable across releases).
pub(crate) fn fnv1a32(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_reserves_exactly_the_data_plane_prefixes() {
        assert_eq!(
            can_dra_api::RESERVED_INTERFACE_PREFIXES,
            can_dra_dataplane::bus::naming::RESERVED_PREFIXES
        );
    }

    #[test]
    fn every_link_name_the_driver_makes_is_reserved_in_the_api() {
        let mut names = vec![can_dra_dataplane::bus::naming::host_name("uid/req")];
        for bus in ["body", "a-very-long-bus-name"] {
            let (mesh, tunnel) = can_dra_dataplane::bus::naming::tunnel_link_names(bus);
            names.extend([mesh, tunnel]);
        }
        for name in names {
            assert!(is_driver_link(&name), "{name}");
            let refused = name.parse::<can_dra_api::InterfaceName>().unwrap_err();
            assert!(refused.to_string().contains("reserves"), "{refused}");
        }
    }

    fn rate(text: &str) -> Bitrate {
        text.parse().unwrap()
    }

    fn controller(interface: &str, slots: u32) -> PhysicalController {
        PhysicalController {
            interface: interface.into(),
            controller: "gs_usb".into(),
            bitrate: Some(rate("500k")),
            data_bitrate: Some(rate("2M")),
            fd: true,
            state: Some(CanState::ErrorActive),
            slots,
        }
    }

    fn attr<'a>(device: &'a Device, name: &str) -> &'a DeviceAttribute {
        &device.attributes.as_ref().unwrap()[name]
    }

    #[test]
    fn physical_slots_carry_controller_attributes() {
        let inventory = Inventory {
            physical: vec![controller("can0", 2)],
            ..Inventory::default()
        };
        let devices = inventory.devices().unwrap();
        let names: Vec<_> = devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["can0-m0", "can0-m1"]);
        let d = &devices[1];
        assert_eq!(attr(d, "type").string.as_deref(), Some("physical"));
        assert_eq!(attr(d, "bus").string.as_deref(), Some("can0"));
        assert_eq!(attr(d, "interface").string.as_deref(), Some("can0"));
        assert_eq!(attr(d, "controller").string.as_deref(), Some("gs_usb"));
        assert_eq!(attr(d, "state").string.as_deref(), Some("error-active"));
        assert_eq!(attr(d, "bitrate").int, Some(500_000));
        assert_eq!(attr(d, "dataBitrate").int, Some(2_000_000));
        assert_eq!(attr(d, "fd").bool, Some(true));
        assert_eq!(attr(d, "slot").int, Some(1));
    }

    #[test]
    fn classic_controller_without_bitrate_omits_rates() {
        let mut c = controller("can1", 1);
        c.fd = false;
        c.bitrate = None;
        let devices = Inventory {
            physical: vec![c],
            ..Inventory::default()
        }
        .devices()
        .unwrap();
        let attributes = devices[0].attributes.as_ref().unwrap();
        assert!(!attributes.contains_key("bitrate"));
        // A data bitrate left over from an FD configuration is not advertised on a classic bus.
        assert!(!attributes.contains_key("dataBitrate"));
        assert_eq!(attributes["fd"].bool, Some(false));
    }

    #[test]
    fn virtual_buses_come_after_physical_in_name_order() {
        let inventory = Inventory {
            physical: vec![controller("can1", 1), controller("can0", 1)],
            virtual_buses: vec![
                VirtualBus {
                    name: "powertrain".into(),
                    bitrate: rate("1M"),
                    fd: false,
                    data_bitrate: None,
                    slots: 1,
                },
                VirtualBus {
                    name: "body".into(),
                    bitrate: rate("125k"),
                    fd: false,
                    data_bitrate: None,
                    slots: 2,
                },
            ],
        };
        let devices = inventory.devices().unwrap();
        let names: Vec<_> = devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            ["can0-m0", "can1-m0", "body-m0", "body-m1", "powertrain-m0"]
        );
        let body = &devices[2];
        assert_eq!(attr(body, "type").string.as_deref(), Some("virtual"));
        assert_eq!(attr(body, "bus").string.as_deref(), Some("body"));
        assert_eq!(attr(body, "bitrate").int, Some(125_000));
        assert!(!body.attributes.as_ref().unwrap().contains_key("interface"));
    }

    #[test]
    fn names_that_are_not_dns_labels_are_sanitised_deterministically() {
        let a = device_prefix("CAN_0");
        assert!(a.starts_with("can-0-"), "{a}");
        assert!(is_dns_label(&format!("{a}-m63")));
        assert_eq!(a, device_prefix("CAN_0"));
        assert_ne!(device_prefix("can.0"), device_prefix("can-0"));
        assert!(is_dns_label(&device_prefix("___")));
    }

    #[test]
    fn colliding_names_are_refused() {
        let inventory = Inventory {
            physical: vec![controller("body", 1)],
            virtual_buses: vec![VirtualBus {
                name: "body".into(),
                bitrate: rate("125k"),
                fd: false,
                data_bitrate: None,
                slots: 1,
            }],
        };
        let err = inventory.slots().unwrap_err();
        assert_eq!(
            err.to_string(),
            "device name \"body-m0\" is claimed by both physical controller \"body\" and virtual bus \"body\"; rename one of them"
        );
    }

    #[test]
    fn config_filters_controllers_and_sets_slots() {
        let config = NodeConfig::from_yaml_str(
            "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\nphysical:\n  include: [\"can*\"]\n  exclude: [\"can9\"]\n  slots: 3\nvirtualBuses:\n- name: pt\n  bitrate: 1M\n  fd: true\n",
        )
        .unwrap();
        let inventory = Inventory::from_config(
            vec![
                controller("can0", 1),
                controller("can9", 1),
                controller("vcan0", 1),
            ],
            &config,
        );
        let everything = NodeConfig::default();
        let own = Inventory::from_config(
            vec![
                controller("vcan0", 1),
                controller("cdracaae087b6e8", 1),
                controller("vxtm-body", 1),
                controller("vxtt-body", 1),
            ],
            &everything,
        );
        let interfaces: Vec<_> = own.physical.iter().map(|c| c.interface.as_str()).collect();
        assert_eq!(
            interfaces,
            ["vcan0"],
            "the driver's own links are no controllers"
        );
        let names: Vec<_> = inventory
            .slots()
            .unwrap()
            .into_iter()
            .map(|s| s.device)
            .collect();
        assert_eq!(
            names,
            [
                "can0-m0", "can0-m1", "can0-m2", "pt-m0", "pt-m1", "pt-m2", "pt-m3", "pt-m4",
                "pt-m5", "pt-m6", "pt-m7"
            ]
        );
        assert_eq!(inventory.virtual_buses[0].data_bitrate, Some(rate("1M")));
    }
}
