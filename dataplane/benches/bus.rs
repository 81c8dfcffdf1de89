//! Bus benchmark (run as root on a kernel with CAN modules, e.g. in the project VM):
//! one-way latency through the bus vs a plain vxcan hop, loss-free throughput for 2, 16 and 64
//! members, and the cost of joining the 64th member vs the 2nd. Ratios within one run are what
//! matter: the machine is shared and noisy.
//!
//! `cargo bench -p can-dra-dataplane --bench bus --no-run`, then run the binary with
//! `cargo xtask vm -- BINARY`. Results go to `docs/benchmarks.md`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use can_dra_dataplane::bus::Buses;
use can_dra_dataplane::bus::model::{BusSpec, MemberSpec, NetnsRef};
use can_dra_dataplane::bus::system::SystemKernel;
use can_dra_dataplane::netns::Netns;
use can_dra_testkit::TestNetns;
use nix::sys::socket::{setsockopt, sockopt};
use socketcan::{CanFrame, CanSocket, EmbeddedFrame, Socket, StandardId};

const LATENCY_SAMPLES: usize = 2000;
const TRIAL: Duration = Duration::from_millis(1000);
/// Receive buffers large enough to hold a whole trial, so readers need not keep pace.
const RCVBUF: usize = 32 << 20;

struct Bench {
    host: TestNetns,
    pods: Vec<TestNetns>,
    buses: Buses<SystemKernel>,
}

impl Bench {
    fn new(pods: usize) -> Self {
        let host = TestNetns::new("benchhost").unwrap();
        let netns = Netns::from_path(host.path()).unwrap();
        let buses = Buses::new(SystemKernel::open_in(&netns).unwrap());
        let pods = (0..pods)
            .map(|_| TestNetns::new("benchpod").unwrap())
            .collect();
        Self { host, pods, buses }
    }

    fn member(&self, i: usize) -> MemberSpec {
        MemberSpec::new(
            format!("bench{i}"),
            NetnsRef::Path(self.pods[i].path()),
            "can0",
        )
    }
}

fn socket(ns: &TestNetns, ifname: &str) -> CanSocket {
    let ifname = ifname.to_string();
    let socket = Netns::from_path(ns.path())
        .unwrap()
        .run(move || CanSocket::open(&ifname))
        .unwrap()
        .unwrap();
    setsockopt(&socket, sockopt::RcvBufForce, &RCVBUF).unwrap();
    socket
}

fn frame(seq: u32) -> CanFrame {
    CanFrame::new(
        StandardId::new(0x123).unwrap(),
        &u64::from(seq).to_be_bytes(),
    )
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Write on `tx`, block until `rx` has it; one frame in flight at a time.
fn latencies(tx: &CanSocket, rx: &CanSocket) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for seq in 0..LATENCY_SAMPLES as u32 {
        let start = Instant::now();
        tx.write_frame(&frame(seq)).unwrap();
        rx.read_frame_timeout(Duration::from_secs(2)).unwrap();
        samples.push(start.elapsed());
    }
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

fn latency() -> ((Duration, Duration), (Duration, Duration)) {
    // Baseline: one plain vxcan hop between two namespaces, no can-gw.
    let a = TestNetns::new("benchvxa").unwrap();
    let b = TestNetns::new("benchvxb").unwrap();
    a.exec(
        "ip",
        &[
            "link",
            "add",
            "can0",
            "mtu",
            "16",
            "type",
            "vxcan",
            "peer",
            "name",
            "can0",
            "netns",
            b.name(),
        ],
    )
    .unwrap();
    a.exec("ip", &["link", "set", "can0", "up"]).unwrap();
    b.exec("ip", &["link", "set", "can0", "up"]).unwrap();
    let baseline = latencies(&socket(&a, "can0"), &socket(&b, "can0"));

    let mut bench = Bench::new(2);
    let mut bus = BusSpec::new("latency");
    bus.members = vec![bench.member(0), bench.member(1)];
    bench.buses.add_bus(bus).unwrap();
    let through_bus = latencies(
        &socket(&bench.pods[0], "can0"),
        &socket(&bench.pods[1], "can0"),
    );
    (baseline, through_bus)
}

/// Frames the kernel dropped because a CPU's input backlog was full (`/proc/net/softnet_stat`,
/// second column, summed over CPUs). vxcan hands every frame to `netif_rx`, so a can-gw fan-out
/// of N copies per frame lands in this queue.
fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .sum()
}

struct Step {
    rate: u32,
    sent: u32,
    fewest: u32,
    send_time: Duration,
    backlog_drops: u64,
}

/// Sends `rate` frames/s for one trial from member 0; returns (frames sent, the smallest
/// count any other member received, how long sending took).
fn trial(tx: &CanSocket, receivers: &[CanSocket], rate: u32) -> (u32, u32, Duration) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let frames = (f64::from(rate) * TRIAL.as_secs_f64()) as u32;
    let start = Instant::now();
    for seq in 0..frames {
        let due = start + interval * seq;
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        tx.write_frame_insist(&frame(seq)).unwrap();
    }
    let send_time = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let mut fewest = u32::MAX;
    for rx in receivers {
        rx.set_nonblocking(true).unwrap();
        let mut count = 0;
        while rx.read_frame().is_ok() {
            count += 1;
        }
        fewest = fewest.min(count);
    }
    (frames, fewest, send_time)
}

/// The highest loss-free achieved rate among the steps, and each step.
fn throughput(members: usize) -> (Option<f64>, Vec<Step>) {
    let mut bench = Bench::new(members);
    let mut bus = BusSpec::new("throughput");
    bus.members = (0..members).map(|i| bench.member(i)).collect();
    bench.buses.add_bus(bus).unwrap();
    let tx = socket(&bench.pods[0], "can0");
    let receivers: Vec<_> = bench.pods[1..]
        .iter()
        .map(|pod| socket(pod, "can0"))
        .collect();
    let mut best = None;
    let mut steps = Vec::new();
    for rate in [250, 500, 1_000, 2_000, 4_000, 7_400, 10_000, 15_000, 20_000] {
        let drops = backlog_drops();
        let (sent, fewest, send_time) = trial(&tx, &receivers, rate);
        let step = Step {
            rate,
            sent,
            fewest,
            send_time,
            backlog_drops: backlog_drops() - drops,
        };
        let loss_free = fewest == sent;
        if loss_free {
            // The sender cannot always keep the nominal pace: rank steps by what it achieved.
            let achieved = f64::from(sent) / send_time.as_secs_f64();
            best = Some(best.map_or(achieved, |best: f64| best.max(achieved)));
        }
        steps.push(step);
        if !loss_free {
            break;
        }
    }
    drop(bench.host);
    (best, steps)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Time to join the 2nd and the 64th member (median of 5 join/leave cycles each).
fn join_cost() -> (Duration, Duration) {
    const TOTAL: usize = 64;
    let mut bench = Bench::new(TOTAL);
    bench.buses.add_bus(BusSpec::new("join")).unwrap();
    bench.buses.join("join", bench.member(0)).unwrap();
    let cycle = |bench: &mut Bench, i: usize| {
        let member = bench.member(i);
        let start = Instant::now();
        bench.buses.join("join", member).unwrap();
        let took = start.elapsed();
        bench.buses.leave("join", &format!("bench{i}")).unwrap();
        took
    };
    let second = median((0..5).map(|_| cycle(&mut bench, 1)).collect());
    for i in 1..TOTAL - 1 {
        let member = bench.member(i);
        bench.buses.join("join", member).unwrap();
    }
    let sixty_fourth = median((0..5).map(|_| cycle(&mut bench, TOTAL - 1)).collect());
    (second, sixty_fourth)
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        // `cargo bench -- --list` and test discovery: nothing to list.
        return;
    }
    let ((base50, base99), (bus50, bus99)) = latency();
    println!("latency (one-way, {LATENCY_SAMPLES} frames, one in flight):");
    println!("  plain vxcan hop:  p50 {base50:?}  p99 {base99:?}");
    println!("  through the bus:  p50 {bus50:?}  p99 {bus99:?}");
    println!(
        "  ratio bus/baseline: p50 {:.2}  p99 {:.2} (target p99 <= 2)",
        bus50.as_secs_f64() / base50.as_secs_f64(),
        bus99.as_secs_f64() / base99.as_secs_f64()
    );
    let default_backlog = std::fs::read_to_string("/proc/sys/net/core/netdev_max_backlog")
        .unwrap_or_default()
        .trim()
        .to_string();
    for (members, backlog) in [(2, None), (16, None), (64, None), (64, Some("10000"))] {
        if let Some(value) = backlog {
            std::fs::write("/proc/sys/net/core/netdev_max_backlog", value).unwrap();
        }
        let (best, steps) = throughput(members);
        println!(
            "throughput, {members} members (1 sender, {} receivers, 8-byte frames, {} s of frames per step at the nominal rate), netdev_max_backlog {}:",
            members - 1,
            TRIAL.as_secs(),
            backlog.unwrap_or(&default_backlog)
        );
        for step in steps {
            let verdict = if step.fewest == step.sent {
                "loss-free"
            } else {
                "LOSS"
            };
            println!(
                "  nominal {:>6}/s: achieved {:>7.0}/s, sent {}, fewest received {} ({verdict}), backlog drops {}",
                step.rate,
                f64::from(step.sent) / step.send_time.as_secs_f64(),
                step.sent,
                step.fewest,
                step.backlog_drops
            );
        }
        match best {
            Some(rate) => {
                println!("  highest loss-free achieved rate: {rate:.0} frames/s to every receiver")
            }
            None => println!("  no loss-free rate found"),
        }
        if backlog.is_some() {
            std::fs::write("/proc/sys/net/core/netdev_max_backlog", &default_backlog).unwrap();
        }
    }
    let (second, sixty_fourth) = join_cost();
    println!("join cost (median of 5):");
    println!("  2nd member:  {second:?}");
    println!("  64th member: {sixty_fourth:?}");
    println!(
        "  ratio 64th/2nd: {:.2} (target <= 4)",
        sixty_fourth.as_secs_f64() / second.as_secs_f64()
    );
}
