//! `can-dra-demo`: the local demo behind the README's main command.
//!
//! It runs the shipped software without a cluster, on the real kernel (a VM when the host kernel
//! lacks CAN): the real `can-dra-kubelet-plugin` binary against the API server **test double**
//! (standing in for kube-apiserver) and the kubelet **test double** (over the daemon's real
//! sockets), and the real `can-dra-cdi-hook` run the way a container runtime runs it. Three pods
//! share one bus with a physical controller stand-in; the demo shows, measured, who receives
//! which frames, what shaping does to one member, that a listen-only member cannot send, and that
//! nothing is left afterwards.
//!
//! Topology (every namespace is made by the demo and goes with it):
//!
//! ```text
//!   wire ns: ecu ──vxcan── node ns (the demo, the daemon): can0, the "physical" controller
//!                                  │ can-gw full mesh, set up by the daemon
//!            ┌─────────────────────┼─────────────────────┐
//!      host end of pod-a     host end of pod-b     host end of pod-c
//!            │vxcan                │vxcan (shaped)       │vxcan (listen-only)
//!      pod-a ns: can0        pod-b ns: can0        pod-c ns: can0
//! ```

mod cluster;
mod namespaces;
mod runtime;
mod snapshot;
mod traffic;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use can_dra_dataplane::access;
use can_dra_dataplane::link::{CanMtu, Links, VxcanSpec};
use can_dra_dataplane::netlink::RouteSocket;
use can_dra_dataplane::netns::Netns;
use can_dra_doubles::apiserver::ApiServer;
use can_dra_doubles::kubelet::{KubeletDouble, RegisteredPlugin};
use can_dra_proto::dra::v1::Claim;
use can_dra_testkit::daemon::{Daemon, DaemonArgs};
use clap::{Parser, Subcommand};
use nix::sys::signal::Signal;
use serde_json::Value;

use cluster::{CONTROLLER, DRIVER, NAMESPACE, NODE, PodClaim};
use namespaces::{DemoNetns, PodProcess};
use snapshot::KernelSnapshot;
use traffic::Seen;

/// The local can-dra demo (run as root on a kernel with CAN; `cargo xtask demo` takes care of it).
#[derive(Debug, Parser)]
#[command(name = "can-dra-demo", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// The `can-dra-kubelet-plugin` binary; by default the one next to this executable.
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// The `can-dra-cdi-hook` binary; by default the one next to this executable.
    #[arg(long)]
    hook: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// A pod's process: enter a network namespace of its own and live until stdin closes.
    #[command(hide = true)]
    Pod,
}

const ECU_ID: u16 = 0x100;
const POD_A_ID: u16 = 0x200;
const MONITOR_ID: u16 = 0x7ff;
/// How long the daemon may take to register. Natively it takes well under a second; in the VM
/// (an emulated CPU loading a debug build over 9p) 20 to 50 s were measured on a busy machine.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.role {
        Some(Role::Pod) => namespaces::pod_main(),
        None => run(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The binaries the demo runs: given, or next to the demo's own executable (as cargo builds them).
fn binary(given: Option<&PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("the demo's executable has no directory"))?
            .join(name),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build -p can-dra-kubelet-plugin) or pass its path",
            path.display()
        );
    }
    Ok(path)
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    // First, before any thread exists: every thread and child from here on lives in the node's
    // namespace, so nothing touches the namespace the demo was started in.
    namespaces::enter_node_namespace()?;
    let plugin = binary(cli.plugin.as_ref(), "can-dra-kubelet-plugin")?;
    let hook = binary(cli.hook.as_ref(), "can-dra-cdi-hook")?;
    let work = tempfile::Builder::new()
        .prefix("can-dra-demo-")
        .tempdir()
        .context("creating the demo's directory")?;
    let executor = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut daemon_log: Option<String> = None;
    let result = Demo::new(work.path(), &plugin, &hook, &executor).and_then(|mut demo| {
        let outcome = demo.show();
        if outcome.is_err() {
            daemon_log = demo.daemon.as_ref().map(|d| d.log_tail(30));
        }
        outcome
    });
    if let (Err(_), Some(log)) = (&result, daemon_log.filter(|log| !log.trim().is_empty())) {
        eprintln!("the daemon's log ends with:\n{log}");
    }
    result
}

/// One pod of the demo: its claim, and once started, its process.
struct Pod {
    claim: PodClaim,
    process: Option<PodProcess>,
    cdi_ids: Vec<String>,
}

impl Pod {
    fn name(&self) -> &'static str {
        self.claim.pod
    }

    fn netns(&self) -> anyhow::Result<Netns> {
        self.process
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.name()))?
            .netns()
    }

    fn kubelet_claim(&self) -> Claim {
        Claim {
            namespace: NAMESPACE.to_owned(),
            uid: self.claim.uid.to_owned(),
            name: self.claim.claim.to_owned(),
        }
    }
}

/// Everything the demo runs, torn down in reverse order when dropped (also on failure).
struct Demo<'a> {
    tokio: &'a tokio::runtime::Runtime,
    paths: DaemonArgs,
    daemon_log: PathBuf,
    plugin: PathBuf,
    // Field order is drop order: pods and the daemon go before the wire and the API server.
    pods: Vec<Pod>,
    daemon: Option<Daemon>,
    wire: DemoNetns,
    api: ApiServer,
    checks: Checks,
}

impl<'a> Demo<'a> {
    fn new(
        root: &Path,
        plugin: &Path,
        hook: &Path,
        tokio: &'a tokio::runtime::Runtime,
    ) -> anyhow::Result<Self> {
        println!(
            "can-dra local demo: the node daemon (can-dra-kubelet-plugin) and its CDI hook join three pods\n\
             to one CAN bus with a physical controller stand-in; no cluster\n"
        );
        step(
            "the node's CAN controller: can0, wired to an ECU (a vxcan whose far end sits in the wire namespace)",
        );
        let wire = DemoNetns::create("wire")?;
        Links::open()?
            .create_vxcan(
                &VxcanSpec::new(CONTROLLER, "ecu", CanMtu::Classic),
                &wire.open()?,
            )
            .context("creating the physical controller stand-in")?;

        step(
            "the API server: a TEST DOUBLE standing in for kube-apiserver (in-process, resource.k8s.io/v1 JSON)",
        );
        let claims = cluster::pod_claims();
        let api = tokio.block_on(cluster::start_api_server(&claims))?;
        println!(
            "    serving at {} with Node {NODE} and, as the scheduler would leave them, three allocated claims:",
            api.url()
        );
        for claim in &claims {
            println!(
                "    {NAMESPACE}/{} for {} on {}: {}",
                claim.claim, claim.pod, claim.device, claim.parameters
            );
        }

        let paths = DaemonArgs {
            node: NODE.to_owned(),
            driver: None,
            kubeconfig: root.join("kubeconfig"),
            config: root.join("node-config.yaml"),
            registrar_dir: root.join("kubelet/plugins_registry"),
            plugins_dir: root.join("kubelet/plugins"),
            cdi_dir: root.join("cdi"),
            hook: hook.to_path_buf(),
        };
        for dir in [&paths.registrar_dir, &paths.plugins_dir, &paths.cdi_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        api.write_kubeconfig(&paths.kubeconfig)?;
        std::fs::write(&paths.config, cluster::node_config_yaml())?;
        Ok(Self {
            tokio,
            paths,
            daemon_log: root.join("daemon.log"),
            plugin: plugin.to_path_buf(),
            pods: claims
                .into_iter()
                .map(|claim| Pod {
                    claim,
                    process: None,
                    cdi_ids: Vec::new(),
                })
                .collect(),
            daemon: None,
            wire,
            api,
            checks: Checks::default(),
        })
    }

    fn show(&mut self) -> anyhow::Result<()> {
        let baseline = KernelSnapshot::take()?;
        let kubelet = KubeletDouble::new(&self.paths.registrar_dir);
        let plugin = self.start_daemon(&kubelet)?;
        self.show_slices();
        self.prepare(&plugin, &baseline)?;
        self.start_pods()?;
        let attached = KernelSnapshot::take()?.added_since(&baseline);
        println!(
            "    node namespace now: {} member host ends, {} can-gw rules, qdiscs {:?}",
            attached.links.len(),
            attached.rules.len(),
            attached.qdiscs
        );
        self.traffic()?;
        self.unprepare(&plugin, &baseline)?;
        self.stop_daemon(&plugin)?;
        println!("\nsummary:");
        std::mem::take(&mut self.checks).finish()
    }

    fn start_daemon(&mut self, kubelet: &KubeletDouble) -> anyhow::Result<RegisteredPlugin> {
        step("the node daemon: the real can-dra-kubelet-plugin binary");
        println!(
            "    {} --node-name {NODE} --config {} --kubeconfig {} \\\n      --kubelet-registrar-dir {} --kubelet-plugins-dir {} --cdi-dir {} --hook-path {}",
            self.plugin.display(),
            self.paths.config.display(),
            self.paths.kubeconfig.display(),
            self.paths.registrar_dir.display(),
            self.paths.plugins_dir.display(),
            self.paths.cdi_dir.display(),
            self.paths.hook.display()
        );
        // The log is a file, read by people: no colour codes.
        let env = [("RUST_LOG", "info"), ("NO_COLOR", "1")];
        let daemon = self.daemon.insert(
            Daemon::spawn(&self.plugin, &self.paths, &env, &self.daemon_log)
                .context("starting the daemon")?,
        );
        let started = Instant::now();
        daemon
            .wait_for_socket(&self.paths.registrar_dir, REGISTRATION_TIMEOUT)
            .context("waiting for the daemon's registration socket")?;
        step(
            "the kubelet (a TEST DOUBLE, over the daemon's real sockets): GetInfo, NotifyRegistrationStatus",
        );
        // Like the kubelet's plugin watcher, try again when an attempt fails: under an emulated
        // CPU the first GetInfo can miss the kubelet's 1 s deadline.
        let plugin = loop {
            match self.tokio.block_on(kubelet.register_driver(DRIVER)) {
                Ok(plugin) => break plugin,
                Err(error) if started.elapsed() < REGISTRATION_TIMEOUT => {
                    println!("    registration attempt failed ({error}); trying again");
                    if let Some(status) = daemon.exited()? {
                        bail!("the daemon exited ({status})");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => return Err(error.into()),
            }
        };
        println!(
            "    registered {} after {:.1} s: endpoint {}, services {:?}, DRA {:?} chosen",
            plugin.info.name,
            started.elapsed().as_secs_f64(),
            plugin.info.endpoint,
            plugin.info.supported_versions,
            plugin.dra_version
        );
        self.checks.expect(
            plugin.info.name == DRIVER,
            format!("the daemon registered with the kubelet as {DRIVER}"),
        );
        Ok(plugin)
    }

    fn show_slices(&mut self) {
        step("the ResourceSlice the daemon published");
        let mut devices = Vec::new();
        for slice in self.api.slices() {
            let slice = serde_json::to_value(&slice).unwrap_or_default();
            println!(
                "    {} (driver {}, pool {}, generation {})",
                slice["metadata"]["name"].as_str().unwrap_or("?"),
                slice["spec"]["driver"].as_str().unwrap_or("?"),
                slice["spec"]["pool"]["name"].as_str().unwrap_or("?"),
                slice["spec"]["pool"]["generation"]
            );
            for device in slice["spec"]["devices"].as_array().into_iter().flatten() {
                let name = device["name"].as_str().unwrap_or("?").to_owned();
                println!("      {name}: {}", attributes(&device["attributes"]));
                devices.push(name);
            }
        }
        let wanted: Vec<String> = self.pods.iter().map(|p| p.claim.device.clone()).collect();
        self.checks.expect(
            wanted.iter().all(|d| devices.contains(d)),
            format!(
                "the daemon published the controller's slots from its --config ({} devices)",
                devices.len()
            ),
        );
    }

    fn prepare(
        &mut self,
        plugin: &RegisteredPlugin,
        baseline: &KernelSnapshot,
    ) -> anyhow::Result<()> {
        step("NodePrepareResources for the three claims (the kubelet double calls the daemon)");
        let claims = self.pods.iter().map(Pod::kubelet_claim).collect();
        let answer = self.tokio.block_on(plugin.prepare(claims))?;
        let mut all_ok = true;
        for pod in &mut self.pods {
            let Some(result) = answer.claims.get(pod.claim.uid) else {
                all_ok = false;
                continue;
            };
            pod.cdi_ids = result
                .devices
                .iter()
                .flat_map(|d| d.cdi_device_ids.clone())
                .collect();
            if result.error.is_empty() {
                println!("    {}: CDI devices {:?}", pod.claim.claim, pod.cdi_ids);
            } else {
                println!("    {}: ERROR {}", pod.claim.claim, result.error);
            }
            all_ok &= result.error.is_empty() && pod.cdi_ids.len() == 1;
        }
        self.checks.expect(
            all_ok,
            "prepare answered every claim without error, one CDI device each",
        );
        let mut ready = true;
        for pod in &self.pods {
            let status = self
                .api
                .claim(NAMESPACE, pod.claim.claim)
                .and_then(|c| serde_json::to_value(c).ok())
                .map(|c| c["status"]["devices"].clone())
                .unwrap_or_default();
            let device = status.as_array().and_then(|d| d.first()).cloned();
            let interface = device
                .as_ref()
                .and_then(|d| d["networkData"]["interfaceName"].as_str())
                .unwrap_or("-")
                .to_owned();
            let condition = device
                .as_ref()
                .and_then(|d| d["conditions"].as_array().cloned())
                .and_then(|c| c.into_iter().find(|c| c["type"] == "Ready"));
            let condition_text = condition
                .as_ref()
                .map_or("no Ready condition".to_owned(), |c| {
                    format!(
                        "Ready={} ({})",
                        c["status"].as_str().unwrap_or("?"),
                        c["message"].as_str().unwrap_or("")
                    )
                });
            println!(
                "    {} status written by the daemon: {condition_text}, interfaceName {interface}",
                pod.claim.claim
            );
            ready &= condition.is_some_and(|c| c["status"] == "True") && interface == "can0";
        }
        self.checks.expect(
            ready,
            "the daemon wrote Ready=True and interfaceName can0 into every claim's status",
        );
        let specs = runtime::spec_files(&self.paths.cdi_dir)?;
        println!("    CDI specs written: {}", names(&specs));
        self.checks.expect(
            KernelSnapshot::take()? == *baseline,
            "prepare alone changed nothing in the kernel (the pods do not exist yet)",
        );
        Ok(())
    }

    fn start_pods(&mut self) -> anyhow::Result<()> {
        step(
            "the pods start: the runtime runs each CDI device's createRuntime hook (the real can-dra-cdi-hook)",
        );
        let bundles = self.paths.cdi_dir.with_file_name("bundles");
        let mut attached = true;
        for pod in &mut self.pods {
            let process = pod.process.insert(PodProcess::start(pod.claim.pod)?);
            let pid = process.pid();
            for cdi_id in &pod.cdi_ids {
                let hooks = runtime::create_runtime_hooks(&self.paths.cdi_dir, cdi_id)?;
                if hooks.is_empty() {
                    println!(
                        "    {}: the CDI spec of {cdi_id} has no createRuntime hook",
                        pod.claim.pod
                    );
                    attached = false;
                }
                for hook in hooks {
                    let state = runtime::oci_state(
                        &format!("{}-ctr", pod.claim.pod),
                        pid,
                        &bundles.join(pod.claim.pod),
                    );
                    let run = runtime::run_hook(&hook, &state)?;
                    println!(
                        "    {} (pid {pid}): {} {} -> {} {}",
                        pod.claim.pod,
                        hook.path
                            .file_name()
                            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                        hook.args.get(1..).unwrap_or_default().join(" "),
                        if run.succeeded { "ok:" } else { "FAILED:" },
                        run.message
                    );
                    attached &= run.succeeded;
                }
            }
            let link = Links::open_in(&process.netns()?)?.by_name("can0")?;
            let up = link
                .as_ref()
                .is_some_and(|l| l.up && l.kind.as_deref() == Some("vxcan"));
            println!(
                "    {} now has can0 ({}), {}",
                pod.claim.pod,
                if up { "vxcan, up" } else { "MISSING or down" },
                pod.claim.role
            );
            attached &= up;
        }
        self.checks.expect(
            attached,
            "every hook attached its pod: can0 is a vxcan end, up, in each pod's namespace",
        );
        Ok(())
    }

    fn traffic(&mut self) -> anyhow::Result<()> {
        let namespaces = [
            ("ecu (wire)", self.wire.open()?, "ecu"),
            ("pod-a", self.pods[0].netns()?, "can0"),
            ("pod-b", self.pods[1].netns()?, "can0"),
            ("pod-c", self.pods[2].netns()?, "can0"),
        ];
        let checks = &mut self.checks;

        step("1. the ECU sends 100 frames (id 0x100), 10 ms apart");
        let (seen, sent) = exchange(&namespaces, 0, ECU_ID, 100, Duration::from_millis(10))?;
        let counts = report(&seen, ECU_ID, 0);
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
            counts[0] == 50 && counts[3] == 50 && (25..=50).contains(&counts[2]),
            format!(
                "every pod-a frame reached the ECU (through the physical controller) and pod-c once; pod-b got {} through its lossy member",
                counts[2]
            ),
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
        println!(
            "    (a 20 kbit/s bus carries at most 20000/135 = 148 worst-case 8-byte frames/s)"
        );
        println!(
            "    (a shaped member's queue overflows in a burst: like a slow bus, it loses what it cannot carry)"
        );

        step("the kernel's count of pod-c's blocked frames (the access filter on its host end)");
        let blocked = transmit_dropped(&namespaces[3].1)?;
        println!("    pod-c: {blocked} frames blocked at transmit");
        checks.expect(
            blocked == 20,
            format!("the kernel counted pod-c's blocked frames ({blocked} of 20)"),
        );
        Ok(())
    }

    fn unprepare(
        &mut self,
        plugin: &RegisteredPlugin,
        baseline: &KernelSnapshot,
    ) -> anyhow::Result<()> {
        step("NodeUnprepareResources for the three claims (the pods are still running)");
        let claims = self.pods.iter().map(Pod::kubelet_claim).collect();
        let answer = self.tokio.block_on(plugin.unprepare(claims))?;
        let errors: Vec<String> = answer
            .claims
            .iter()
            .filter(|(_, r)| !r.error.is_empty())
            .map(|(uid, r)| format!("{uid}: {}", r.error))
            .collect();
        self.checks.expect(
            errors.is_empty(),
            format!("unprepare answered every claim without error {errors:?}"),
        );
        let after = KernelSnapshot::take()?;
        let left = after.added_since(baseline);
        let gone = baseline.added_since(&after);
        println!(
            "    node namespace: links {:?}, can-gw rules {}, qdiscs {:?}",
            after.links,
            after.rules.len(),
            after.qdiscs
        );
        self.checks.expect(
            left.links.is_empty() && gone.links.is_empty(),
            format!(
                "no member link is left in the node namespace {:?}",
                left.links
            ),
        );
        self.checks.expect(
            left.rules.is_empty() && gone.rules.is_empty(),
            format!("no can-gw rule is left {:?}", left.rules),
        );
        self.checks.expect(
            left.qdiscs.is_empty() && gone.qdiscs.is_empty(),
            format!("no qdisc is left {:?}", left.qdiscs),
        );
        let mut in_pods = Vec::new();
        for pod in &self.pods {
            let links = Links::open_in(&pod.netns()?)?.list()?;
            in_pods.extend(
                links
                    .into_iter()
                    .filter(|l| l.name != "lo")
                    .map(|l| format!("{}: {}", pod.claim.pod, l.name)),
            );
        }
        self.checks.expect(
            in_pods.is_empty(),
            format!("the pods' can0 ends are gone {in_pods:?}"),
        );
        let specs = runtime::spec_files(&self.paths.cdi_dir)?;
        self.checks.expect(
            specs.is_empty(),
            format!("no CDI spec is left {}", names(&specs)),
        );
        let checkpoint_path = self.paths.plugins_dir.join(DRIVER).join("checkpoint.json");
        let checkpoint: Value = serde_json::from_str(
            &std::fs::read_to_string(&checkpoint_path)
                .with_context(|| format!("reading {}", checkpoint_path.display()))?,
        )?;
        let entries = checkpoint["claims"].as_object().map_or(0, |c| c.len());
        println!(
            "    checkpoint {}: {entries} claims",
            checkpoint_path.display()
        );
        self.checks
            .expect(entries == 0, "the checkpoint holds no claim any more");
        let statuses = self
            .pods
            .iter()
            .filter_map(|pod| self.api.claim(NAMESPACE, pod.claim.claim))
            .filter_map(|claim| claim.status.and_then(|s| s.devices))
            .filter(|devices| !devices.is_empty())
            .count();
        self.checks.expect(
            statuses == 0,
            "the daemon removed its entries from every claim's status",
        );
        Ok(())
    }

    fn stop_daemon(&mut self, plugin: &RegisteredPlugin) -> anyhow::Result<()> {
        step("SIGTERM to the daemon");
        let daemon = self
            .daemon
            .as_mut()
            .ok_or_else(|| anyhow!("the daemon is not running"))?;
        let started = Instant::now();
        let status = daemon.stop(Signal::SIGTERM, Duration::from_secs(20))?;
        let sockets = [
            plugin.registration_socket.clone(),
            PathBuf::from(&plugin.info.endpoint),
            self.paths.plugins_dir.join(DRIVER).join("hook.sock"),
        ];
        let left: Vec<String> = sockets
            .iter()
            .filter(|s| s.exists())
            .map(|s| s.display().to_string())
            .collect();
        println!(
            "    exited {status} after {:.2} s; sockets left: {left:?}",
            started.elapsed().as_secs_f64()
        );
        self.checks
            .expect(status.success(), "the daemon stopped cleanly on SIGTERM");
        self.checks.expect(
            left.is_empty(),
            "its registration, DRA and hook sockets are gone",
        );
        Ok(())
    }
}

/// `key=value` pairs of a device's attributes.
fn attributes(attributes: &Value) -> String {
    attributes
        .as_object()
        .into_iter()
        .flatten()
        .map(|(key, value)| {
            let value = value
                .as_object()
                .and_then(|v| v.values().next())
                .map_or_else(|| value.to_string(), Value::to_string);
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn names(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    format!("{names:?}")
}

/// Frames the access filter on the host end of the pod's `can0` dropped at transmit. The host
/// end is found from the pod's side (the vxcan peer index), not from the driver's naming.
fn transmit_dropped(pod: &Netns) -> anyhow::Result<u64> {
    let link = Links::open_in(pod)?
        .by_name("can0")?
        .ok_or_else(|| anyhow!("no can0 in {}", pod.label()))?;
    let host_end = link
        .peer_index
        .ok_or_else(|| anyhow!("can0 in {} reports no peer", pod.label()))?;
    let counters = access::counters(&mut RouteSocket::open()?, host_end)?;
    Ok(counters.transmit_dropped)
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
    namespaces: &[(&str, Netns, &str); 4],
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
