//! The chart's DeviceClasses select what their names promise, evaluated with a CEL interpreter on
//! devices computed by the daemon's and the controller's publishing code: `physical.<driver>`
//! exactly the physical controllers' slots, `virtual.<driver>` exactly the virtual buses' slots
//! (node-local and CanBus), `<driver>` all of them, and no selector fails on any device.

// Test helpers outside #[test] functions panic on bad input by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{CANBUS, DRIVER, PHYSICAL, VIRTUAL};

/// The sources (see `common::PHYSICAL`) of the sample devices that every selector of the class
/// `name` in the default rendering selects.
fn selected_sources(name: &str) -> BTreeSet<&'static str> {
    let class = common::default_render()
        .iter()
        .map(common::to_json)
        .find(|o| o["kind"] == "DeviceClass" && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no DeviceClass {name}"));
    let expressions: Vec<&str> = class["spec"]["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cel"]["expression"].as_str().unwrap())
        .collect();
    assert!(!expressions.is_empty(), "{name} has no selector");
    let mut sources = BTreeSet::new();
    for (source, device) in common::sample_devices() {
        let selected = expressions.iter().all(|e| {
            common::select(e, &device)
                .unwrap_or_else(|error| panic!("{name}: {e} on {}: {error}", device.name))
        });
        if selected {
            sources.insert(source);
        }
    }
    sources
}

#[test]
fn each_class_selects_the_devices_its_name_promises() {
    assert_eq!(
        selected_sources(DRIVER),
        BTreeSet::from([PHYSICAL, VIRTUAL, CANBUS])
    );
    assert_eq!(
        selected_sources(&format!("physical.{DRIVER}")),
        BTreeSet::from([PHYSICAL])
    );
    assert_eq!(
        selected_sources(&format!("virtual.{DRIVER}")),
        BTreeSet::from([VIRTUAL, CANBUS])
    );
}
