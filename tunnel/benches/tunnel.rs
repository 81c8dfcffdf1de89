//! Tunnel benchmark (run as root where CAN modules are loaded, e.g. in the VM).
//!
//! **Rates** (the default mode): loss, duplicates, reordering, latency and CPU of frames crossing
//! the tunnel between two namespace "nodes", once per batching policy (the default adaptive
//! window, the old drain-and-send default, a fixed 1 ms window), against a local vxcan hop
//! measured in the same run. Each path gets paced Classic frames (8 bytes: the send time; a
//! 29-bit id unique in the whole run, in sending order) at 1,000 / 4,000 / 7,400 / 15,000
//! frames/s; every repetition measures every rate on every path, interleaved, so all paths see
//! the same machine load.
//!
//! **Mesh**: 2, 4 and 8 nodes in a full mesh of endpoints, one sender at a fixed rate, a
//! receiver on every other node's bus: the process CPU time per delivered frame as the node
//! count grows.
//!
//! ```sh
//! cargo bench -p can-dra-tunnel --bench tunnel --no-run
//! cargo xtask vm -- /path/to/tunnel-HASH [rates] [SECONDS_PER_RUN] [REPETITIONS]
//! cargo xtask vm -- /path/to/tunnel-HASH mesh [SECONDS_PER_RUN] [REPETITIONS] [RATE]
//! ```
//!
//! The process exits non-zero if the tunnel ever duplicated or reordered a frame; the issue's
//! targets (loss, p99) are reported as met or missed, not enforced, because the VM shares a
//! busy host.

use std::collections::HashSet;
use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use can_dra_dataplane::netns::Netns;
use can_dra_testkit::{TestNetns, run};
use can_dra_tunnel::{Batching, Endpoint, EndpointConfig, Namespaces};
use nix::time::{ClockId, clock_gettime};
use socketcan::{
    CanFrame, CanSocket, EmbeddedFrame, ExtendedId, Frame as _, Socket, SocketOptions,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const RATES: [u32; 4] = [1_000, 4_000, 7_400, 15_000];
const NODE_COUNTS: [u8; 3] = [2, 4, 8];
const PORT: u16 = 20000;
/// Frames still arriving this long after the last one was sent are waited for.
const QUIET: Duration = Duration::from_secs(1);
/// Longest wait for stragglers after sending.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

fn policies() -> [(&'static str, Batching); 3] {
    [
        ("adaptive 1 ms (default)", Batching::default()),
        ("drain (old default)", Batching::Drain),
        (
            "fixed 1 ms",
            Batching::Fixed {
                window: Duration::from_millis(1),
            },
        ),
    ]
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))?;
    Ok(())
}

/// CPU time of the whole process (all threads; kernel work done on its behalf, such as the
/// softirq processing of packets it sends, included).
fn process_cpu() -> Result<Duration> {
    Ok(Duration::from(clock_gettime(
        ClockId::CLOCK_PROCESS_CPUTIME_ID,
    )?))
}

/// The name of the runtime's worker threads, which run every endpoint and nothing else.
const WORKER: &str = "tunnel-worker";

/// CPU time of the endpoints: the runtime's worker threads (kernel work done on their behalf,
/// such as sending a datagram through veth and the hub, included).
fn endpoint_cpu() -> Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        // Threads come and go (receivers, namespace helpers): skip those already gone.
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if comm.trim() != WORKER {
            continue;
        }
        let schedstat = std::fs::read_to_string(task.join("schedstat"))?;
        total += schedstat
            .split_whitespace()
            .next()
            .ok_or("empty schedstat")?
            .parse::<u64>()?;
    }
    Ok(Duration::from_nanos(total))
}

/// UDP datagrams the kernel dropped in `netns` because a receive buffer was full.
fn udp_receive_buffer_errors(netns: &Netns) -> Result<u64> {
    let snmp = netns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return Err("no Udp lines in /proc/net/snmp".into());
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .ok_or_else(|| "no RcvbufErrors in /proc/net/snmp".into())
        .and_then(|(_, value)| Ok(value.parse()?))
}

/// Packets the kernel dropped because a CPU's input backlog (`net.core.netdev_max_backlog`)
/// was full, all CPUs together. vcan, vxcan and veth all deliver through it.
fn backlog_drops() -> Result<u64> {
    let mut total = 0;
    for line in std::fs::read_to_string("/proc/net/softnet_stat")?.lines() {
        let dropped = line
            .split_whitespace()
            .nth(1)
            .ok_or("short softnet_stat line")?;
        total += u64::from_str_radix(dropped, 16)?;
    }
    Ok(total)
}

/// The VM's own load average (the host's is noted outside, with `uptime`).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

/// A socket on `interface` inside `netns`, with the same receive buffer on every path (the
/// endpoints ask for the same), so bursts are absorbed alike.
fn open_in(netns: &Netns, interface: &str) -> Result<CanSocket> {
    let name = interface.to_string();
    let socket = netns.run(move || CanSocket::open(&name))??;
    socket.set_socket_option_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 4 << 20)?;
    Ok(socket)
}

/// One node: a namespace on the hub network with vcan buses `bus0`, `bus1`, ...
struct Node {
    ns: TestNetns,
    netns: Netns,
    ip: Ipv4Addr,
}

impl Node {
    fn addr(&self, bus: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, PORT + bus))
    }
}

/// Nodes routed through a hub namespace (192.0.2.0/24, node i at 4i+2), as in the kernel tests.
struct Lan {
    nodes: Vec<Node>,
    _hub: TestNetns,
}

fn lan(tag: &str, count: u8, buses: u16) -> Result<Lan> {
    let hub = TestNetns::new(&format!("{tag}-hub"))?;
    hub.exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
    let mut nodes = Vec::new();
    for i in 0..count {
        let ns = TestNetns::new(&format!("{tag}-n{i}"))?;
        let gateway = Ipv4Addr::new(192, 0, 2, 4 * i + 1);
        let address = Ipv4Addr::new(192, 0, 2, 4 * i + 2);
        let side = format!("h{i}");
        let (hub_name, node_name) = (hub.name(), ns.name());
        ip(&[
            "-n", hub_name, "link", "add", &side, "type", "veth", "peer", "name", "eth0", "netns",
            node_name,
        ])?;
        let gateway_net = format!("{gateway}/30");
        ip(&["-n", hub_name, "addr", "add", &gateway_net, "dev", &side])?;
        ip(&["-n", hub_name, "link", "set", &side, "up"])?;
        let address_net = format!("{address}/30");
        ip(&["-n", node_name, "addr", "add", &address_net, "dev", "eth0"])?;
        ip(&["-n", node_name, "link", "set", "eth0", "up"])?;
        let via = gateway.to_string();
        ip(&["-n", node_name, "route", "add", "default", "via", &via])?;
        for bus in 0..buses {
            let name = format!("bus{bus}");
            ip(&["-n", node_name, "link", "add", &name, "type", "vcan"])?;
            ip(&["-n", node_name, "link", "set", &name, "up"])?;
        }
        let netns = Netns::from_path(ns.path())?;
        nodes.push(Node {
            ns,
            netns,
            ip: address,
        });
    }
    Ok(Lan { nodes, _hub: hub })
}

/// What one receiver saw during one run.
#[derive(Debug, Default)]
struct Received {
    /// One-way latencies of first arrivals, in ns.
    latencies: Vec<u64>,
    duplicates: usize,
    /// Frames that arrived after a frame sent later than them.
    reordered: usize,
    /// Frames from another run (late stragglers).
    strays: usize,
}

/// Reads `socket` until `stop`, counting frames whose id is in `ids`.
fn receive(
    socket: &CanSocket,
    ids: std::ops::Range<u32>,
    base: Instant,
    stop: &AtomicBool,
    unique: &AtomicUsize,
    last_arrival: &AtomicU64,
) -> Received {
    let mut seen = HashSet::new();
    let mut highest: Option<u32> = None;
    let mut got = Received::default();
    loop {
        match socket.read_frame() {
            Ok(frame) => {
                let now = base.elapsed().as_nanos() as u64;
                last_arrival.store(now, Ordering::Relaxed);
                let id = frame.raw_id() & 0x1fff_ffff;
                if !ids.contains(&id) {
                    got.strays += 1;
                    continue;
                }
                if !seen.insert(id) {
                    got.duplicates += 1;
                    continue;
                }
                if highest.is_some_and(|highest| id < highest) {
                    got.reordered += 1;
                }
                highest = Some(highest.map_or(id, |highest| highest.max(id)));
                let mut stamp = [0u8; 8];
                let data = frame.data();
                stamp[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
                got.latencies
                    .push(now.saturating_sub(u64::from_le_bytes(stamp)));
                unique.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(_) => {}
        }
    }
    got
}

/// The outcome of one run on one path.
#[derive(Debug, Clone)]
struct Outcome {
    sent: usize,
    achieved: f64,
    /// Frames that never arrived, summed over the receivers.
    lost: usize,
    duplicates: usize,
    reordered: usize,
    /// Frames already out of order on the sending bus (before any tunnel).
    source_reordered: usize,
    strays: usize,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Process CPU time per delivered frame.
    cpu_us_per_frame: f64,
    /// CPU time of the endpoints per delivered frame.
    endpoint_us_per_frame: f64,
}

/// Datagrams an endpoint has sent, to all peers together.
fn datagrams_out(endpoint: &Endpoint) -> u64 {
    let counters = endpoint.counters();
    counters.peers.values().map(|peer| peer.datagrams_out).sum()
}

/// The columns every table shares.
const COLUMNS: &str = "achieved fps | sent | lost | dup | reord | reord at source | p50 µs | p99 µs | max µs | process CPU µs/frame | endpoints CPU µs/frame";

impl Outcome {
    /// This run's cells of [`COLUMNS`].
    fn cells(&self) -> String {
        format!(
            "{:.0} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1}",
            self.achieved,
            self.sent,
            self.lost,
            self.duplicates,
            self.reordered,
            self.source_reordered,
            self.p50_us,
            self.p99_us,
            self.max_us,
            self.cpu_us_per_frame,
            self.endpoint_us_per_frame,
        )
    }
}

/// Sends `rate` frames/s for `seconds` on `tx`, with ids from `*next_id`, and receives on every
/// socket of `rx`. `source` is a second socket on the sending bus: what it sees out of order
/// was reordered before it left the sending bus.
fn measure(
    tx: &CanSocket,
    source: &CanSocket,
    rx: &[&CanSocket],
    rate: u32,
    seconds: f64,
    base: Instant,
    next_id: &mut u32,
) -> Result<Outcome> {
    let total = (f64::from(rate) * seconds) as u32;
    let first_id = *next_id;
    *next_id += total;
    let ids = first_id..first_id + total;
    let stop = AtomicBool::new(false);
    let unique = AtomicUsize::new(0);
    let last_arrival = AtomicU64::new(0);
    let (source_unique, source_last) = (AtomicUsize::new(0), AtomicU64::new(0));
    for socket in rx.iter().chain([&source]) {
        socket.set_read_timeout(Duration::from_millis(100))?;
    }
    let cpu_before = process_cpu()?;
    let endpoints_before = endpoint_cpu()?;
    let (sent, elapsed, (received, at_source)) = std::thread::scope(|scope| -> Result<_> {
        let receivers: Vec<_> = rx
            .iter()
            .map(|socket| {
                let ids = ids.clone();
                let (stop, unique, last_arrival) = (&stop, &unique, &last_arrival);
                scope.spawn(move || receive(socket, ids, base, stop, unique, last_arrival))
            })
            .collect();
        let source_receiver = {
            let (ids, stop) = (ids.clone(), &stop);
            let (unique, last_arrival) = (&source_unique, &source_last);
            scope.spawn(move || receive(source, ids, base, stop, unique, last_arrival))
        };
        let start = Instant::now();
        let mut sent = 0u32;
        while sent < total {
            let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as u32).min(total);
            while sent < due {
                let id = ExtendedId::new(first_id + sent).ok_or("frame id out of range")?;
                let stamp = (base.elapsed().as_nanos() as u64).to_le_bytes();
                let frame = CanFrame::new(id, &stamp).ok_or("cannot build a frame")?;
                tx.write_frame_insist(&frame)?;
                sent += 1;
            }
            // Until the next frame is due, but at least 200 µs: every wake-up of the sender
            // costs CPU the endpoints then lack (a lot of it under emulation).
            let next = Duration::from_secs_f64(f64::from(sent + 1) / f64::from(rate));
            let wait = next.saturating_sub(start.elapsed());
            std::thread::sleep(wait.max(Duration::from_micros(200)));
        }
        let elapsed = start.elapsed().as_secs_f64();
        // Wait for stragglers: until everything arrived, or nothing did for a while.
        let expected = total as usize * rx.len();
        let settle = Instant::now();
        while unique.load(Ordering::Relaxed) < expected && settle.elapsed() < SETTLE_LIMIT {
            let quiet_for = base
                .elapsed()
                .saturating_sub(Duration::from_nanos(last_arrival.load(Ordering::Relaxed)));
            if quiet_for > QUIET {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let mut received = Vec::new();
        for receiver in receivers {
            received.push(receiver.join().map_err(|_| "receiver panicked")?);
        }
        let at_source = source_receiver.join().map_err(|_| "receiver panicked")?;
        Ok((sent as usize, elapsed, (received, at_source)))
    })?;
    // Time spent waiting for stragglers costs next to no CPU: the receivers block.
    let cpu = process_cpu()?.saturating_sub(cpu_before);
    let endpoints = endpoint_cpu()?.saturating_sub(endpoints_before);
    let mut latencies: Vec<u64> = received
        .iter()
        .flat_map(|got| got.latencies.iter().copied())
        .collect();
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[index] as f64 / 1000.0
    };
    let delivered = latencies.len();
    Ok(Outcome {
        sent,
        achieved: sent as f64 / elapsed,
        lost: (sent * rx.len()).saturating_sub(delivered),
        duplicates: received.iter().map(|got| got.duplicates).sum(),
        reordered: received.iter().map(|got| got.reordered).sum(),
        source_reordered: at_source.reordered,
        strays: received.iter().map(|got| got.strays).sum(),
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
        max_us: percentile(1.0),
        cpu_us_per_frame: cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
        endpoint_us_per_frame: endpoints.as_secs_f64() * 1e6 / delivered.max(1) as f64,
    })
}

/// min / median / max, formatted.
fn spread(mut values: Vec<f64>, digits: usize) -> String {
    values.retain(|value| value.is_finite());
    if values.is_empty() {
        return "-".into();
    }
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    format!(
        "{:.digits$} / {:.digits$} / {:.digits$}",
        values[0],
        median,
        values[values.len() - 1]
    )
}

struct Args {
    mode: String,
    seconds: f64,
    repetitions: usize,
    rate: u32,
}

fn args() -> Result<Args> {
    // Cargo passes `--bench`; ignore flags.
    let mut words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let mode = if words
        .first()
        .is_some_and(|word| word == "rates" || word == "mesh")
    {
        words.remove(0)
    } else {
        "rates".into()
    };
    let number = |index: usize| words.get(index).map(|word| word.parse::<f64>()).transpose();
    Ok(Args {
        mode,
        seconds: number(0)?.unwrap_or(3.0),
        repetitions: number(1)?.map_or(3, |value| value as usize),
        rate: number(2)?.map_or(2_000, |value| value as u32),
    })
}

fn main() -> Result<()> {
    let args = args()?;
    // `CAN_DRA_BENCH_WORKERS=1` runs every endpoint on one thread (2 by default, as the VM's
    // CPUs): a task that moves between threads can have its frames overtaken in the kernel.
    let workers = match std::env::var("CAN_DRA_BENCH_WORKERS") {
        Ok(value) => value.parse()?,
        Err(_) => 2,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(WORKER)
        .enable_all()
        .build()?;
    println!(
        "tunnel benchmark, mode {}, {} s per run, {} repetitions, {workers} runtime threads; VM load average at start: {}",
        args.mode,
        args.seconds,
        args.repetitions,
        loadavg()
    );
    let clean = match args.mode.as_str() {
        "mesh" => mesh(&runtime, &args)?,
        _ => rates(&runtime, &args)?,
    };
    if !clean {
        return Err("the tunnel duplicated or reordered frames".into());
    }
    Ok(())
}

/// The rates mode; false if a tunnel path duplicated or reordered a frame.
fn rates(runtime: &tokio::runtime::Runtime, args: &Args) -> Result<bool> {
    let policies = policies();
    let buses = policies.len() as u16;
    let lan = lan("tbench", 2, buses)?;
    let (a, b) = (&lan.nodes[0], &lan.nodes[1]);
    // The baseline: one local vxcan hop inside node 0.
    let ns_name = a.ns.name();
    ip(&[
        "-n", ns_name, "link", "add", "vxa", "type", "vxcan", "peer", "name", "vxb",
    ])?;
    ip(&["-n", ns_name, "link", "set", "vxa", "up"])?;
    ip(&["-n", ns_name, "link", "set", "vxb", "up"])?;

    // One pair of endpoints per policy, each on its own bus and port; idle ones cost nothing.
    let mut endpoints = Vec::new();
    for (bus, (_, batching)) in policies.iter().enumerate() {
        let bus = bus as u16;
        for (node, peer) in [(a, b), (b, a)] {
            let mut config = EndpointConfig::new(node.addr(bus), format!("bus{bus}"));
            config.batching = *batching;
            let endpoint =
                runtime.block_on(Endpoint::start(config, Namespaces::both(&node.netns)))?;
            endpoint.set_peers([peer.addr(bus)]);
            endpoints.push((bus, endpoint));
        }
    }
    if let Some((_, endpoint)) = endpoints.first() {
        println!("endpoint socket buffers: {:?}", endpoint.socket_buffers());
    }
    let mut paths = vec![(
        "local vxcan hop".to_string(),
        open_in(&a.netns, "vxa")?,
        open_in(&a.netns, "vxa")?,
        open_in(&a.netns, "vxb")?,
    )];
    for (bus, (name, _)) in policies.iter().enumerate() {
        let interface = format!("bus{bus}");
        paths.push((
            format!("tunnel, {name}"),
            open_in(&a.netns, &interface)?,
            open_in(&a.netns, &interface)?,
            open_in(&b.netns, &interface)?,
        ));
    }

    let base = Instant::now();
    let mut next_id = 0u32;
    // results[path][rate] = outcomes over repetitions
    let mut results = vec![vec![Vec::new(); RATES.len()]; paths.len()];
    println!();
    println!(
        "| rep | path | offered fps | {COLUMNS} | UDP rcvbuf drops | backlog drops | VM load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for rep in 1..=args.repetitions {
        for (rate_index, rate) in RATES.iter().enumerate() {
            for (path_index, (name, tx, source, rx)) in paths.iter().enumerate() {
                let drops_before = udp_receive_buffer_errors(&b.netns)?;
                let backlog_before = backlog_drops()?;
                let outcome = measure(tx, source, &[rx], *rate, args.seconds, base, &mut next_id)?;
                let drops = udp_receive_buffer_errors(&b.netns)? - drops_before;
                let backlog = backlog_drops()? - backlog_before;
                println!(
                    "| {rep} | {name} | {rate} | {} | {drops} | {backlog} | {} |",
                    outcome.cells(),
                    loadavg()
                );
                if outcome.strays > 0 {
                    println!(
                        "(note: {} frames of an earlier run arrived late)",
                        outcome.strays
                    );
                }
                results[path_index][rate_index].push(outcome);
            }
        }
    }

    println!();
    println!(
        "Spread over {} repetitions (min / median / max); ratios against the local hop of the same repetition.",
        args.repetitions
    );
    println!();
    println!(
        "| path | offered fps | lost (per rep) | dup | reord | p50 µs | p99 µs | p99 / local p99 | process CPU µs/frame | process CPU / local | endpoints CPU µs/frame |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (path_index, (name, _, _, _)) in paths.iter().enumerate() {
        for (rate_index, rate) in RATES.iter().enumerate() {
            let runs = &results[path_index][rate_index];
            let local = &results[0][rate_index];
            let ratio = |value: fn(&Outcome) -> f64| {
                runs.iter()
                    .zip(local)
                    .map(|(run, local)| value(run) / value(local))
                    .collect::<Vec<_>>()
            };
            println!(
                "| {name} | {rate} | {} | {} | {} ({} at source) | {} | {} | {} | {} | {} | {} |",
                runs.iter()
                    .map(|run| run.lost.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                runs.iter().map(|run| run.duplicates).sum::<usize>(),
                runs.iter().map(|run| run.reordered).sum::<usize>(),
                runs.iter().map(|run| run.source_reordered).sum::<usize>(),
                spread(runs.iter().map(|run| run.p50_us).collect(), 0),
                spread(runs.iter().map(|run| run.p99_us).collect(), 0),
                spread(ratio(|run| run.p99_us), 1),
                spread(runs.iter().map(|run| run.cpu_us_per_frame).collect(), 1),
                spread(ratio(|run| run.cpu_us_per_frame), 2),
                spread(
                    runs.iter().map(|run| run.endpoint_us_per_frame).collect(),
                    1
                ),
            );
        }
    }

    // The issue's targets, for the default policy (path 1).
    println!();
    let default_runs = &results[1];
    let all = |rate_index: usize, check: &dyn Fn(&Outcome, &Outcome) -> bool| {
        default_runs[rate_index]
            .iter()
            .zip(&results[0][rate_index])
            .all(|(run, local)| check(run, local))
    };
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let loss_free = (0..RATES.len()).all(|r| all(r, &|run, _| run.lost == 0 && run.reordered == 0));
    println!(
        "target: zero loss and reordering up to 15,000 frames/s (default policy, every rep): {}",
        verdict(loss_free)
    );
    println!(
        "target: p99 under 5 ms at 1,000 frames/s (every rep): {}",
        verdict(all(0, &|run, _| run.p99_us < 5_000.0))
    );
    println!(
        "target: p99 at most 10x the local hop's at 7,400 frames/s (every rep): {}",
        verdict(all(2, &|run, local| run.p99_us <= 10.0 * local.p99_us))
    );

    let mut clean = true;
    for (path_index, (name, _, _, _)) in paths.iter().enumerate().skip(1) {
        let runs = results[path_index].iter().flatten();
        let dup: usize = runs.clone().map(|run| run.duplicates).sum();
        let reord: usize = runs.clone().map(|run| run.reordered).sum();
        let at_source: usize = runs.map(|run| run.source_reordered).sum();
        if dup + reord > 0 {
            println!(
                "FAIL: {name}: {dup} duplicated, {reord} reordered ({at_source} already out of order on the sending bus)"
            );
            clean = false;
        }
    }
    for (bus, endpoint) in &endpoints {
        let counters = endpoint.counters();
        let out = datagrams_out(endpoint);
        let drops: Vec<String> = counters
            .drops
            .iter()
            .filter(|(_, count)| **count > 0)
            .map(|(reason, count)| format!("{} {count}", reason.as_str()))
            .collect();
        println!(
            "{} at {}: {} frames from CAN in {} datagrams ({:.1} frames each), {} frames to CAN, drops: {}",
            paths[usize::from(*bus) + 1].0,
            endpoint.local_addr(),
            counters.frames_from_can,
            out,
            counters.frames_from_can as f64 / out.max(1) as f64,
            counters.frames_to_can,
            if drops.is_empty() {
                "none".to_string()
            } else {
                drops.join(", ")
            }
        );
    }
    for (_, endpoint) in endpoints {
        runtime.block_on(endpoint.shutdown())?;
    }
    Ok(clean)
}

/// The mesh mode: CPU per delivered frame as the node count grows; false if a frame was
/// duplicated or reordered.
fn mesh(runtime: &tokio::runtime::Runtime, args: &Args) -> Result<bool> {
    println!();
    println!(
        "| nodes | policy | rep | offered fps | {COLUMNS} | delivered | sender datagrams/s | VM load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut clean = true;
    let mut summary = Vec::new();
    let base = Instant::now();
    let mut next_id = 0u32;
    for count in NODE_COUNTS {
        let lan = lan(&format!("tmesh{count}"), count, 1)?;
        for (policy_name, batching) in [policies()[0], policies()[1]] {
            let mut endpoints = Vec::new();
            for node in &lan.nodes {
                let mut config = EndpointConfig::new(node.addr(0), "bus0");
                config.batching = batching;
                let endpoint =
                    runtime.block_on(Endpoint::start(config, Namespaces::both(&node.netns)))?;
                endpoint.set_peers(
                    lan.nodes
                        .iter()
                        .filter(|other| other.ip != node.ip)
                        .map(|other| other.addr(0)),
                );
                endpoints.push(endpoint);
            }
            let tx = open_in(&lan.nodes[0].netns, "bus0")?;
            let source = open_in(&lan.nodes[0].netns, "bus0")?;
            let rx = lan.nodes[1..]
                .iter()
                .map(|node| open_in(&node.netns, "bus0"))
                .collect::<Result<Vec<_>>>()?;
            let rx: Vec<&CanSocket> = rx.iter().collect();
            let (mut cpu, mut endpoint) = (Vec::new(), Vec::new());
            for rep in 1..=args.repetitions {
                let datagrams_before = datagrams_out(&endpoints[0]);
                let outcome = measure(
                    &tx,
                    &source,
                    &rx,
                    args.rate,
                    args.seconds,
                    base,
                    &mut next_id,
                )?;
                let datagrams_after = datagrams_out(&endpoints[0]);
                let delivered = outcome.sent * rx.len() - outcome.lost;
                println!(
                    "| {count} | {policy_name} | {rep} | {} | {} | {delivered} | {:.0} | {} |",
                    args.rate,
                    outcome.cells(),
                    (datagrams_after - datagrams_before) as f64 / args.seconds,
                    loadavg(),
                );
                if outcome.duplicates + outcome.reordered > 0 {
                    clean = false;
                }
                cpu.push(outcome.cpu_us_per_frame);
                endpoint.push(outcome.endpoint_us_per_frame);
            }
            summary.push((count, policy_name, spread(cpu, 1), spread(endpoint, 1)));
            for endpoint in endpoints {
                runtime.block_on(endpoint.shutdown())?;
            }
        }
    }
    println!();
    println!(
        "| nodes | policy | process CPU µs per delivered frame (min / median / max) | endpoints CPU µs per delivered frame |"
    );
    println!("|---|---|---|---|");
    for (count, policy, cpu, endpoint) in summary {
        println!("| {count} | {policy} | {cpu} | {endpoint} |");
    }
    Ok(clean)
}
