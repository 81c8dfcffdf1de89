//! Tunnel benchmark (run as root where CAN modules are loaded, e.g. in the VM):
//! loss and latency of frames crossing the tunnel between two namespace "nodes", against a
//! local vxcan hop measured in the same run.
//!
//! Each path gets paced Classic frames (8 bytes, a unique 29-bit id per frame, the send time in
//! the payload) at several rates; the receiver counts losses and duplicates and computes
//! latency percentiles. A rate counts as loss-free when every frame arrived exactly once.
//!
//! ```sh
//! cargo bench -p can-dra-tunnel --bench tunnel --no-run
//! cargo xtask vm -- /path/to/tunnel-HASH [SECONDS_PER_RATE]
//! ```

use std::collections::HashSet;
use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use can_dra_dataplane::netns::Netns;
use can_dra_testkit::{TestNetns, run};
use can_dra_tunnel::{Endpoint, EndpointConfig, Namespaces};
use socketcan::{
    CanFrame, CanSocket, EmbeddedFrame, ExtendedId, Frame as _, Socket, SocketOptions,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const RATES: [u32; 5] = [1_000, 4_000, 7_400, 15_000, 30_000];
const PORT: u16 = 20000;

/// A transmit socket and a receive socket at the two ends of a path.
struct Path {
    name: &'static str,
    tx: CanSocket,
    rx: CanSocket,
}

#[derive(Debug)]
struct Outcome {
    rate: u32,
    sent: usize,
    received: usize,
    duplicates: usize,
    achieved: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

impl Outcome {
    fn lost(&self) -> usize {
        self.sent.saturating_sub(self.received - self.duplicates)
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))?;
    Ok(())
}

/// A socket on `interface` inside `netns`, with the same 1 MiB receive buffer on every path
/// (the endpoint asks for the same), so bursts are absorbed alike.
fn open_in(netns: &Netns, interface: &str) -> Result<CanSocket> {
    let name = interface.to_string();
    let socket = netns.run(move || CanSocket::open(&name))??;
    socket.set_socket_option_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 1 << 20)?;
    Ok(socket)
}

fn measure(path: &Path, rate: u32, seconds: f64, base: Instant) -> Result<Outcome> {
    let total = (f64::from(rate) * seconds) as usize;
    let stop = Arc::new(AtomicBool::new(false));
    path.rx.set_read_timeout(Duration::from_millis(200))?;
    let outcome = std::thread::scope(|scope| -> Result<Outcome> {
        let receiver = scope.spawn(|| {
            let mut seen = HashSet::new();
            let mut latencies = Vec::new();
            let mut duplicates = 0;
            loop {
                match path.rx.read_frame() {
                    Ok(frame) => {
                        let now = base.elapsed().as_nanos() as u64;
                        let mut stamp = [0u8; 8];
                        stamp.copy_from_slice(&frame.data()[..8.min(frame.data().len())]);
                        latencies.push(now.saturating_sub(u64::from_le_bytes(stamp)));
                        if !seen.insert(frame.raw_id()) {
                            duplicates += 1;
                        }
                    }
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            (latencies, duplicates)
        });
        let start = Instant::now();
        let mut sent = 0usize;
        while sent < total {
            let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as usize).min(total);
            while sent < due {
                let id = ExtendedId::new(u32::try_from(sent)? & 0x1fff_ffff)
                    .ok_or("frame id out of range")?;
                let stamp = (base.elapsed().as_nanos() as u64).to_le_bytes();
                let frame = CanFrame::new(id, &stamp).ok_or("cannot build a frame")?;
                path.tx.write_frame_insist(&frame)?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let elapsed = start.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let (mut latencies, duplicates) = receiver.join().map_err(|_| "receiver panicked")?;
        latencies.sort_unstable();
        let percentile = |p: f64| -> f64 {
            if latencies.is_empty() {
                return f64::NAN;
            }
            let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
            latencies[index] as f64 / 1000.0
        };
        Ok(Outcome {
            rate,
            sent,
            received: latencies.len(),
            duplicates,
            achieved: sent as f64 / elapsed,
            p50_us: percentile(0.50),
            p99_us: percentile(0.99),
            max_us: percentile(1.0),
        })
    })?;
    Ok(outcome)
}

fn main() -> Result<()> {
    let seconds: f64 = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .map(|arg| arg.parse())
        .transpose()?
        .unwrap_or(3.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // Two nodes routed through a hub, as in the kernel tests.
    let hub = TestNetns::new("tbench-hub")?;
    hub.exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
    let mut nodes = Vec::new();
    for i in 0..2u8 {
        let ns = TestNetns::new(&format!("tbench-n{i}"))?;
        let gateway = Ipv4Addr::new(192, 0, 2, 4 * i + 1);
        let address = Ipv4Addr::new(192, 0, 2, 4 * i + 2);
        let side = format!("h{i}");
        ip(&[
            "-n",
            hub.name(),
            "link",
            "add",
            &side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        ip(&[
            "-n",
            hub.name(),
            "addr",
            "add",
            &format!("{gateway}/30"),
            "dev",
            &side,
        ])?;
        ip(&["-n", hub.name(), "link", "set", &side, "up"])?;
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{address}/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns.name(), "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ])?;
        ip(&["-n", ns.name(), "link", "add", "bus0", "type", "vcan"])?;
        ip(&["-n", ns.name(), "link", "set", "bus0", "up"])?;
        let netns = Netns::from_path(ns.path())?;
        nodes.push((ns, netns, SocketAddr::V4(SocketAddrV4::new(address, PORT))));
    }
    // The baseline: one local vxcan hop inside node 0.
    ip(&[
        "-n",
        nodes[0].0.name(),
        "link",
        "add",
        "vxa",
        "type",
        "vxcan",
        "peer",
        "name",
        "vxb",
    ])?;
    ip(&["-n", nodes[0].0.name(), "link", "set", "vxa", "up"])?;
    ip(&["-n", nodes[0].0.name(), "link", "set", "vxb", "up"])?;

    let mut endpoints = Vec::new();
    for (i, (_, netns, addr)) in nodes.iter().enumerate() {
        let endpoint = runtime.block_on(Endpoint::start(
            EndpointConfig::new(*addr, "bus0"),
            Namespaces::both(netns),
        ))?;
        endpoint.set_peers([nodes[1 - i].2]);
        endpoints.push(endpoint);
    }

    let paths = [
        Path {
            name: "local vxcan hop",
            tx: open_in(&nodes[0].1, "vxa")?,
            rx: open_in(&nodes[0].1, "vxb")?,
        },
        Path {
            name: "tunnel (2 namespaces, UDP over veth)",
            tx: open_in(&nodes[0].1, "bus0")?,
            rx: open_in(&nodes[1].1, "bus0")?,
        },
    ];
    let base = Instant::now();
    println!(
        "| path | offered fps | achieved fps | sent | lost | dup | p50 µs | p99 µs | max µs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut results = Vec::new();
    for rate in RATES {
        for path in &paths {
            let outcome = measure(path, rate, seconds, base)?;
            println!(
                "| {} | {} | {:.0} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
                path.name,
                outcome.rate,
                outcome.achieved,
                outcome.sent,
                outcome.lost(),
                outcome.duplicates,
                outcome.p50_us,
                outcome.p99_us,
                outcome.max_us
            );
            results.push((path.name, outcome));
        }
    }
    for path in &paths {
        let best = results
            .iter()
            .filter(|(name, outcome)| {
                *name == path.name && outcome.lost() == 0 && outcome.duplicates == 0
            })
            .map(|(_, outcome)| outcome.rate)
            .max();
        println!(
            "highest loss-free offered rate, {}: {}",
            path.name,
            best.map_or("none".to_string(), |rate| format!("{rate} frames/s"))
        );
    }
    let counters = endpoints[0].counters();
    println!(
        "sending endpoint: {} frames from CAN, {} datagrams out, drops {}",
        counters.frames_from_can,
        counters
            .peers
            .values()
            .map(|peer| peer.datagrams_out)
            .sum::<u64>(),
        counters.drops.values().sum::<u64>()
    );
    for endpoint in endpoints {
        runtime.block_on(endpoint.shutdown())?;
    }
    Ok(())
}
