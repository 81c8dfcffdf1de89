//! Prepare benchmark of the node daemon: the real `can-dra-kubelet-plugin` binary, started as a
//! child process against the API server double (claims, status writes) and driven by the kubelet
//! double over the real unix sockets. Prepare never touches the kernel, so this runs on any
//! Linux host, CAN or not.
//!
//! Measured, all in one run so that ratios compare like with like on a shared, noisy machine:
//! - the floor: an empty `NodePrepareResources` (gRPC round trip and serialisation lock only);
//! - preparing one claim on an empty node ("first") and the 64th claim on the same bus with 63
//!   already prepared, in separate requests, repeated over fresh rounds (all 64 are unprepared
//!   between rounds);
//! - 64 claims in one request, against 64 times the single-claim median;
//! - unpreparing 64 claims in one request;
//! - the daemon's memory (`/proc/<pid>/status`) idle after start, with 64 prepared claims, and
//!   at the end.
//!
//! Cargo builds the daemon with the bench profile and hands its path over as
//! `CARGO_BIN_EXE_can-dra-kubelet-plugin` (that is `$CARGO_TARGET_DIR/release/can-dra-kubelet-plugin`);
//! `CAN_DRA_BENCH_DAEMON=/path/to/can-dra-kubelet-plugin` runs another build instead, for
//! comparing two versions in one sitting. The daemon's files (CDI specs, checkpoint, sockets)
//! live in a temporary directory under `$TMPDIR` (default `/tmp`), so its fsyncs hit whatever
//! file system that is; say which when quoting results.
//!
//! ```sh
//! cargo bench -p can-dra-kubelet-plugin --bench prepare            # 50 rounds each
//! cargo bench -p can-dra-kubelet-plugin --bench prepare -- 10      # fewer rounds
//! ```
//! Extra environment for the daemon (for example `TOKIO_WORKER_THREADS=32` to see what a larger
//! node would cost) is passed through unchanged. Results go to `docs/benchmarks.md`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/api_support/mod.rs"]
mod api_support;
#[path = "../tests/daemon_support/mod.rs"]
mod daemon_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use api_support::{DRIVER, NODE, claim, config, result, server_with_node};
use can_dra_doubles::apiserver::ApiServer;
use can_dra_proto::dra::v1::Claim;
use daemon_support::{Daemon, NodeDirs};
use serde_json::json;

/// Claims per bus in the large cases; the node configuration allows at most 64 slots a bus.
const CLAIMS: usize = 64;
const DEFAULT_ROUNDS: usize = 50;
/// The hook the CDI specs name (never run: nothing is attached).
const HOOK: &str = "/opt/can-dra/bin/can-dra-cdi-hook";
/// Requests of the floor measurement.
const EMPTY_SAMPLES: usize = 200;

/// The daemon under test and everything it talks to.
struct Rig {
    daemon: Daemon,
    api: ApiServer,
    dirs: NodeDirs,
    root: tempfile::TempDir,
}

impl Rig {
    async fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let (api, _, _) = server_with_node().await;
        let dirs = NodeDirs::new(
            root.path(),
            &api,
            &format!(
                "apiVersion: can.dra.dev/v1alpha1\nkind: NodeConfig\nvirtualBuses:\n\
                 - name: body\n  bitrate: 500k\n  slots: {CLAIMS}\n"
            ),
        );
        let daemon =
            Daemon::start_binary(&daemon_binary(), &dirs, NODE, DRIVER, Path::new(HOOK), None)
                .await;
        for k in 0..CLAIMS {
            api.insert_claim(claim(
                &format!("c{k:02}"),
                &uid(k),
                Some((
                    json!([result("a", &format!("body-m{k}"))]),
                    json!([config("FromClaim", &[], json!({"interfaceName": "can0"}))]),
                )),
            ));
        }
        Self {
            daemon,
            api,
            dirs,
            root,
        }
    }

    fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    fn checkpoint(&self) -> PathBuf {
        self.dirs.data(DRIVER).join("checkpoint.json")
    }

    /// Prepares `claims` in one request; every claim must succeed with its one device.
    async fn prepare(&self, claims: &[Claim]) -> Duration {
        let started = Instant::now();
        let answer = self.daemon.plugin.prepare(claims.to_vec()).await.unwrap();
        let elapsed = started.elapsed();
        for claim in claims {
            let entry = &answer.claims[&claim.uid];
            assert_eq!(entry.error, "", "claim {}", claim.name);
            assert_eq!(entry.devices.len(), 1, "claim {}", claim.name);
        }
        elapsed
    }

    /// Unprepares `claims` in one request; every claim must succeed.
    async fn unprepare(&self, claims: &[Claim]) -> Duration {
        let started = Instant::now();
        let answer = self.daemon.plugin.unprepare(claims.to_vec()).await.unwrap();
        let elapsed = started.elapsed();
        for claim in claims {
            assert_eq!(answer.claims[&claim.uid].error, "", "claim {}", claim.name);
        }
        elapsed
    }

    /// Stops the daemon with SIGTERM; it must exit cleanly.
    fn stop(self) {
        let log = self.daemon.log.clone();
        assert!(
            self.daemon.stop(),
            "the daemon did not exit cleanly; see {}",
            log.display()
        );
        drop(self.api);
    }
}

/// The daemon to run: `CAN_DRA_BENCH_DAEMON` if set, else the one cargo built for this bench.
fn daemon_binary() -> PathBuf {
    std::env::var_os("CAN_DRA_BENCH_DAEMON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_can-dra-kubelet-plugin")))
}

fn uid(k: usize) -> String {
    format!("uid-{k:02}")
}

fn wire(k: usize) -> Claim {
    Claim {
        namespace: "ns".into(),
        uid: uid(k),
        name: format!("c{k:02}"),
    }
}

/// The memory figures of a process, in KiB, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

impl Memory {
    fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        };
        Self {
            rss: field("VmRSS"),
            hwm: field("VmHWM"),
            anon: field("RssAnon"),
            file: field("RssFile"),
            threads: field("Threads"),
        }
    }

    fn row(&self, when: &str) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "| {when} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            mib(self.rss),
            mib(self.hwm),
            mib(self.anon),
            mib(self.file),
            self.threads
        );
    }
}

/// Nearest-rank percentile of unsorted samples.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn latency_row(what: &str, samples: &[Duration], per: usize) {
    let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    println!(
        "| {what} | {} | {:.2} | {:.2} | {:.2} |",
        samples.len(),
        ms(p50),
        ms(p99),
        ms(p50) / per as f64
    );
}

fn rounds_from_args() -> usize {
    // Cargo passes `--bench` to a harness-less bench; the first plain number is the round count.
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS)
}

/// The file system type under `path`, as `df` names it.
fn file_system(path: &Path) -> String {
    let output = Command::new("df").arg("--output=fstype").arg(path).output();
    match output {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap_or("unknown")
            .trim()
            .to_owned(),
        Err(_) => "unknown".to_owned(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds = rounds_from_args();
    let rig = Rig::start().await;
    let all: Vec<Claim> = (0..CLAIMS).map(wire).collect();
    println!(
        "prepare bench: {rounds} rounds, {CLAIMS} claims on one bus, daemon {} (pid {}), files on {} ({})",
        daemon_binary().display(),
        rig.pid(),
        rig.root.path().display(),
        file_system(rig.root.path())
    );

    // Let start-up work (slice publishing, the first health listing) settle before reading
    // the idle figure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = Memory::of(rig.pid());

    let mut empty = Vec::with_capacity(EMPTY_SAMPLES);
    for _ in 0..EMPTY_SAMPLES {
        empty.push(rig.prepare(&[]).await);
    }

    let (mut first, mut last, mut unprepare) = (Vec::new(), Vec::new(), Vec::new());
    let mut with_64 = None;
    let mut checkpoint_bytes = 0;
    for _ in 0..rounds {
        first.push(rig.prepare(&all[..1]).await);
        rig.prepare(&all[1..CLAIMS - 1]).await;
        last.push(rig.prepare(&all[CLAIMS - 1..]).await);
        if with_64.is_none() {
            with_64 = Some(Memory::of(rig.pid()));
            checkpoint_bytes = std::fs::metadata(rig.checkpoint()).unwrap().len();
        }
        unprepare.push(rig.unprepare(&all).await);
    }
    let mut batch = Vec::new();
    for _ in 0..rounds {
        batch.push(rig.prepare(&all).await);
        unprepare.push(rig.unprepare(&all).await);
    }
    assert_eq!(
        std::fs::read_dir(&rig.dirs.cdi).unwrap().count(),
        0,
        "CDI specs left behind after unprepare"
    );
    let end = Memory::of(rig.pid());
    assert!(
        rig.api.claim("ns", "c00").is_some(),
        "the API double lost a claim"
    );

    println!();
    println!("| measure | samples | p50 ms | p99 ms | p50 ms per claim |");
    println!("|---|---|---|---|---|");
    latency_row("empty request (floor)", &empty, 1);
    latency_row("1 claim, first on the bus", &first, 1);
    latency_row("1 claim, 64th on the bus", &last, 1);
    latency_row("64 claims in one request", &batch, CLAIMS);
    latency_row("unprepare 64 claims in one request", &unprepare, CLAIMS);

    let p50 = |s: &[Duration]| ms(percentile(s, 0.5));
    let p99 = |s: &[Duration]| ms(percentile(s, 0.99));
    println!();
    println!("| ratio | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| 64th / first | {:.2} | {:.2} |",
        p50(&last) / p50(&first),
        p99(&last) / p99(&first)
    );
    println!(
        "| 64 in one request / (64 x first) | {:.2} | {:.2} |",
        p50(&batch) / (CLAIMS as f64 * p50(&first)),
        p99(&batch) / (CLAIMS as f64 * p99(&first))
    );
    println!(
        "| first / empty request | {:.2} | {:.2} |",
        p50(&first) / p50(&empty),
        p99(&first) / p99(&empty)
    );
    println!("\ncheckpoint with {CLAIMS} claims: {checkpoint_bytes} bytes");

    println!();
    println!("| daemon memory | VmRSS MiB | VmHWM MiB | RssAnon MiB | RssFile MiB | threads |");
    println!("|---|---|---|---|---|---|");
    idle.row("idle after start");
    with_64.expect("no round ran").row("64 claims prepared");
    end.row("end (all unprepared)");
    let peak = end.hwm as f64 / 1024.0;
    println!(
        "\npeak resident memory {peak:.1} MiB: {} the 30 MiB target",
        if peak < 30.0 { "under" } else { "OVER" }
    );
    rig.stop();
}
