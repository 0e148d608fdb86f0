//! Choosing a backend for a new build. Pure functions over a snapshot of backends; no I/O.
//!
//! The router asks [`Placement::traits_for_solve`] (or `traits_for_session`) what a build needs,
//! then [`Placement::choose`] which backend of a snapshot gets it. The same code drives
//! `buildkit-router simulate`.
// INTERFACE OWNED BY THE placement HELPER (issue 3). router.rs relies on: Node, BuildTraits,
// Placement::{new, traits_for_solve, traits_for_session, choose}, Choice, Reason, PlacementError,
// PlacementConfig. Extend freely; keep those working.

pub mod simulate;

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
}

/// Placement flags (flattened into the router's command line).
#[derive(Debug, Clone, clap::Args)]
pub struct PlacementArgs {
    /// Cache affinity tolerance: a backend takes a keyed build while its load is below
    /// ceil(c * (active + 1) / ready backends).
    #[arg(long, default_value_t = 1.25, env = "BUILDKIT_ROUTER_BALANCE_FACTOR")]
    pub balance_factor: f64,
    /// Hard cap of concurrent builds per backend (default: unlimited).
    #[arg(long, env = "BUILDKIT_ROUTER_MAX_BUILDS_PER_BACKEND")]
    pub max_builds_per_backend: Option<usize>,
}

impl PlacementArgs {
    pub fn to_config(&self) -> PlacementConfig {
        PlacementConfig {
            balance_factor: self.balance_factor,
            max_builds_per_backend: self.max_builds_per_backend,
        }
    }
}

/// Placement knobs.
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    pub balance_factor: f64,
    pub max_builds_per_backend: Option<usize>,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            balance_factor: 1.25,
            max_builds_per_backend: None,
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
}

/// Why a backend was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Affinity,
    Spill,
    LeastLoaded,
    PinnedSession,
    Overflow,
}

impl Reason {
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
    #[error("no ready buildkitd backend can build platform {wanted}; platforms available: {available}")]
    NoPlatform { wanted: String, available: String },
}

/// The placement policy with its configuration.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    config: PlacementConfig,
}

impl Placement {
    pub fn new(config: PlacementConfig) -> Self {
        Self { config }
    }

    pub fn config(&self) -> &PlacementConfig {
        &self.config
    }

    /// What a Solve asks of placement.
    pub fn traits_for_solve(&self, solve: &SolveInfo<'_>) -> BuildTraits {
        let platforms = solve
            .frontend_attr("platform")
            .map(|p| {
                p.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        BuildTraits {
            platforms,
            internal: solve.internal,
        }
    }

    /// What a Session that no Solve named within the bind window asks of placement.
    pub fn traits_for_session(&self, shared_key: &str) -> BuildTraits {
        let _ = shared_key;
        BuildTraits::default()
    }

    /// Picks a backend: least active builds among those that accept builds and support every
    /// platform asked for, ties broken at random.
    pub fn choose<N: Node>(&self, nodes: &[N], build: &BuildTraits) -> Result<Choice, PlacementError> {
        let mut best: Option<(usize, usize)> = None;
        let mut ties = 0u32;
        let mut any_ready = false;
        for (index, node) in nodes.iter().enumerate() {
            if !node.accepts_builds() {
                continue;
            }
            any_ready = true;
            if !build.platforms.iter().all(|p| node.supports_platform(p)) {
                continue;
            }
            let load = node.active_builds();
            match best {
                Some((_, best_load)) if load > best_load => {}
                Some((_, best_load)) if load == best_load => {
                    ties += 1;
                    // Reservoir sampling keeps each tied backend equally likely.
                    if rand::random_range(0..=ties) == 0 {
                        best = Some((index, load));
                    }
                }
                _ => {
                    best = Some((index, load));
                    ties = 0;
                }
            }
        }
        match best {
            Some((index, _)) => Ok(Choice {
                index,
                reason: Reason::LeastLoaded,
                rank: 0,
            }),
            None if !any_ready => Err(PlacementError::NoBackend),
            None => {
                let mut available: Vec<String> = nodes
                    .iter()
                    .filter(|n| n.accepts_builds())
                    .flat_map(|n| n.platforms())
                    .collect();
                available.sort();
                available.dedup();
                Err(PlacementError::NoPlatform {
                    wanted: build.platforms.join(","),
                    available: if available.is_empty() {
                        "none known".into()
                    } else {
                        available.join(", ")
                    },
                })
            }
        }
    }
}
