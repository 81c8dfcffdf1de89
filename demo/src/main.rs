//! `can-dra-demo`: the local demo behind the README's main command.
//!
//! On the real kernel (a VM when the host kernel lacks CAN), it builds what the node daemon
//! builds for three pods that share one CAN bus with a physical controller stand-in, then
//! shows what a user cares about: who receives which frames, what shaping does to one member,
//! that a listen-only member cannot send, and that nothing is left afterwards.
//!
//! Topology (all namespaces are created by the demo and vanish with it):
//!
//! ```text
//!   wire ns: ecu ──vxcan── node ns: can0 (the "physical" controller)
//!                                  │ can-gw full mesh (IIF_TX_OK, one hop)
//!            ┌─────────────────────┼─────────────────────┐
//!      host end of pod-a     host end of pod-b     host end of pod-c
//!            │vxcan                │vxcan (shaped)       │vxcan (listen-only)
//!      pod-a ns: can0        pod-b ns: can0        pod-c ns: can0
//! ```

mod namespaces;
mod traffic;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use can_dra_dataplane::bus::model::{Access, BusSpec, MemberSpec, NetnsRef, Shaping};
use can_dra_dataplane::bus::{Buses, system::SystemKernel};
use can_dra_dataplane::link::{CanMtu, Links, VxcanSpec};

use namespaces::DemoNetns;
use traffic::Seen;

const BUS: &str = "body";
const ECU_ID: u16 = 0x100;
const POD_A_ID: u16 = 0x200;
const MONITOR_ID: u16 = 0x7ff;

struct Pod {
    name: &'static str,
    member: &'static str,
    netns: DemoNetns,
}

fn main() -> anyhow::Result<()> {
    println!(
        "can-dra local demo: three pods share one CAN bus with a physical controller stand-in\n"
    );
    let node = DemoNetns::create("node")?;
    let wire = DemoNetns::create("wire")?;
    let pods = [
        ("pod-a", "claim-a/can"),
        ("pod-b", "claim-b/can"),
        ("pod-c", "claim-c/can"),
    ]
    .map(|(name, member)| {
        DemoNetns::create(name).map(|netns| Pod {
            name,
            member,
            netns,
        })
    });
    let [pod_a, pod_b, pod_c] = pods;
    let (pod_a, pod_b, pod_c) = (pod_a?, pod_b?, pod_c?);

    step(
        "the node's CAN controller: can0, wired to an ECU (a vxcan whose far end sits in the wire namespace)",
    );
    let node_ns = node.open()?;
    let wire_ns = wire.open()?;
    Links::open_in(&node_ns)?
        .create_vxcan(&VxcanSpec::new("can0", "ecu", CanMtu::Classic), &wire_ns)
        .context("creating the physical stand-in")?;

    step("bus `body`: can0 plus three members, as three prepared claims would ask");
    let mut buses = Buses::new(SystemKernel::open_in(&node_ns)?);
    let mut bus = BusSpec::new(BUS);
    bus.physical = Some("can0".into());
    buses.add_bus(bus)?;
    let shaped = Shaping {
        bitrate: Some(20_000),
        delay_us: 20_000,
        loss_ppm: 100_000,
        ..Shaping::default()
    };
    for pod in [&pod_a, &pod_b, &pod_c] {
        let mut member =
            MemberSpec::new(pod.member, NetnsRef::Path(pod.netns.path().clone()), "can0");
        let role = match pod.name {
            "pod-b" => {
                member.rx_shaping = Some(shaped);
                "read-write, receives through a 20 kbit/s bus with 20 ms delay and 10% loss"
            }
            "pod-c" => {
                member.access = Access::ListenOnly;
                "listen-only monitor"
            }
            _ => "read-write",
        };
        buses
            .join(BUS, member)
            .with_context(|| format!("joining {}", pod.name))?;
        println!("    {} joined as can0: {role}", pod.name);
    }

    let namespaces = [
        ("ecu (wire)", wire.open()?, "ecu"),
        ("pod-a", pod_a.netns.open()?, "can0"),
        ("pod-b", pod_b.netns.open()?, "can0"),
        ("pod-c", pod_c.netns.open()?, "can0"),
    ];

    step("1. the ECU sends 100 frames (id 0x100), 10 ms apart");
    let (seen, sent) = exchange(&namespaces, 0, ECU_ID, 100, Duration::from_millis(10))?;
    let counts = report(&seen, ECU_ID, 0);
    let mut checks = Checks::default();
    checks.expect(
        counts[0] == 100 && counts[1] == 100 && counts[3] == 100,
        "every ECU frame reached pod-a and pod-c once, and none came back to the ECU",
    );
    checks.expect(
        (50..100).contains(&counts[2]),
        format!(
            "pod-b lost some ECU frames to its 10% loss ({} of 100 arrived)",
            counts[2]
        ),
    );
    let latency_a = mean_latency(&seen[1], &sent, ECU_ID);
    let latency_b = mean_latency(&seen[2], &sent, ECU_ID);
    println!(
        "    mean one-way delay: pod-a {:.2} ms, pod-b {:.2} ms (20 ms asked + 6.8 ms wire time per frame at 20 kbit/s)",
        latency_a * 1e3,
        latency_b * 1e3
    );
    checks.expect(
        latency_b >= 0.020 && latency_a < 0.010,
        format!(
            "pod-b's frames were delayed at least 20 ms ({:.1} ms), pod-a's were not ({:.2} ms)",
            latency_b * 1e3,
            latency_a * 1e3
        ),
    );

    step("2. pod-a sends 50 frames (id 0x200): the ECU and the other pods receive them");
    let (seen, _) = exchange(&namespaces, 1, POD_A_ID, 50, Duration::from_millis(10))?;
    let counts = report(&seen, POD_A_ID, 1);
    checks.expect(
        counts[0] == 50 && counts[1] == 50 && counts[3] == 50,
        "every pod-a frame reached the ECU (through the physical controller) and pod-c once",
    );

    step("3. pod-c (listen-only) tries to send 20 frames (id 0x7FF)");
    let (seen, _) = exchange(&namespaces, 3, MONITOR_ID, 20, Duration::from_millis(2))?;
    let counts = report(&seen, MONITOR_ID, 3);
    checks.expect(
        counts[0] == 0 && counts[1] == 0 && counts[2] == 0,
        "nothing pod-c sent reached anyone",
    );

    step("4. the ECU bursts 400 frames back to back: pod-b's member gets a 20 kbit/s bus");
    let (seen, _) = exchange(&namespaces, 0, ECU_ID, 400, Duration::ZERO)?;
    for (index, (name, _, _)) in namespaces.iter().enumerate().skip(1) {
        let frames: Vec<&Seen> = seen[index]
            .iter()
            .filter(|s| s.id == u32::from(ECU_ID))
            .collect();
        if let (Some(first), Some(last)) = (frames.first(), frames.last()) {
            let span = last.at.duration_since(first.at).as_secs_f64();
            let rate = if span > 0.0 {
                (frames.len() - 1) as f64 / span
            } else {
                f64::INFINITY
            };
            println!("    {name}: {} frames at {rate:.0} frames/s", frames.len());
            if *name == "pod-b" {
                checks.expect(
                    rate < 148.0 * 1.2,
                    format!(
                        "pod-b received at most a 20 kbit/s bus's frame rate ({rate:.0} frames/s)"
                    ),
                );
            }
        }
    }
    println!("    (a 20 kbit/s bus carries at most 20000/135 = 148 worst-case 8-byte frames/s)");

    step("counters kept by the kernel, per member");
    let mut monitor_dropped = 0;
    for pod in [&pod_a, &pod_b, &pod_c] {
        let counters = buses.counters(BUS, pod.member)?;
        println!(
            "    {}: forwarded from it {}, to it {}, dropped on its way in {}, blocked at transmit {}",
            pod.name,
            counters.forwarded_from,
            counters.forwarded_to,
            counters.gateway_dropped,
            counters.transmit_dropped
        );
        if pod.name == "pod-c" {
            monitor_dropped = counters.transmit_dropped;
        }
    }

    println!(
        "    (a shaped member's queue overflows in a burst: like a slow bus, it loses what it cannot carry)"
    );

    step("teardown: members leave, the bus goes");
    for pod in [&pod_a, &pod_b, &pod_c] {
        buses.leave(BUS, pod.member)?;
    }
    buses.remove_bus(BUS)?;
    let left: Vec<String> = Links::open_in(&node_ns)?
        .list()?
        .into_iter()
        .map(|link| link.name)
        .filter(|name| name != "lo" && name != "can0")
        .collect();
    if !left.is_empty() {
        bail!("links left behind in the node namespace: {left:?}");
    }
    println!("    node namespace holds only lo and can0 again");
    checks.expect(
        monitor_dropped == 20,
        format!("the kernel counted pod-c's blocked frames ({monitor_dropped} of 20)"),
    );
    checks.expect(true, "teardown left nothing behind");

    println!("\nsummary:");
    checks.finish()
}

/// What the demo shows, checked rather than asserted in prose.
#[derive(Default)]
struct Checks {
    results: Vec<(bool, String)>,
}

impl Checks {
    fn expect(&mut self, ok: bool, what: impl Into<String>) {
        self.results.push((ok, what.into()));
    }

    fn finish(self) -> anyhow::Result<()> {
        let failed = self.results.iter().filter(|(ok, _)| !ok).count();
        for (ok, what) in &self.results {
            println!("  [{}] {what}", if *ok { "ok" } else { "FAILED" });
        }
        if failed > 0 {
            bail!("{failed} of {} checks failed", self.results.len());
        }
        println!("  all {} checks passed", self.results.len());
        Ok(())
    }
}

fn step(text: &str) {
    println!("==> {text}");
}

type Observations = Vec<Vec<Seen>>;

/// Starts a receiver everywhere, sends from `sender`, waits for stragglers, returns what each
/// namespace saw and the send times.
fn exchange(
    namespaces: &[(&str, can_dra_dataplane::netns::Netns, &str); 4],
    sender: usize,
    id: u16,
    count: u32,
    gap: Duration,
) -> anyhow::Result<(Observations, Vec<Instant>)> {
    let receivers = namespaces
        .iter()
        .map(|(_, netns, interface)| traffic::listen(netns, interface))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (_, netns, interface) = &namespaces[sender];
    let sent = traffic::send(netns, interface, id, count, gap)?;
    // Shaped members receive late: wait until every receiver has been quiet for a while.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && receivers
            .iter()
            .any(|receiver| receiver.last_frame().elapsed() < QUIET)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = receivers
        .into_iter()
        .map(traffic::Receiver::finish)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((seen, sent))
}

/// How long a receiver must be silent before a phase is over.
const QUIET: Duration = Duration::from_millis(1000);

const NAMES: [&str; 4] = ["ecu (wire)", "pod-a", "pod-b", "pod-c"];

/// Prints and returns how many frames with `id` each party received.
fn report(seen: &Observations, id: u16, sender: usize) -> Vec<usize> {
    let mut counts = Vec::with_capacity(seen.len());
    for (index, frames) in seen.iter().enumerate() {
        let count = frames.iter().filter(|s| s.id == u32::from(id)).count();
        counts.push(count);
        let note = if index == sender {
            " (the sender's namespace: its local echo only; the bus sent nothing back)"
        } else {
            ""
        };
        println!("    {:<11} received {count:>4}{note}", NAMES[index]);
    }
    counts
}

fn mean_latency(seen: &[Seen], sent: &[Instant], id: u16) -> f64 {
    let delays: Vec<f64> = seen
        .iter()
        .filter(|s| s.id == u32::from(id))
        .filter_map(|s| {
            sent.get(s.sequence as usize)
                .map(|t| s.at.duration_since(*t).as_secs_f64())
        })
        .collect();
    if delays.is_empty() {
        0.0
    } else {
        delays.iter().sum::<f64>() / delays.len() as f64
    }
}
