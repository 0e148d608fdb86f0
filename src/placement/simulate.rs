//! `buildkit-router simulate`: replays a workload through the real placement code.
//!
//! One workload (synthetic or a CSV trace) is replayed against each policy: random, round robin,
//! least loaded, buildx's kubernetes-driver ring hash, and ours ([`Placement::choose`], the code
//! the router runs) at several balance factors. Daemons have build slots (builds beyond them
//! wait, M/G/c-style) and a cache of bounded size with LRU eviction.
//!
//! Simulated daemons implement [`Node`], so every decision of the `ours` policy is made by the
//! router's own code; only time, arrivals and caches are modelled here.
//!
//! With `--keyless-share`, some projects' builds name nothing (plain `buildctl build`, buildx
//! outside git): our policy runs twice, keying them by their Dockerfile (the `content` key,
//! derived by the router's own code from a synthetic Dockerfile per project) and without
//! (`no-content`: such builds placed on load alone).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal, Zipf};

use super::dockerfile::{fingerprint, instructions};
use super::key::content_key;
use super::{AffinityKey, BuildTraits, Node, Placement, PlacementConfig, Reason};
use crate::queue::{self, Outcome, Queue, QueueConfig, TenantFrom};
use crate::wire::SolveInfo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Command-line arguments of `buildkit-router simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Replay this CSV trace (header `time,key,platform,duration,context_path`; seconds)
    /// instead of a synthetic workload.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Synthetic: number of projects.
    #[arg(long, default_value_t = 200)]
    pub projects: usize,
    /// Synthetic: Zipf exponent of project popularity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Synthetic: number of builds.
    #[arg(long, default_value_t = 20_000)]
    pub builds: usize,
    /// Synthetic: mean build duration, seconds (log-normal per project and per build).
    #[arg(long, default_value_t = 120.0)]
    pub mean_duration: f64,
    /// Synthetic: offered load as a fraction of the pool's slots (Poisson arrivals).
    #[arg(long, default_value_t = 0.7)]
    pub load: f64,
    /// Synthetic: share of projects that live in a few monorepos and are built from the
    /// repository root (`-f svc/x/Dockerfile .`): one context path for many projects.
    #[arg(long, default_value_t = 0.3)]
    pub monorepo_share: f64,
    /// Synthetic: number of such monorepos.
    #[arg(long, default_value_t = 3)]
    pub monorepos: usize,
    /// Synthetic: share of projects whose builds name nothing to key on (no `vcs:source`, image
    /// name or cache ref: plain `buildctl build`, CI jobs exporting a tarball, buildx outside
    /// git). Our policy then runs with the content key (the default key sources) and without
    /// (`no-content`).
    #[arg(long, default_value_t = 0.0)]
    pub keyless_share: f64,
    /// Synthetic: chance, per build of a keyless project, that its Dockerfile changed in a way
    /// that changes its content key (a new stage, another entrypoint; version bumps and RUN
    /// edits do not). 0.002: about one key change in the 300 or so commits between two
    /// releases of the measured projects (docs/placement.md).
    #[arg(long, default_value_t = 0.002)]
    pub content_churn: f64,
    /// Synthetic: share of projects built for linux/arm64 only (needs `--arm64-daemons`).
    #[arg(long, default_value_t = 0.0)]
    pub arm64_share: f64,
    /// Number of daemons.
    #[arg(long, default_value_t = 8)]
    pub daemons: usize,
    /// Of which this many build linux/arm64 only (the others linux/amd64).
    #[arg(long, default_value_t = 0)]
    pub arm64_daemons: usize,
    /// Builds a daemon runs at once; more wait for a slot.
    #[arg(long, default_value_t = 16)]
    pub slots: usize,
    /// Our policy's router cap (--max-builds-per-backend): builds past it wait in the router's
    /// queue (see --queue). Default: none, builds beyond --slots wait on their daemon.
    #[arg(long)]
    pub max_builds_per_backend: Option<usize>,
    /// With --max-builds-per-backend: `on`, builds wait in the router's queue (the real one,
    /// fair across the key owners); `off`, they overflow to the least loaded daemon and wait there.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = crate::queue::parse_switch, action = clap::ArgAction::Set)]
    pub queue: bool,
    /// The router queue's --queue-timeout: builds that waited this long fail.
    #[arg(long, value_parser = crate::duration::parse_duration, default_value = "30m")]
    pub queue_timeout: Duration,
    /// The router queue's --queue-max-skips (0: strict order, no home-first).
    #[arg(long, default_value_t = crate::queue::DEFAULT_MAX_SKIPS)]
    pub queue_max_skips: u32,
    /// Cache size per daemon, GiB (LRU eviction).
    #[arg(long, default_value_t = 60.0)]
    pub cache_gib: f64,
    /// Mean cache footprint of one project, GiB (log-normal).
    #[arg(long, default_value_t = 2.0)]
    pub project_gib: f64,
    /// Balance factors to run our policy with (`inf` = unbounded affinity).
    #[arg(long, value_delimiter = ',', default_value = "1.1,1.25,1.5,2,inf")]
    pub balance_factors: Vec<f64>,
    /// Hot key threshold of our policy (`inf`: no hot keys, every key under the balance factor).
    #[arg(long, default_value_t = super::DEFAULT_HOT_KEY_THRESHOLD, value_parser = super::parse_hot_key_threshold)]
    pub hot_key_threshold: f64,
    /// Seed of every random choice: same seed, same report.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print CSV instead of a table.
    #[arg(long)]
    pub csv: bool,
}

/// One project: what placement sees of it and what its cache costs.
#[derive(Debug, Clone)]
struct Project {
    traits: BuildTraits,
    context_path: String,
    bytes: u64,
    /// Its builds name nothing: keyed by content, or not at all.
    keyless: bool,
}

#[derive(Debug, Clone, Copy)]
struct Arrival {
    t: f64,
    project: usize,
    duration: f64,
    /// Which version of the project's Dockerfile (as far as its content key sees it).
    version: u32,
}

#[derive(Debug)]
struct Workload {
    projects: Vec<Project>,
    arrivals: Vec<Arrival>,
    /// Content keys of keyless projects by (project, Dockerfile version).
    content_keys: HashMap<(usize, u32), AffinityKey>,
    description: String,
}

impl Workload {
    /// What placement sees of one build: a keyless project's build carries its content key
    /// when `content` is on.
    fn traits(&self, project: usize, version: u32, content: bool) -> BuildTraits {
        let p = &self.projects[project];
        let mut traits = p.traits.clone();
        if content && p.keyless {
            traits.key = self.content_keys.get(&(project, version)).cloned();
        }
        traits
    }
}

/// A keyless project's Dockerfile at one version: what its content key is derived from. A new
/// version changes a stable instruction (the entrypoint), as the key changes measured on real
/// histories did; the rest of each commit's changes (base image tags, RUN steps) do not count.
fn synthetic_dockerfile(project: usize, version: u32) -> String {
    // Names in letters: the key derivation reads numbers as versions and ignores them.
    let letters = |mut n: usize| {
        let mut s = String::new();
        loop {
            s.push((b'a' + (n % 26) as u8) as char);
            n /= 26;
            if n == 0 {
                return s;
            }
        }
    };
    let (name, flag) = (letters(project), letters(version as usize));
    format!(
        "FROM golang:1.{} AS build\nWORKDIR /src/{name}\nCOPY . .\n\
         RUN go build -o /out/{name} ./...\nFROM alpine:3.{}\nCOPY --from=build /out/{name} /usr/bin/\n\
         ENTRYPOINT [\"/usr/bin/{name}\", \"--{flag}\"]\n",
        20 + project % 5,
        18 + project % 3
    )
}

/// A simulated daemon as placement sees it.
#[derive(Debug, Clone)]
struct SimNode {
    id: String,
    id_hash: u64,
    active: usize,
    platforms: Vec<String>,
}

impl Node for SimNode {
    fn identity(&self) -> &str {
        &self.id
    }
    fn active_builds(&self) -> usize {
        self.active
    }
    fn accepts_builds(&self) -> bool {
        true
    }
    fn capacity(&self) -> Option<usize> {
        None
    }
    fn supports_platform(&self, platform: &str) -> bool {
        self.platforms.iter().any(|p| p == platform)
    }
    fn platforms(&self) -> Vec<String> {
        self.platforms.clone()
    }
    fn identity_hash(&self) -> u64 {
        self.id_hash
    }
}

fn sim_nodes(args: &SimulateArgs, n: usize) -> Vec<SimNode> {
    (0..n)
        .map(|i| {
            let id = format!("buildkitd-{i}");
            // The arm64 daemons are the last ones of the base pool.
            let arm = i >= args.daemons.saturating_sub(args.arm64_daemons) && i < args.daemons;
            SimNode {
                id_hash: super::hash::hash_str(&id),
                id,
                active: 0,
                platforms: vec![if arm { "linux/arm64" } else { "linux/amd64" }.to_owned()],
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Policy {
    Random,
    RoundRobin,
    LeastLoaded,
    RingHash,
    Ours(f64),
    /// Ours with the `content` key source off: keyless builds are placed on load.
    OursNoContent(f64),
}

impl Policy {
    fn name(self) -> String {
        match self {
            Policy::Random => "random".into(),
            Policy::RoundRobin => "round-robin".into(),
            Policy::LeastLoaded => "least-loaded".into(),
            Policy::RingHash => "buildx-k8s-ring".into(),
            Policy::Ours(c) if c.is_infinite() => "ours c=inf".into(),
            Policy::Ours(c) => format!("ours c={c}"),
            Policy::OursNoContent(c) if c.is_infinite() => "ours c=inf no-content".into(),
            Policy::OursNoContent(c) => format!("ours c={c} no-content"),
        }
    }

    fn ours(self) -> Option<f64> {
        match self {
            Policy::Ours(c) | Policy::OursNoContent(c) => Some(c),
            _ => None,
        }
    }

    /// Whether keyless builds carry their content key under this policy.
    fn content(self) -> bool {
        !matches!(self, Policy::OursNoContent(_))
    }
}

/// A policy with its state, choosing among simulated daemons.
struct Chooser {
    policy: Policy,
    placement: Placement,
    rng: StdRng,
    rr: usize,
    ring: Vec<(u64, usize)>,
}

fn md5_u64(s: &str) -> u64 {
    let d = Md5::digest(s.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("md5 is 16 bytes"))
}

impl Chooser {
    fn new(policy: Policy, nodes: &[SimNode], seed: u64, args: &SimulateArgs) -> Self {
        let c = policy.ours().unwrap_or(1.25);
        // buildx's sticky pod chooser: one MD5 point per pod name on a ring.
        let mut ring: Vec<(u64, usize)> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (md5_u64(&n.id), i))
            .collect();
        ring.sort_unstable();
        Self {
            policy,
            placement: Placement::new(PlacementConfig {
                balance_factor: c,
                hot_key_threshold: args.hot_key_threshold,
                max_builds_per_backend: args.max_builds_per_backend,
                ..PlacementConfig::default()
            }),
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            rr: 0,
            ring,
        }
    }

    fn choose(
        &mut self,
        nodes: &[SimNode],
        traits: &BuildTraits,
        context_path: &str,
    ) -> (usize, Option<Reason>) {
        let capable = |n: &SimNode| traits.platforms.iter().all(|pl| n.supports_platform(pl));
        match self.policy {
            Policy::Ours(_) | Policy::OursNoContent(_) => {
                let traits = BuildTraits {
                    nonce: self.rng.random(),
                    ..traits.clone()
                };
                let c = self
                    .placement
                    .choose(nodes, &traits)
                    .expect("a capable daemon exists");
                (c.index, Some(c.reason))
            }
            Policy::Random => {
                let m = nodes.iter().filter(|n| capable(n)).count();
                let k = self.rng.random_range(0..m);
                (
                    nodes
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| capable(n))
                        .nth(k)
                        .unwrap()
                        .0,
                    None,
                )
            }
            Policy::RoundRobin => loop {
                let i = self.rr % nodes.len();
                self.rr += 1;
                if capable(&nodes[i]) {
                    break (i, None);
                }
            },
            Policy::LeastLoaded => {
                let min = nodes
                    .iter()
                    .filter(|n| capable(n))
                    .map(|n| n.active)
                    .min()
                    .unwrap();
                let ties: Vec<usize> = (0..nodes.len())
                    .filter(|&i| capable(&nodes[i]) && nodes[i].active == min)
                    .collect();
                (ties[self.rng.random_range(0..ties.len())], None)
            }
            Policy::RingHash => {
                let h = md5_u64(context_path);
                let start = self.ring.partition_point(|&(point, _)| point <= h);
                let i = (0..self.ring.len())
                    .map(|k| self.ring[(start + k) % self.ring.len()].1)
                    .find(|&i| capable(&nodes[i]))
                    .unwrap();
                (i, None)
            }
        }
    }
}

/// A daemon's cache: projects by last use, evicted oldest first when over capacity.
struct Lru {
    capacity: u64,
    used: u64,
    tick: u64,
    last_use: Vec<Option<u64>>,
    by_age: BTreeMap<u64, usize>,
}

impl Lru {
    fn new(capacity: u64, projects: usize) -> Self {
        Self {
            capacity,
            used: 0,
            tick: 0,
            last_use: vec![None; projects],
            by_age: BTreeMap::new(),
        }
    }
}

/// What one policy did with the workload.
#[derive(Debug, Clone)]
struct Report {
    policy: String,
    hit_rate: f64,
    load_max_over_mean: f64,
    peak_active: usize,
    wait_p50: f64,
    wait_p90: f64,
    wait_p99: f64,
    wait_max: f64,
    moved_add: f64,
    moved_remove: f64,
    spill_share: f64,
    timeouts: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The router's admission queue during a replay of our policy with a capacity: the real
/// [`Queue`], fed simulated time.
struct RouterQueue {
    queue: Queue<usize>,
    /// Time zero of the replay.
    t0: Instant,
}

impl RouterQueue {
    fn at(&self, t: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(t)
    }
    fn secs(&self, i: Instant) -> f64 {
        i.saturating_duration_since(self.t0).as_secs_f64()
    }
}

/// The pool during one replay: daemons, their slots and queues, caches and load integrals.
struct Sim {
    nodes: Vec<SimNode>,
    slots: usize,
    running: Vec<usize>,
    queues: Vec<VecDeque<(f64, f64)>>,
    caches: Vec<Lru>,
    /// Integral of active builds over time, per daemon, up to `last`.
    integral: Vec<f64>,
    last: Vec<f64>,
    /// Completions: (time in ns, daemon). Integer time keeps the heap's order total.
    done: BinaryHeap<Reverse<(u64, usize)>>,
    /// Time from arrival to a slot on a daemon: in the router's queue, then the daemon's.
    waits: Vec<f64>,
    now: f64,
    peak: usize,
    hits: usize,
    spills: usize,
    timeouts: usize,
    /// Our policy with a capacity and the queue on.
    router: Option<RouterQueue>,
    /// Cache footprint of each project.
    sizes: Vec<u64>,
}

fn ns(t: f64) -> u64 {
    (t * 1e9) as u64
}

impl Sim {
    fn set_active(&mut self, d: usize, t: f64, active: usize) {
        self.integral[d] += self.nodes[d].active as f64 * (t - self.last[d]);
        self.last[d] = t;
        self.nodes[d].active = active;
        self.peak = self.peak.max(active);
    }

    /// Runs completions and queue deadlines up to `until` (ns); a freed slot serves the
    /// router's queue at once.
    fn run_until(&mut self, until: u64, w: &Workload, placement: &Placement) {
        loop {
            let done = self.done.peek().map(|&Reverse((t_ns, _))| t_ns);
            let deadline = self
                .router
                .as_ref()
                .and_then(|r| r.queue.next_deadline().map(|d| (d, ns(r.secs(d)))));
            match (done, deadline) {
                (Some(t_ns), dl) if t_ns <= until && dl.is_none_or(|(_, d)| t_ns <= d) => {
                    let Some(Reverse((t_ns, d))) = self.done.pop() else {
                        unreachable!("peeked")
                    };
                    self.complete(t_ns, d);
                    if let Some(r) = &self.router {
                        let now = r.at(t_ns as f64 / 1e9);
                        self.dispatch(now, w, placement);
                    }
                }
                (_, Some((at, d))) if d <= until => {
                    self.now = d as f64 / 1e9;
                    self.dispatch(at, w, placement);
                }
                _ => return,
            }
        }
    }

    fn complete(&mut self, t_ns: u64, d: usize) {
        let t = t_ns as f64 / 1e9;
        self.now = t;
        self.set_active(d, t, self.nodes[d].active - 1);
        self.running[d] -= 1;
        if let Some((arrived, dur)) = self.queues[d].pop_front() {
            self.waits.push(t - arrived);
            self.running[d] += 1;
            self.done.push(Reverse((ns(t + dur), d)));
        }
    }

    /// Serves the router's queue: starts what it admits, counts what timed out.
    fn dispatch(&mut self, now: Instant, w: &Workload, placement: &Placement) {
        let Some(r) = &mut self.router else { return };
        let t = r.secs(now);
        for outcome in r.queue.dispatch(now, placement, &self.nodes) {
            match outcome {
                Outcome::Admitted {
                    payload,
                    choice,
                    lease,
                    ..
                } => {
                    // No tenant cap here: the tenant's count does not matter.
                    if let Some(r) = &mut self.router {
                        r.queue.finish(lease);
                    }
                    let a = w.arrivals[payload];
                    self.place(w, &a, choice.index, Some(choice.reason));
                    self.start(choice.index, t, &a);
                }
                Outcome::TimedOut(timed_out) => {
                    self.timeouts += 1;
                    self.waits.push(timed_out.waited.as_secs_f64());
                }
                Outcome::Rejected { .. } => {
                    unreachable!("the workload only has buildable platforms")
                }
            }
        }
    }

    /// Counts a placement's cache hit and spill.
    fn place(&mut self, w: &Workload, a: &Arrival, d: usize, reason: Option<Reason>) {
        if reason == Some(Reason::Spill) {
            self.spills += 1;
        }
        let project = &w.projects[a.project];
        if self.caches[d].touch(a.project, project.bytes, &self.sizes) {
            self.hits += 1;
        }
    }

    /// Starts `a` on daemon `d` at `t`: on a free slot, else in the daemon's own queue.
    fn start(&mut self, d: usize, t: f64, a: &Arrival) {
        self.set_active(d, t, self.nodes[d].active + 1);
        if self.running[d] < self.slots {
            self.running[d] += 1;
            self.waits.push(t - a.t);
            self.done.push(Reverse((ns(t + a.duration), d)));
        } else {
            self.queues[d].push_back((a.t, a.duration));
        }
    }
}

fn replay(args: &SimulateArgs, w: &Workload, policy: Policy) -> Report {
    let nodes = sim_nodes(args, args.daemons);
    let n = nodes.len();
    let mut chooser = Chooser::new(policy, &nodes, args.seed, args);
    let cache_bytes = (args.cache_gib * GIB) as u64;
    let queueing = policy.ours().is_some() && args.max_builds_per_backend.is_some() && args.queue;
    let mut sim = Sim {
        nodes,
        slots: args.slots,
        running: vec![0; n],
        queues: vec![VecDeque::new(); n],
        caches: (0..n)
            .map(|_| Lru::new(cache_bytes, w.projects.len()))
            .collect(),
        integral: vec![0.0; n],
        last: vec![0.0; n],
        done: BinaryHeap::new(),
        waits: Vec::with_capacity(w.arrivals.len()),
        now: 0.0,
        peak: 0,
        hits: 0,
        spills: 0,
        timeouts: 0,
        router: queueing.then(|| RouterQueue {
            queue: Queue::new(QueueConfig {
                timeout: args.queue_timeout,
                max_skips: args.queue_max_skips,
                ..QueueConfig::default()
            }),
            t0: Instant::now(),
        }),
        sizes: w.projects.iter().map(|p| p.bytes).collect(),
    };
    for (i, a) in w.arrivals.iter().enumerate() {
        sim.run_until(ns(a.t), w, &chooser.placement);
        sim.now = a.t;
        let project = &w.projects[a.project];
        let traits = w.traits(a.project, a.version, policy.content());
        if let Some(r) = &mut sim.router {
            let traits = BuildTraits {
                nonce: chooser.rng.random(),
                ..traits
            };
            let tenant =
                queue::tenant_of(TenantFrom::KeyOwner, None, traits.key.as_ref()).to_owned();
            let now = r.at(a.t);
            r.queue.push(now, &tenant, traits, i);
            sim.dispatch(now, w, &chooser.placement);
            continue;
        }
        let (d, reason) = chooser.choose(&sim.nodes, &traits, &project.context_path);
        sim.place(w, a, d, reason);
        sim.start(d, a.t, a);
    }
    sim.run_until(u64::MAX, w, &chooser.placement);
    let end = sim.now.max(1e-9);
    for d in 0..n {
        sim.set_active(d, end, sim.nodes[d].active);
    }
    let avg: Vec<f64> = sim.integral.iter().map(|i| i / end).collect();
    let mean = avg.iter().sum::<f64>() / n as f64;
    let max = avg.iter().cloned().fold(0.0, f64::max);
    sim.waits.sort_unstable_by(f64::total_cmp);
    let (moved_add, moved_remove) = keys_moved(args, w, policy);
    let builds = w.arrivals.len().max(1) as f64;
    Report {
        policy: policy.name(),
        hit_rate: sim.hits as f64 / builds,
        load_max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
        peak_active: sim.peak,
        wait_p50: percentile(&sim.waits, 0.50),
        wait_p90: percentile(&sim.waits, 0.90),
        wait_p99: percentile(&sim.waits, 0.99),
        wait_max: sim.waits.last().copied().unwrap_or(0.0),
        moved_add,
        moved_remove,
        spill_share: sim.spills as f64 / builds,
        timeouts: sim.timeouts,
    }
}

impl Lru {
    /// Uses project `p`'s cache: true if it was there. Either way it is there afterwards.
    fn touch(&mut self, p: usize, bytes: u64, sizes: &[u64]) -> bool {
        self.tick += 1;
        if let Some(t) = self.last_use[p].take() {
            self.by_age.remove(&t);
            self.last_use[p] = Some(self.tick);
            self.by_age.insert(self.tick, p);
            return true;
        }
        if bytes > self.capacity {
            return false;
        }
        while self.used + bytes > self.capacity {
            let (_, old) = self
                .by_age
                .pop_first()
                .expect("over capacity means entries");
            self.last_use[old] = None;
            self.used -= sizes[old];
        }
        self.used += bytes;
        self.last_use[p] = Some(self.tick);
        self.by_age.insert(self.tick, p);
        false
    }
}

/// Share of projects whose daemon (on an idle pool) changes when a daemon is added, and when
/// the last one is removed (a StatefulSet scales down from its highest ordinal).
fn keys_moved(args: &SimulateArgs, w: &Workload, policy: Policy) -> (f64, f64) {
    let place_all = |n: usize| -> Vec<String> {
        let nodes = sim_nodes(args, n);
        let mut chooser = Chooser::new(policy, &nodes, args.seed ^ n as u64, args);
        w.projects
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if !nodes
                    .iter()
                    .any(|nd| p.traits.platforms.iter().all(|pl| nd.supports_platform(pl)))
                {
                    return String::new();
                }
                let traits = w.traits(i, 0, policy.content());
                nodes[chooser.choose(&nodes, &traits, &p.context_path).0]
                    .id
                    .clone()
            })
            .collect()
    };
    let base = place_all(args.daemons);
    let frac = |other: Vec<String>| {
        let moved = base.iter().zip(&other).filter(|(a, b)| a != b).count();
        moved as f64 / base.len().max(1) as f64
    };
    let add = frac(place_all(args.daemons + 1));
    let remove = if args.daemons > 1 {
        frac(place_all(args.daemons - 1))
    } else {
        1.0
    };
    (add, remove)
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn traits_of(placement: &Placement, attrs: Vec<(&str, &str)>) -> BuildTraits {
    let solve = SolveInfo {
        frontend_attrs: attrs,
        ..SolveInfo::default()
    };
    // The router's own key derivation, from the attrs buildx would send.
    placement.traits_for_solve(&solve)
}

fn synthetic(args: &SimulateArgs) -> Result<Workload, BoxError> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let placement = Placement::default();
    let size = LogNormal::from_mean_cv(args.project_gib * GIB, 0.8)?;
    let project_dur = LogNormal::from_mean_cv(args.mean_duration, 0.5)?;
    let mut project_means = Vec::new();
    let mut projects = Vec::new();
    for i in 0..args.projects {
        // Drawn only when asked for, so that other runs repeat their seeds' workloads exactly.
        let keyless =
            args.keyless_share > 0.0 && rng.random_bool(args.keyless_share.clamp(0.0, 1.0));
        let mono = args.monorepos > 0 && rng.random_bool(args.monorepo_share.clamp(0.0, 1.0));
        let arm = args.arm64_daemons > 0 && rng.random_bool(args.arm64_share.clamp(0.0, 1.0));
        let (repo, filename, ctx_path) = if mono {
            let m = rng.random_range(0..args.monorepos);
            (
                format!("https://git.example.com/org/mono{m}.git"),
                format!("services/svc{i}/Dockerfile"),
                format!("/builds/org/mono{m}"),
            )
        } else {
            (
                format!("git@git.example.com:org/project{i}.git"),
                "Dockerfile".to_owned(),
                format!("/builds/org/project{i}"),
            )
        };
        let platform = if arm { "linux/arm64" } else { "linux/amd64" };
        let mut attrs = vec![("filename", filename.as_str()), ("platform", platform)];
        if !keyless {
            attrs.push(("vcs:source", &repo));
        }
        let traits = traits_of(&placement, attrs);
        projects.push(Project {
            traits,
            context_path: ctx_path,
            bytes: size.sample(&mut rng) as u64,
            keyless,
        });
        project_means.push(project_dur.sample(&mut rng));
    }
    let zipf = Zipf::new(args.projects as f64, args.zipf)?;
    let jitter = LogNormal::from_mean_cv(1.0, 0.3)?;
    // Mean duration of a build, popularity-weighted, so the offered load comes out right.
    let mut draws = Vec::with_capacity(args.builds);
    let mut busy = 0.0;
    let mut versions = vec![0u32; args.projects];
    let mut content_keys = HashMap::new();
    for _ in 0..args.builds {
        let p = zipf.sample(&mut rng) as usize - 1;
        let d = project_means[p] * jitter.sample(&mut rng);
        busy += d;
        let mut version = versions[p];
        if projects[p].keyless {
            if args.content_churn > 0.0 && rng.random_bool(args.content_churn.clamp(0.0, 1.0)) {
                versions[p] += 1;
                version = versions[p];
            }
            content_keys.entry((p, version)).or_insert_with(|| {
                let text = synthetic_dockerfile(p, version);
                content_key(
                    &fingerprint(&instructions(&text)),
                    "",
                    &projects[p].traits.platforms,
                )
            });
        }
        draws.push((p, d, version));
    }
    // Version 0 of every keyless project (where `keys_moved` places them).
    for (p, project) in projects.iter().enumerate().filter(|(_, p)| p.keyless) {
        content_keys.entry((p, 0)).or_insert_with(|| {
            content_key(
                &fingerprint(&instructions(&synthetic_dockerfile(p, 0))),
                "",
                &project.traits.platforms,
            )
        });
    }
    let keyless = projects.iter().filter(|p| p.keyless).count();
    let mean_d = busy / args.builds.max(1) as f64;
    let rate = args.load * (args.daemons * args.slots) as f64 / mean_d;
    let gaps = Exp::new(rate)?;
    let mut t = 0.0;
    let arrivals = draws
        .into_iter()
        .map(|(project, duration, version)| {
            t += gaps.sample(&mut rng);
            Arrival {
                t,
                project,
                duration,
                version,
            }
        })
        .collect();
    let keyless_note = if keyless > 0 {
        format!(
            ", {keyless} keyless (content key churn {} per build)",
            args.content_churn
        )
    } else {
        String::new()
    };
    Ok(Workload {
        projects,
        arrivals,
        content_keys,
        description: format!(
            "synthetic: {} projects (Zipf s={}, {:.0}% in {} monorepos{keyless_note}), {} builds, mean {:.0} s, \
             load {:.0}% of {} daemons x {} slots, cache {} GiB/daemon, project {} GiB mean, seed {}",
            args.projects,
            args.zipf,
            args.monorepo_share * 100.0,
            args.monorepos,
            args.builds,
            mean_d,
            args.load * 100.0,
            args.daemons,
            args.slots,
            args.cache_gib,
            args.project_gib,
            args.seed
        ),
    })
}

fn load_trace(args: &SimulateArgs, path: &std::path::Path) -> Result<Workload, BoxError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let placement = Placement::default();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let size = LogNormal::from_mean_cv(args.project_gib * GIB, 0.8)?;
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut projects = Vec::new();
    let mut arrivals = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (lineno == 0 && line.starts_with("time")) {
            continue;
        }
        let f: Vec<&str> = line.splitn(5, ',').map(str::trim).collect();
        let [t, key, platform, duration, context] = f[..] else {
            return Err(format!(
                "{}:{}: expected time,key,platform,duration,context_path",
                path.display(),
                lineno + 1
            )
            .into());
        };
        let parse = |s: &str, what: &str| -> Result<f64, BoxError> {
            s.parse::<f64>()
                .map_err(|e| format!("{}:{}: {what} {s:?}: {e}", path.display(), lineno + 1).into())
        };
        let (t, duration) = (parse(t, "time")?, parse(duration, "duration")?);
        let id = format!("{key}\u{0}{platform}");
        let project = *by_key.entry(id).or_insert_with(|| {
            let mut attrs = vec![("platform", platform)];
            if !key.is_empty() {
                attrs.push(("build-arg:BUILDKIT_ROUTER_KEY", key));
            }
            projects.push(Project {
                traits: traits_of(&placement, attrs),
                context_path: context.to_owned(),
                bytes: size.sample(&mut rng) as u64,
                keyless: false,
            });
            projects.len() - 1
        });
        arrivals.push(Arrival {
            t,
            project,
            duration,
            version: 0,
        });
    }
    arrivals.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(Workload {
        content_keys: HashMap::new(),
        description: format!(
            "trace {}: {} builds of {} keys on {} daemons x {} slots, cache {} GiB/daemon",
            path.display(),
            arrivals.len(),
            projects.len(),
            args.daemons,
            args.slots,
            args.cache_gib
        ),
        projects,
        arrivals,
    })
}

/// Runs the simulation and prints its report.
pub fn run(args: SimulateArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    print!("{}", render(&args)?);
    Ok(())
}

/// The report of a whole run, as printed.
pub fn render(args: &SimulateArgs) -> Result<String, BoxError> {
    if args.daemons == 0 || args.slots == 0 {
        return Err("--daemons and --slots must be at least 1".into());
    }
    if args.arm64_daemons >= args.daemons && args.arm64_share < 1.0 {
        return Err("--arm64-daemons must leave at least one linux/amd64 daemon".into());
    }
    let w = match &args.trace {
        Some(path) => load_trace(args, path)?,
        None => synthetic(args)?,
    };
    let mut policies = vec![
        Policy::Random,
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::RingHash,
    ];
    let keyless = w.projects.iter().any(|p| p.keyless);
    for &c in &args.balance_factors {
        policies.push(Policy::Ours(c));
        if keyless {
            policies.push(Policy::OursNoContent(c));
        }
    }
    let reports: Vec<Report> = policies.iter().map(|&p| replay(args, &w, p)).collect();
    // Best hit rate without load limits: the unbounded policies (ring hash, ours c=inf).
    let best = policies
        .iter()
        .zip(&reports)
        .filter(|(p, _)| {
            matches!(p, Policy::RingHash) || matches!(p, Policy::Ours(c) if c.is_infinite())
        })
        .map(|(_, r)| r.hit_rate)
        .fold(0.0, f64::max);
    let rel = |r: &Report| if best > 0.0 { r.hit_rate / best } else { 0.0 };
    let mut out = String::new();
    if args.csv {
        out.push_str("policy,hit_rate,hit_vs_unbounded,load_max_over_mean,peak_active,wait_p50_s,wait_p90_s,wait_p99_s,wait_max_s,moved_on_add,moved_on_remove,spill_share,timeouts\n");
        for r in &reports {
            let _ = writeln!(
                out,
                "{},{:.4},{:.4},{:.4},{},{:.2},{:.2},{:.2},{:.2},{:.4},{:.4},{:.4},{}",
                r.policy,
                r.hit_rate,
                rel(r),
                r.load_max_over_mean,
                r.peak_active,
                r.wait_p50,
                r.wait_p90,
                r.wait_p99,
                r.wait_max,
                r.moved_add,
                r.moved_remove,
                r.spill_share,
                r.timeouts
            );
        }
        return Ok(out);
    }
    let _ = writeln!(out, "{}", w.description);
    if let Some(cap) = args.max_builds_per_backend {
        let _ = writeln!(
            out,
            "ours: at most {cap} builds per daemon, {}",
            if args.queue {
                format!(
                    "further builds wait in the router's queue (timeout {})",
                    queue::HumanDuration(args.queue_timeout)
                )
            } else {
                "further builds overflow to the least loaded daemon (--queue off)".to_owned()
            }
        );
    }
    let width = reports
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(0)
        .max(16);
    let _ = writeln!(
        out,
        "{:<width$} {:>6} {:>8} {:>8} {:>5} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>6} {:>5}",
        "policy",
        "hit",
        "hit/best",
        "max/mean",
        "peak",
        "wait p50",
        "p90",
        "p99",
        "max",
        "moved+1",
        "moved-1",
        "spill",
        "t/o"
    );
    let secs = |x: f64| format!("{x:.1}s");
    for r in &reports {
        let _ = writeln!(
            out,
            "{:<width$} {:>6.3} {:>8.3} {:>8.3} {:>5} {:>8} {:>8} {:>8} {:>8} {:>7.3} {:>7.3} {:>6.3} {:>5}",
            r.policy,
            r.hit_rate,
            rel(r),
            r.load_max_over_mean,
            r.peak_active,
            secs(r.wait_p50),
            secs(r.wait_p90),
            secs(r.wait_p99),
            secs(r.wait_max),
            r.moved_add,
            r.moved_remove,
            r.spill_share,
            r.timeouts
        );
    }
    let _ = writeln!(
        out,
        "hit: share of builds whose daemon held the project's cache; hit/best: vs the best unbounded \
         policy; max/mean: busiest daemon's time-averaged active builds over the pool mean; peak: most \
         active builds on one daemon at once; wait: from arrival to a build slot (in the router's \
         queue, then the daemon's); moved+1/-1: share of projects whose daemon changes when a \
         daemon is added/removed; spill: builds placed past their home; t/o: builds that timed out \
         in the router's queue."
    );
    Ok(out)
}
