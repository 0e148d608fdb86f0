//! Choosing a backend for a new build. Pure functions over a snapshot of backends; no I/O.
//!
//! The router asks [`Placement::traits_for_solve`] (or `traits_for_session`) what a build needs,
//! then [`Placement::choose`] which backend of a snapshot gets it. The same code drives
//! `buildkit-router simulate`. Keys come from [`key`]; the `content` key from a Dockerfile's
//! [`dockerfile::fingerprint`], once `crate::content` has read the file through the client's
//! session ([`Placement::content_wanted`] says when).
//!
//! Keyed builds: rendezvous (highest random weight) ranking of key x backend identity, bounded
//! load (a backend is eligible below ceil(c * (active + 1) / ready) and its hard capacity), first
//! eligible wins. Hot keys (a recent share of keyed builds above `hot_key_threshold / ready`, see
//! [`hot`]) are held to the mean, ceil((active + 1) / ready), so that they take the spills and the
//! rarely built keys sharing their home stay home. Keyless builds: power of two choices.
//! Internal probes: least loaded.
//!
//! Two callers share this code: the router (over a snapshot of the live pool, where [`Node`] is
//! `pool::Backend`) and `simulate` (over simulated daemons). Keep decisions a function of the
//! snapshot, the traits and the hot-key estimate only, so that both see the same behaviour.

pub mod dockerfile;
pub mod hash;
pub mod hot;
pub mod key;
pub mod metrics;
pub mod simulate;

pub use key::{normalize_git_url, AffinityKey, KeySource};
pub use metrics::PlacementMetrics;

use crate::wire::SolveInfo;

/// What placement needs to know about one backend.
pub trait Node {
    /// Stable identity (pod name where known, else address): the rendezvous hash input.
    fn identity(&self) -> &str;
    /// Builds this router is running on the backend now.
    fn active_builds(&self) -> usize;
    /// Ready and not draining: may take new builds.
    fn accepts_builds(&self) -> bool;
    /// Hard capacity (`--max-builds-per-backend`), if any.
    fn capacity(&self) -> Option<usize>;
    /// Whether the backend's workers can build `platform` (`os/arch[/variant]`). A backend whose
    /// platforms are not known yet accepts every platform.
    fn supports_platform(&self, platform: &str) -> bool;
    /// The platforms the backend's workers support, for error messages.
    fn platforms(&self) -> Vec<String>;
    /// `hash::hash_str(self.identity())`. Override with a cached value to save the hashing of
    /// the identity on every decision.
    fn identity_hash(&self) -> u64 {
        hash::hash_str(self.identity())
    }
    /// Builds the daemon itself reports running, started by any router replica
    /// (`ListenBuildHistory{ActiveOnly: true}`); `None` while unknown.
    fn reported_builds(&self) -> Option<usize> {
        None
    }
    /// The load admission counts against capacity: the larger of the builds this router started
    /// and the builds the daemon reports (see `crate::queue` for the race this leaves).
    fn load(&self) -> usize {
        self.active_builds()
            .max(self.reported_builds().unwrap_or(0))
    }
}

fn parse_weight(s: &str) -> Result<(String, f64), String> {
    let (name, w) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected IDENTITY=WEIGHT, got {s:?}"))?;
    let w: f64 = w.parse().map_err(|e| format!("weight {w:?}: {e}"))?;
    if !(w.is_finite() && w > 0.0) || name.is_empty() {
        return Err(format!(
            "expected IDENTITY=WEIGHT with a positive weight, got {s:?}"
        ));
    }
    Ok((name.to_owned(), w))
}

fn parse_hot_key_threshold(s: &str) -> Result<f64, String> {
    let t: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if t > 0.0 {
        Ok(t)
    } else {
        Err(format!(
            "hot key threshold must be positive (or inf), got {s}"
        ))
    }
}

fn parse_balance_factor(s: &str) -> Result<f64, String> {
    let c: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if c >= 1.0 {
        Ok(c)
    } else {
        Err(format!(
            "balance factor must be at least 1.0 (or inf), got {s}"
        ))
    }
}

/// Placement flags (flattened into the router's command line).
#[derive(Debug, Clone, clap::Args)]
pub struct PlacementArgs {
    /// Cache affinity tolerance: a backend takes a keyed build while its load is below
    /// ceil(c * (active + 1) / ready backends). `inf` disables the bound.
    #[arg(long, default_value_t = 1.25, value_parser = parse_balance_factor, env = "BUILDKIT_ROUTER_BALANCE_FACTOR")]
    pub balance_factor: f64,
    /// A key whose share of recent keyed builds exceeds this fraction of one backend's share
    /// (threshold / ready backends) is hot: it is placed under the mean load,
    /// ceil((active + 1) / ready), leaving the balance factor's headroom to rarely built keys.
    /// `inf` disables.
    #[arg(long, default_value_t = 0.3, value_parser = parse_hot_key_threshold, env = "BUILDKIT_ROUTER_HOT_KEY_THRESHOLD")]
    pub hot_key_threshold: f64,
    /// Most builds one backend runs at once. With --queue on, a real cap: further builds wait in
    /// the router. Default with --queue on: 4, matching --target-builds-per-backend. buildkitd
    /// runs as many steps at once as it has CPUs (max-parallelism) and a pod is usually given a
    /// few cores, so builds past about 4 share the same cores and memory and all run slower; they
    /// are better off waiting for a pod the autoscaler adds. Raise it with the pod's CPU limit.
    /// With --queue off: unlimited by default, and a full pool overflows to its least loaded.
    #[arg(long, env = "BUILDKIT_ROUTER_MAX_BUILDS_PER_BACKEND")]
    pub max_builds_per_backend: Option<usize>,
    /// Where a build's cache-affinity key comes from, first match wins.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "explicit,vcs,image,cache,content,session",
        env = "BUILDKIT_ROUTER_AFFINITY_KEY_SOURCES"
    )]
    pub affinity_key_sources: Vec<KeySource>,
    /// Frontend attributes read by the `explicit` key source, first non-empty wins
    /// (e.g. `build-arg:BUILDKIT_ROUTER_KEY`, `label:com.example.project`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "build-arg:BUILDKIT_ROUTER_KEY",
        env = "BUILDKIT_ROUTER_AFFINITY_KEY_ATTR"
    )]
    pub affinity_key_attr: Vec<String>,
    /// Relative weight of a backend (by identity) in ranking and load bounds, e.g.
    /// `buildkitd-3=2` for a pod twice as large. Repeatable; unlisted backends weigh 1.
    #[arg(long = "backend-weight", value_parser = parse_weight, env = "BUILDKIT_ROUTER_BACKEND_WEIGHTS", value_delimiter = ',')]
    pub backend_weights: Vec<(String, f64)>,
    /// Requested platforms (the `platform` frontend attribute) are a preference by default:
    /// backends whose workers list them all rank first, and when none does the build still goes
    /// to a backend, which decides as a single daemon would. With this flag such a build is
    /// refused with FAILED_PRECONDITION, naming the platforms available.
    #[arg(long, env = "BUILDKIT_ROUTER_STRICT_PLATFORMS")]
    pub strict_platforms: bool,
}

impl PlacementArgs {
    pub fn to_config(&self) -> PlacementConfig {
        PlacementConfig {
            balance_factor: self.balance_factor,
            hot_key_threshold: self.hot_key_threshold,
            max_builds_per_backend: self.max_builds_per_backend,
            key_sources: self.affinity_key_sources.clone(),
            explicit_key_attrs: self.affinity_key_attr.clone(),
            weights: self.backend_weights.clone(),
            strict_platforms: self.strict_platforms,
        }
    }
}

/// Placement knobs.
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    /// c in ceil(c * (active + 1) / ready); `f64::INFINITY` = no load bound (pure affinity).
    pub balance_factor: f64,
    /// A key is hot above this share of recent keyed builds x ready backends; hot keys are held
    /// to the mean load instead of `balance_factor` times it. `f64::INFINITY` = never hot.
    /// Ignored when `balance_factor` is infinite.
    pub hot_key_threshold: f64,
    pub max_builds_per_backend: Option<usize>,
    /// Affinity key sources, in order.
    pub key_sources: Vec<KeySource>,
    /// Frontend attributes of the `explicit` source.
    pub explicit_key_attrs: Vec<String>,
    /// Backend identity -> weight (default 1).
    pub weights: Vec<(String, f64)>,
    /// Refuse (FAILED_PRECONDITION) a build whose platforms no ready backend lists, instead of
    /// letting a backend try it.
    pub strict_platforms: bool,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            balance_factor: 1.25,
            hot_key_threshold: DEFAULT_HOT_KEY_THRESHOLD,
            max_builds_per_backend: None,
            key_sources: key::DEFAULT_SOURCES.to_vec(),
            explicit_key_attrs: vec!["build-arg:BUILDKIT_ROUTER_KEY".to_owned()],
            weights: Vec::new(),
            strict_platforms: false,
        }
    }
}

/// What a new build asks of placement.
#[derive(Debug, Clone, Default)]
pub struct BuildTraits {
    /// Platforms the build targets (`platform` frontend attr, comma list).
    pub platforms: Vec<String>,
    /// buildx's probe build: least loaded, never counted against affinity.
    pub internal: bool,
    /// Cache-affinity key; `None` places on load alone.
    pub key: Option<AffinityKey>,
    /// Randomness for keyless choices (power of two choices, ties). Fresh per build from
    /// `traits_for_*`; fixed by tests and `simulate` so that runs repeat.
    pub nonce: u64,
}

impl BuildTraits {
    pub fn key_source(&self) -> KeySource {
        self.key.as_ref().map_or(KeySource::None, |k| k.source)
    }

    pub fn key_hash(&self) -> Option<u64> {
        self.key.as_ref().map(|k| k.hash)
    }
}

/// Why a backend was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The key's home backend (rank 0) had room.
    Affinity,
    /// The home backend was over its load bound; a later one in the key's ranking took it.
    Spill,
    /// No key (or an internal probe): chosen on load.
    LeastLoaded,
    /// Set by the router: a session named by the build was already bound.
    PinnedSession,
    /// Every capable backend was at hard capacity: the least loaded took it anyway.
    Overflow,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Affinity,
        Reason::Spill,
        Reason::LeastLoaded,
        Reason::PinnedSession,
        Reason::Overflow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Affinity => "affinity",
            Reason::Spill => "spill",
            Reason::LeastLoaded => "least_loaded",
            Reason::PinnedSession => "pinned_session",
            Reason::Overflow => "overflow",
        }
    }
}

/// The backend chosen for a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index into the snapshot given to [`Placement::choose`].
    pub index: usize,
    pub reason: Reason,
    /// Rank of the chosen backend for the build's key (0 = home); 0 without a key.
    pub rank: usize,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("no buildkitd backend is ready")]
    NoBackend,
    #[error(
        "no ready buildkitd backend can build platform {wanted}; platforms available: {available}"
    )]
    NoPlatform { wanted: String, available: String },
    /// Only from [`Placement::choose_capped`] (queueing on): the build must wait.
    #[error("all {backends} eligible buildkitd backends are at capacity")]
    AllAtCapacity { backends: usize },
}

impl PlacementError {
    /// The gRPC status code the client should see.
    pub fn code(&self) -> tonic::Code {
        match self {
            PlacementError::NoBackend => tonic::Code::Unavailable,
            PlacementError::NoPlatform { .. } => tonic::Code::FailedPrecondition,
            PlacementError::AllAtCapacity { .. } => tonic::Code::ResourceExhausted,
        }
    }
}

/// Scores of the first candidates, kept on the stack so that computing a choice's rank does not
/// hash again; larger pools rehash the rest.
const SCRATCH: usize = 64;

/// Default of [`PlacementConfig::hot_key_threshold`] (chosen with `simulate`, see
/// docs/placement.md).
pub const DEFAULT_HOT_KEY_THRESHOLD: f64 = 0.3;

/// The placement policy with its configuration and its estimate of which keys are hot (shared by
/// clones).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    config: PlacementConfig,
    hot: std::sync::Arc<hot::HotKeys>,
}

impl Placement {
    pub fn new(config: PlacementConfig) -> Self {
        Self {
            config,
            hot: Default::default(),
        }
    }

    /// The key's decayed count of recent builds (diagnostics and tests).
    pub fn recent_builds_of(&self, key: u64) -> u64 {
        self.hot.count(key)
    }

    pub fn config(&self) -> &PlacementConfig {
        &self.config
    }

    /// What a Solve asks of placement.
    pub fn traits_for_solve(&self, solve: &SolveInfo<'_>) -> BuildTraits {
        let platforms = solve
            .frontend_attrs
            .iter()
            .find(|(k, _)| *k == "platform")
            .map(|(_, p)| parse_platforms(p))
            .unwrap_or_default();
        // Sources before `content` first, then those after it: the content key itself needs
        // I/O (`crate::content` fills it in when `content_wanted`).
        let (before, after) = key::around_content(&self.config.key_sources);
        let key = if solve.internal {
            None
        } else {
            key::solve_key(solve, before, &self.config.explicit_key_attrs)
                .or_else(|| key::solve_key(solve, after, &self.config.explicit_key_attrs))
        };
        BuildTraits {
            platforms,
            internal: solve.internal,
            key,
            nonce: rand::random(),
        }
    }

    /// Whether a Solve's key should come from its content: `content` is a key source and no
    /// source before it yields a key (a key from a source after it is replaced).
    pub fn content_wanted(&self, solve: &SolveInfo<'_>) -> bool {
        let (before, after) = key::around_content(&self.config.key_sources);
        !solve.internal
            && before.len() + after.len() < self.config.key_sources.len()
            && key::solve_key(solve, before, &self.config.explicit_key_attrs).is_none()
    }

    /// What a Session that no Solve named within the bind window asks of placement.
    pub fn traits_for_session(&self, shared_key: &str) -> BuildTraits {
        BuildTraits {
            key: key::session_key(shared_key, &self.config.key_sources),
            nonce: rand::random(),
            ..BuildTraits::default()
        }
    }

    fn weight_of(&self, identity: &str) -> f64 {
        self.config
            .weights
            .iter()
            .find(|(id, _)| id == identity)
            .map_or(1.0, |&(_, w)| w)
    }

    /// Picks a backend among those that accept builds, preferring those whose workers list every
    /// platform asked for (required with `strict_platforms`).
    /// Allocates nothing unless it fails. Counts a keyed build in the hot-key estimate, so the
    /// answer depends on the keyed builds this instance placed recently as well as on the
    /// snapshot: two instances fed the same sequence answer the same.
    pub fn choose<N: Node>(
        &self,
        nodes: &[N],
        build: &BuildTraits,
    ) -> Result<Choice, PlacementError> {
        let lists_all = |n: &N| build.platforms.iter().all(|p| n.supports_platform(p));
        let weighted = !self.config.weights.is_empty();
        let cap_of = |n: &N| match (n.capacity(), self.config.max_builds_per_backend) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(usize::MAX),
        };

        // Pass 1: the pool's totals, for the load bound.
        let (mut ready, mut total_active, mut weight_sum, mut candidates) =
            (0usize, 0usize, 0f64, 0usize);
        for n in nodes {
            if !n.accepts_builds() {
                continue;
            }
            ready += 1;
            total_active += n.active_builds();
            if weighted {
                weight_sum += self.weight_of(n.identity());
            }
            if lists_all(n) {
                candidates += 1;
            }
        }
        if ready == 0 {
            return Err(PlacementError::NoBackend);
        }
        // Platforms are a preference: backends listing every requested platform rank first.
        // When none does, the build still goes to a ready backend, which decides exactly as a
        // single daemon would (a COPY-only or cross-compiled multi-platform build needs no
        // emulator). Only an operator asking for strict matching gets an error instead.
        let prefer_listed = candidates > 0;
        if !prefer_listed {
            if self.config.strict_platforms {
                return Err(self.no_platform(nodes, build));
            }
            candidates = ready;
        }
        let capable = |n: &N| n.accepts_builds() && (!prefer_listed || lists_all(n));

        let key = match (&build.key, build.internal) {
            (Some(k), false) => k.hash,
            (_, true) => {
                return Ok(self.least_loaded(
                    nodes,
                    &capable,
                    build.nonce,
                    Reason::LeastLoaded,
                    &cap_of,
                ))
            }
            (None, false) => {
                return Ok(self.two_choices(nodes, &capable, candidates, build.nonce, &cap_of))
            }
        };

        // Pass 2: rendezvous scores; the best eligible one wins. A hot key is eligible only
        // below the mean (c = 1) and falls back to the usual bound when no one is.
        let c = self.config.balance_factor;
        let hot = c.is_finite()
            && self.config.hot_key_threshold.is_finite()
            && self.hot.record(key, ready, self.config.hot_key_threshold);
        let c_hot = if hot { c.min(1.0) } else { c };
        let share = c * (total_active + 1) as f64;
        let hot_share = c_hot * (total_active + 1) as f64;
        let uniform_bound = bound(share / ready as f64);
        let uniform_hot_bound = bound(hot_share / ready as f64);
        let score_of = |n: &N| {
            if weighted {
                hash::weighted_rendezvous(key, n.identity_hash(), self.weight_of(n.identity()))
            } else {
                hash::rendezvous(key, n.identity_hash())
            }
        };
        let mut scratch = [0u64; SCRATCH];
        let mut home = 0u64;
        let mut best: Option<(usize, u64)> = None;
        // A hot key's best below the usual bound, when no one is below the mean.
        let mut fallback: Option<(usize, u64)> = None;
        // Below hard capacity but over the balance bound: used only when no one is eligible.
        let mut roomy: Option<(usize, usize)> = None;
        for (i, n) in nodes.iter().enumerate() {
            if !capable(n) {
                continue;
            }
            let s = score_of(n);
            if i < SCRATCH {
                scratch[i] = s;
            }
            home = home.max(s);
            let load = n.active_builds();
            let cap = cap_of(n);
            let (limit, hot_limit) = if weighted {
                let w = self.weight_of(n.identity()) / weight_sum;
                (bound(share * w), bound(hot_share * w))
            } else {
                (uniform_bound, uniform_hot_bound)
            };
            if load < limit && load < cap {
                if load < hot_limit {
                    if best.is_none_or(|(_, bs)| s > bs) {
                        best = Some((i, s));
                    }
                } else if fallback.is_none_or(|(_, bs)| s > bs) {
                    fallback = Some((i, s));
                }
            } else if load < cap && roomy.is_none_or(|(_, l)| load < l) {
                roomy = Some((i, load));
            }
        }
        match (best.or(fallback), roomy) {
            (Some((index, s)), _) => {
                // Rank: how many capable backends score above the chosen one.
                let rank = nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| capable(n))
                    .filter(|&(i, n)| (if i < SCRATCH { scratch[i] } else { score_of(n) }) > s)
                    .count();
                let reason = if s == home {
                    Reason::Affinity
                } else {
                    Reason::Spill
                };
                Ok(Choice {
                    index,
                    reason,
                    rank,
                })
            }
            (None, Some((index, _))) => {
                let s = if index < SCRATCH {
                    scratch[index]
                } else {
                    score_of(&nodes[index])
                };
                let rank = nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| capable(n))
                    .filter(|&(i, n)| (if i < SCRATCH { scratch[i] } else { score_of(n) }) > s)
                    .count();
                let reason = if rank == 0 {
                    Reason::Affinity
                } else {
                    Reason::Spill
                };
                Ok(Choice {
                    index,
                    reason,
                    rank,
                })
            }
            (None, None) => {
                Ok(self.least_loaded(nodes, &capable, build.nonce, Reason::Overflow, &cap_of))
            }
        }
    }

    /// Least active builds among capable backends, ties broken by the nonce. Reports `Overflow`
    /// when even the least loaded is at hard capacity.
    fn least_loaded<N: Node>(
        &self,
        nodes: &[N],
        capable: &impl Fn(&N) -> bool,
        nonce: u64,
        reason: Reason,
        cap_of: &impl Fn(&N) -> usize,
    ) -> Choice {
        let mut best: Option<(usize, usize, u64)> = None;
        for (i, n) in nodes.iter().enumerate() {
            if !capable(n) {
                continue;
            }
            let load = n.active_builds();
            let tie = hash::fmix64(nonce ^ i as u64);
            if best.is_none_or(|(_, bl, bt)| load < bl || (load == bl && tie > bt)) {
                best = Some((i, load, tie));
            }
        }
        let (index, load, _) = best.expect("caller checked there is a candidate");
        let reason = if load >= cap_of(&nodes[index]) {
            Reason::Overflow
        } else {
            reason
        };
        Choice {
            index,
            reason,
            rank: 0,
        }
    }

    /// Power of two choices: two distinct random candidates, the less loaded wins.
    fn two_choices<N: Node>(
        &self,
        nodes: &[N],
        capable: &impl Fn(&N) -> bool,
        candidates: usize,
        nonce: u64,
        cap_of: &impl Fn(&N) -> usize,
    ) -> Choice {
        let r = hash::fmix64(nonce);
        let a = (r % candidates as u64) as usize;
        let b = if candidates > 1 {
            (a + 1 + ((r >> 32) % (candidates as u64 - 1)) as usize) % candidates
        } else {
            a
        };
        let (mut pick_a, mut pick_b) = (0, 0);
        for (pos, (i, _)) in nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| capable(n))
            .enumerate()
        {
            if pos == a {
                pick_a = i;
            }
            if pos == b {
                pick_b = i;
            }
        }
        let (la, lb) = (nodes[pick_a].active_builds(), nodes[pick_b].active_builds());
        let index = if lb < la { pick_b } else { pick_a };
        if nodes[index].active_builds() >= cap_of(&nodes[index]) {
            // Both samples are full: look at everyone before calling it an overflow.
            return self.least_loaded(nodes, capable, nonce, Reason::LeastLoaded, cap_of);
        }
        Choice {
            index,
            reason: Reason::LeastLoaded,
            rank: 0,
        }
    }

    fn no_platform<N: Node>(&self, nodes: &[N], build: &BuildTraits) -> PlacementError {
        let mut available: Vec<String> = nodes
            .iter()
            .filter(|n| n.accepts_builds())
            .flat_map(|n| n.platforms())
            .collect();
        available.sort();
        available.dedup();
        PlacementError::NoPlatform {
            wanted: build.platforms.join(","),
            available: if available.is_empty() {
                "none known".into()
            } else {
                available.join(", ")
            },
        }
    }
}

/// ceil(x) as a load bound; an infinite factor means no bound.
fn bound(x: f64) -> usize {
    if x.is_finite() {
        x.ceil() as usize
    } else {
        usize::MAX
    }
}

/// `linux/amd64, linux/arm64` -> `["linux/amd64", "linux/arm64"]`, each normalised
/// ([`normalize_platform`]).
pub fn parse_platforms(p: &str) -> Vec<String> {
    p.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(normalize_platform)
        .collect()
}

/// A platform as containerd's `platforms.Normalize` (which BuildKit uses) spells it, so that
/// aliases match: `aarch64` and `arm64/v8` are `arm64`, `x86_64` is `amd64`, `i386` is `386`,
/// `armhf` is `arm/v7`, a bare architecture means Linux (`arm64` is `linux/arm64`).
pub fn normalize_platform(p: &str) -> String {
    let p = p.trim().to_ascii_lowercase();
    let parts: Vec<&str> = p.split('/').collect();
    let (os, arch, variant) = match parts.as_slice() {
        [one] if matches!(*one, "linux" | "windows" | "darwin" | "freebsd") => (*one, "", ""),
        [arch] => ("linux", *arch, ""),
        [os, arch] => (*os, *arch, ""),
        [os, arch, variant, ..] => (*os, *arch, *variant),
        [] => ("", "", ""),
    };
    let (arch, variant) = match (arch, variant) {
        ("i386" | "i686", _) => ("386", ""),
        ("x86_64" | "x86-64" | "amd64", "v1") => ("amd64", ""),
        ("x86_64" | "x86-64", v) => ("amd64", v),
        ("aarch64" | "arm64", "v8" | "8") => ("arm64", ""),
        ("aarch64", v) => ("arm64", v),
        ("armhf", _) => ("arm", "v7"),
        ("armel", _) => ("arm", "v6"),
        ("arm", "" | "7") => ("arm", "v7"),
        ("arm", "5") => ("arm", "v5"),
        ("arm", "6") => ("arm", "v6"),
        ("arm", "8") => ("arm", "v8"),
        other => other,
    };
    match (arch, variant) {
        ("", _) => os.to_owned(),
        (arch, "") => format!("{os}/{arch}"),
        (arch, variant) => format!("{os}/{arch}/{variant}"),
    }
}

/// Capacity as a real cap, for the admission queue (`crate::queue`). Kept apart from
/// [`Placement::choose`], which overflows to the least loaded backend when every one is full.
impl Placement {
    /// Which ready backends may take `build`, load aside, by the rule `choose` applies: those
    /// whose workers list every platform asked for when any does (`Ok(true)`), else every ready
    /// one (`Ok(false)`), or an error: none ready, or none listing them under `strict_platforms`.
    fn platform_rule<N: Node>(
        &self,
        nodes: &[N],
        build: &BuildTraits,
    ) -> Result<bool, PlacementError> {
        let (mut ready, mut listed) = (0usize, 0usize);
        for n in nodes.iter().filter(|n| n.accepts_builds()) {
            ready += 1;
            listed += usize::from(build.platforms.iter().all(|p| n.supports_platform(p)));
        }
        match (ready, listed) {
            (0, _) => Err(PlacementError::NoBackend),
            (_, 0) if self.config.strict_platforms => Err(self.no_platform(nodes, build)),
            (_, listed) => Ok(listed > 0),
        }
    }

    /// Whether `n` may take `build` under [`Placement::platform_rule`]'s answer.
    fn capable_of<N: Node>(&self, n: &N, build: &BuildTraits, prefer_listed: bool) -> bool {
        n.accepts_builds()
            && (!prefer_listed || build.platforms.iter().all(|p| n.supports_platform(p)))
    }

    /// `n`'s hard capacity: the smaller of its own and `--max-builds-per-backend`;
    /// `usize::MAX` when neither is set.
    pub fn capacity_of<N: Node>(&self, n: &N) -> usize {
        match (n.capacity(), self.config.max_builds_per_backend) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(usize::MAX),
        }
    }

    /// Whether some backend can take `build` now without exceeding its capacity (counting
    /// [`Node::load`]). `NoBackend`: none ready; `NoPlatform`: none can build its platforms;
    /// `AllAtCapacity`: every one that could is full. Records nothing.
    pub fn room_for<N: Node>(
        &self,
        nodes: &[N],
        build: &BuildTraits,
    ) -> Result<(), PlacementError> {
        let prefer_listed = self.platform_rule(nodes, build)?;
        let mut backends = 0usize;
        for n in nodes {
            if self.capable_of(n, build, prefer_listed) {
                if n.load() < self.capacity_of(n) {
                    return Ok(());
                }
                backends += 1;
            }
        }
        Err(PlacementError::AllAtCapacity { backends })
    }

    /// The build's home: the first backend of its key's ranking among the capable ones, load
    /// aside (`None` without a key, for probes, or when no backend is capable). Records nothing.
    pub fn home<N: Node>(&self, nodes: &[N], build: &BuildTraits) -> Option<usize> {
        let key = match (&build.key, build.internal) {
            (Some(k), false) => k.hash,
            _ => return None,
        };
        let prefer_listed = self.platform_rule(nodes, build).ok()?;
        let weighted = !self.config.weights.is_empty();
        let mut best: Option<(usize, u64)> = None;
        for (i, n) in nodes.iter().enumerate() {
            if !self.capable_of(n, build, prefer_listed) {
                continue;
            }
            let s = if weighted {
                hash::weighted_rendezvous(key, n.identity_hash(), self.weight_of(n.identity()))
            } else {
                hash::rendezvous(key, n.identity_hash())
            };
            if best.is_none_or(|(_, bs)| s > bs) {
                best = Some((i, s));
            }
        }
        best.map(|(i, _)| i)
    }

    /// [`Placement::choose`] with capacity as a hard cap: never `Reason::Overflow`; a build that
    /// finds every capable backend full gets `AllAtCapacity` (and waits). Checks room first, so a
    /// refused build is not counted in the hot-key estimate. Loads are read with
    /// `Node::active_builds`, as `choose` does; pass nodes whose `active_builds` is
    /// [`Node::load`] (the queue does) to count the daemons' own reports.
    pub fn choose_capped<N: Node>(
        &self,
        nodes: &[N],
        build: &BuildTraits,
    ) -> Result<Choice, PlacementError> {
        self.room_for(nodes, build)?;
        let choice = self.choose(nodes, build)?;
        if choice.reason != Reason::Overflow {
            return Ok(choice);
        }
        let prefer_listed = self.platform_rule(nodes, build)?;
        // Backends of unequal capacities: the least loaded was full while another has room.
        let index = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| self.capable_of(*n, build, prefer_listed))
            .filter(|(_, n)| n.active_builds() < self.capacity_of(*n))
            .min_by_key(|(_, n)| n.active_builds())
            .map(|(i, _)| i)
            .ok_or(PlacementError::AllAtCapacity {
                backends: nodes.len(),
            })?;
        Ok(Choice {
            index,
            reason: Reason::LeastLoaded,
            rank: 0,
        })
    }
}

#[cfg(test)]
mod tests;
