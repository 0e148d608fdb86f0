//! Admission: capacity, tenants and the wait queue. Pure: no I/O, no clock, no lock; time comes
//! in as [`Instant`] values, so the router (behind a short `Mutex`, never held across an await)
//! and `buildkit-router simulate` drive the same code.
//!
//! # How a build is admitted
//! [`Queue::push`] puts a build at the tail of its tenant's FIFO. [`Queue::dispatch`] then
//! serves as many waiting builds as the snapshot has room for, and ends those that waited past
//! `--queue-timeout`. Call it after every push, every [`Queue::finish`], every change of the
//! pool (a backend ready, gone, draining), and at [`Queue::next_deadline`]. Each
//! [`Outcome::Admitted`] names a backend (an index into the snapshot); the caller must count that
//! build in the backend's load (`Backend::start_build`) before its next call, as the queue does
//! within one call.
//!
//! A build waits when no backend is ready (a pool scaled to zero, a rolling restart), or when
//! every backend that could build it is at capacity ([`Placement::capacity_of`]: capacity is a
//! real cap here, [`Placement::choose_capped`]). Builds the daemon cannot build at all (a strict
//! platform rule) are [`Outcome::Rejected`] at once.
//!
//! # Order
//! - Tenants are served round robin: the tenant just served goes to the back of the ring, a
//!   tenant with its first waiting build joins at the back. Within a tenant, first come first
//!   served. A tenant at `--max-builds-per-tenant` (builds this replica admitted and has not
//!   yet [`finish`](Queue::finish)ed) is passed by until one of its builds ends.
//! - **Home first, bounded.** Let S be the first waiting build, in that order, that has room
//!   somewhere. If S's home (rank 0 of its key among capable backends, [`Placement::home`]) has
//!   room, S goes. Otherwise a later build whose own home has room goes first, so that a freed
//!   slot goes to the build whose cache is there rather than to a build that would spill onto
//!   it. Every build with room that such a jump passes over counts one skip; a build with
//!   [`QueueConfig::max_skips`] skips (`--queue-max-skips`, default 4) is never passed again.
//!   So a build waits for at most `max_skips` home-first jumps on top of its round robin turn.
//!   The search for a home build looks at the first [`QueueConfig::scan_window`] builds.
//! - A build with room under the hard cap on a full pool is also within the balance bound of
//!   placement (every other backend is at the cap), so a home build served this way is placed
//!   home.
//!
//! # Load and the race between replicas
//! A backend's load is [`Node::load`]: the larger of the builds this replica started and the
//! builds the daemon reports running (`ListenBuildHistory{ActiveOnly: true}`, all replicas
//! together). Replicas do not talk to each other, so two of them can each see a daemon one build
//! under its cap and each admit a build there before the daemon's report of the other's build
//! reaches them. The excess on one backend is at most the builds the *other* replicas admitted
//! to it within one report delay (their Solve's way to the daemon plus the event's way back,
//! typically well under a second), and never more than `(replicas - 1) x cap`, as each replica
//! alone never exceeds the cap with its own count. A finished build whose end has not yet been
//! reported only holds a slot a little longer (the safe side).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::duration::parse_duration;
use crate::placement::{
    AffinityKey, BuildTraits, Choice, KeySource, Node, Placement, PlacementError,
};

/// Capacity of a backend when queueing is on and `--max-builds-per-backend` is not given.
pub const DEFAULT_MAX_BUILDS_PER_BACKEND: usize = 4;
/// Default of `--queue-max-skips`.
pub const DEFAULT_MAX_SKIPS: u32 = 4;
/// Waiting builds looked at for a home-first jump.
pub const DEFAULT_SCAN_WINDOW: usize = 256;
/// Tenants named in `builds_queued{tenant}`; the others are summed as [`OTHER_TENANT`].
pub const DEFAULT_TENANT_LABELS: usize = 20;
/// The label of the tenants folded together by [`Queue::queued_by_tenant`].
pub const OTHER_TENANT: &str = "other";
/// The tenant of builds without one (`--tenant-from none`, no client certificate, no key).
pub const DEFAULT_TENANT: &str = "default";

/// Where a build's tenant comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TenantFrom {
    /// The client certificate's identity (mTLS); builds without one share `default`.
    #[value(name = "mtls")]
    Mtls,
    /// The owner part of the affinity key: a repository's group or organisation, an image's
    /// namespace (`git.example.com/group/sub/repo` -> `git.example.com/group/sub`).
    #[value(name = "key-owner")]
    KeyOwner,
    /// One tenant for every build: plain FIFO.
    #[value(name = "none")]
    None,
}

/// The tenant of a build.
pub fn tenant_of<'a>(
    from: TenantFrom,
    mtls_identity: Option<&'a str>,
    key: Option<&'a AffinityKey>,
) -> &'a str {
    let t = match from {
        TenantFrom::Mtls => mtls_identity.map(str::trim),
        // A content key names no owner (it is a hash): such builds share `default`, as
        // keyless ones do.
        TenantFrom::KeyOwner => key
            .filter(|k| k.source != KeySource::Content)
            .map(key_owner),
        TenantFrom::None => None,
    };
    t.filter(|t| !t.is_empty()).unwrap_or(DEFAULT_TENANT)
}

/// The owner part of a key's text: its subject (repository, image, explicit value, session
/// directory) without the last path segment, or the whole subject when it has only one.
pub fn key_owner(key: &AffinityKey) -> &str {
    // Texts are `source|subject[|more]` (see placement::key).
    let mut parts = key.text.splitn(3, '|');
    let first = parts.next().unwrap_or("");
    let subject = match (key.source, parts.next()) {
        // An explicit value may itself contain `|`.
        (KeySource::Explicit, Some(_)) => &key.text[first.len() + 1..],
        (_, Some(s)) => s,
        (_, None) => first,
    };
    let subject = subject.trim_end_matches('/');
    match subject.rsplit_once('/') {
        Some((owner, _)) if !owner.is_empty() => owner,
        _ => subject,
    }
}

/// `on`/`off` (also true/false, yes/no, 1/0).
pub fn parse_switch(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// Admission flags (flattened into the router's command line). `--max-builds-per-backend` is a
/// placement flag; [`QueueArgs::max_builds_per_backend`] gives its default.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueArgs {
    /// Hold builds in the router while no backend is ready or every eligible one is at
    /// --max-builds-per-backend (`on`), or place them at once (`off`: a full pool overflows to its
    /// least loaded backend, an empty pool fails builds with UNAVAILABLE).
    #[arg(long = "queue", value_name = "on|off", default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set, env = "BUILDKIT_ROUTER_QUEUE")]
    pub enabled: bool,
    /// A build that waited this long fails with RESOURCE_EXHAUSTED. Long enough for an
    /// autoscaler to start a daemon from zero and for a few long builds to end.
    #[arg(long, value_parser = parse_duration, default_value = "30m", env = "BUILDKIT_ROUTER_QUEUE_TIMEOUT")]
    pub queue_timeout: Duration,
    /// Most builds one tenant runs at once through this replica; more wait (default: no limit).
    #[arg(long, env = "BUILDKIT_ROUTER_MAX_BUILDS_PER_TENANT")]
    pub max_builds_per_tenant: Option<usize>,
    /// What a tenant is, for round robin and --max-builds-per-tenant: the client certificate's
    /// identity (`mtls`), the affinity key's owner such as the repository's group (`key-owner`),
    /// or one tenant for all (`none`).
    #[arg(
        long,
        value_enum,
        default_value = "key-owner",
        env = "BUILDKIT_ROUTER_TENANT_FROM"
    )]
    pub tenant_from: TenantFrom,
    /// A waiting build may be passed this many times by later builds whose home backend freed
    /// a slot; then it is served in strict order.
    #[arg(long, default_value_t = DEFAULT_MAX_SKIPS, env = "BUILDKIT_ROUTER_QUEUE_MAX_SKIPS")]
    pub queue_max_skips: u32,
}

impl QueueArgs {
    /// The effective `--max-builds-per-backend`: the one given, else
    /// [`DEFAULT_MAX_BUILDS_PER_BACKEND`] with the queue on, else unlimited.
    pub fn max_builds_per_backend(&self, given: Option<usize>) -> Option<usize> {
        given.or(self.enabled.then_some(DEFAULT_MAX_BUILDS_PER_BACKEND))
    }

    pub fn to_config(&self) -> QueueConfig {
        QueueConfig {
            timeout: self.queue_timeout,
            max_builds_per_tenant: self.max_builds_per_tenant,
            max_skips: self.queue_max_skips,
            ..QueueConfig::default()
        }
    }
}

/// Queue knobs.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// A build that waited this long times out.
    pub timeout: Duration,
    pub max_builds_per_tenant: Option<usize>,
    /// Times a build may be passed over by home-first jumps.
    pub max_skips: u32,
    /// Waiting builds looked at, in order, for one decision.
    pub scan_window: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30 * 60),
            max_builds_per_tenant: None,
            max_skips: DEFAULT_MAX_SKIPS,
            scan_window: DEFAULT_SCAN_WINDOW,
        }
    }
}

/// A waiting build's number, unique within one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "q{}", self.0)
    }
}

/// An admitted build's place in its tenant's count. Give it back with [`Queue::finish`] when
/// the build ends (or fails to start), or the tenant's count never goes down.
#[must_use = "give it back with Queue::finish when the build ends"]
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    tenant: usize,
    generation: u64,
}

/// What [`Queue::dispatch`] decided about one build.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Place the build on `nodes[choice.index]` now.
    Admitted {
        ticket: Ticket,
        payload: T,
        choice: Choice,
        lease: Lease,
        /// Time spent in the queue.
        waited: Duration,
        /// Served before builds ahead of it, because its home freed a slot.
        home_first: bool,
    },
    /// Waited `--queue-timeout`: answer RESOURCE_EXHAUSTED with [`TimedOut::message`].
    TimedOut(TimedOut<T>),
    /// No ready backend can ever take it (platforms): answer with `error`.
    Rejected {
        ticket: Ticket,
        payload: T,
        error: PlacementError,
        waited: Duration,
    },
}

/// A build that waited too long, with what its error message names.
#[derive(Debug)]
pub struct TimedOut<T> {
    pub ticket: Ticket,
    pub payload: T,
    pub tenant: Arc<str>,
    pub waited: Duration,
    /// Builds that were ahead of it.
    pub position: usize,
    /// Builds waiting in all, itself included.
    pub queued: usize,
    pub pool: PoolState,
}

impl<T> TimedOut<T> {
    /// The gRPC code the client gets.
    pub fn code(&self) -> tonic::Code {
        tonic::Code::ResourceExhausted
    }

    /// The RESOURCE_EXHAUSTED message.
    pub fn message(&self) -> String {
        format!(
            "buildkit-router: no builder became free after waiting {} (--queue-timeout); {} builds \
             were ahead of this one, {} waiting in all; {}",
            HumanDuration(self.waited),
            self.position,
            self.queued,
            self.pool
        )
    }
}

/// What the pool looks like to admission, for messages and the waiting client's vertex.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Backends ready to take builds.
    pub ready: usize,
    /// Of those, below their capacity.
    pub free: usize,
    /// Their load (builds running), summed.
    pub active: usize,
    /// Their capacity, summed; `None` when one is unlimited.
    pub capacity: Option<usize>,
}

impl PoolState {
    pub fn of<N: Node>(placement: &Placement, nodes: &[N]) -> Self {
        let mut s = PoolState {
            capacity: Some(0),
            ..Default::default()
        };
        for n in nodes.iter().filter(|n| n.accepts_builds()) {
            let (load, cap) = (n.load(), placement.capacity_of(n));
            s.ready += 1;
            s.active += load;
            s.free += usize::from(load < cap);
            s.capacity = s
                .capacity
                .and_then(|c| (cap != usize::MAX).then_some(c + cap));
        }
        s
    }
}

impl fmt::Display for PoolState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ready == 0 {
            return write!(
                f,
                "no builder is ready (the pool is scaled to zero or restarting)"
            );
        }
        write!(
            f,
            "{} of {} builders free, {} builds running",
            self.free, self.ready, self.active
        )?;
        if let Some(c) = self.capacity {
            write!(f, " of {c} slots")?;
        }
        Ok(())
    }
}

/// `90s` -> `1m30s`; under a minute with a tenth of a second.
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d < Duration::from_secs(60) {
            return write!(f, "{:.1}s", d.as_secs_f64());
        }
        let s = d.as_secs();
        let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
        if h > 0 {
            write!(f, "{h}h{m}m{s}s")
        } else {
            write!(f, "{m}m{s}s")
        }
    }
}

/// One waiting build, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub ticket: Ticket,
    /// Builds ahead of it, in the order the queue serves them.
    pub position: usize,
    pub tenant: Arc<str>,
    pub key_source: KeySource,
    pub key_hash: Option<u64>,
    pub age: Duration,
    /// Times it was passed by a home-first jump.
    pub skips: u32,
}

/// `desired_backends` = ceil((active + queued) / target builds per backend).
pub fn desired_backends(active: usize, queued: usize, target: usize) -> usize {
    (active + queued).div_ceil(target.max(1))
}

#[derive(Debug)]
struct Entry<T> {
    tenant: usize,
    traits: BuildTraits,
    enqueued: Instant,
    skips: u32,
    payload: T,
}

#[derive(Debug)]
struct Tenant {
    name: Arc<str>,
    queued: VecDeque<u64>,
    /// Admitted and not yet finished.
    active: usize,
    generation: u64,
}

/// The wait queue. `T` is what the caller wants back with a build's outcome (the router: the
/// waiting task's channel; `simulate`: the arrival).
#[derive(Debug)]
pub struct Queue<T> {
    config: QueueConfig,
    entries: HashMap<u64, Entry<T>>,
    tenants: Vec<Option<Tenant>>,
    free_tenants: Vec<usize>,
    tenant_ids: HashMap<Arc<str>, usize>,
    /// Tenants with waiting builds, next to serve first.
    ring: VecDeque<usize>,
    next_ticket: u64,
    generations: u64,
    /// Reused between decisions.
    passed: Vec<u64>,
}

/// A node as admission sees it: its load counted as [`Node::load`] plus the builds admitted
/// earlier in the same [`Queue::dispatch`].
struct Loaded<'a, N> {
    node: &'a N,
    load: usize,
}

impl<N: Node> Node for Loaded<'_, N> {
    fn identity(&self) -> &str {
        self.node.identity()
    }
    fn active_builds(&self) -> usize {
        self.load
    }
    fn accepts_builds(&self) -> bool {
        self.node.accepts_builds()
    }
    fn capacity(&self) -> Option<usize> {
        self.node.capacity()
    }
    fn supports_platform(&self, platform: &str) -> bool {
        self.node.supports_platform(platform)
    }
    fn platforms(&self) -> Vec<String> {
        self.node.platforms()
    }
    fn identity_hash(&self) -> u64 {
        self.node.identity_hash()
    }
}

/// What one scan of the waiting builds found to serve.
struct Pick {
    ticket: u64,
    home_first: bool,
}

impl<T> Queue<T> {
    pub fn new(config: QueueConfig) -> Self {
        Self {
            config,
            entries: HashMap::new(),
            tenants: Vec::new(),
            free_tenants: Vec::new(),
            tenant_ids: HashMap::new(),
            ring: VecDeque::new(),
            next_ticket: 0,
            generations: 0,
            passed: Vec::new(),
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Builds waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, ticket: Ticket) -> bool {
        self.entries.contains_key(&ticket.0)
    }

    /// Every waiting build's ticket and payload, in no particular order.
    pub fn payloads(&self) -> impl Iterator<Item = (Ticket, &T)> + '_ {
        self.entries.iter().map(|(&t, e)| (Ticket(t), &e.payload))
    }

    /// Builds admitted and not yet finished, over all tenants.
    pub fn active(&self) -> usize {
        self.tenants.iter().flatten().map(|t| t.active).sum()
    }

    /// Builds `tenant` has admitted and not finished.
    pub fn active_of(&self, tenant: &str) -> usize {
        self.tenant_ids
            .get(tenant)
            .and_then(|&i| self.tenants[i].as_ref())
            .map_or(0, |t| t.active)
    }

    fn tenant_id(&mut self, name: &str) -> usize {
        if let Some(&i) = self.tenant_ids.get(name) {
            return i;
        }
        let name: Arc<str> = name.into();
        self.generations += 1;
        let t = Tenant {
            name: name.clone(),
            queued: VecDeque::new(),
            active: 0,
            generation: self.generations,
        };
        let i = match self.free_tenants.pop() {
            Some(i) => {
                self.tenants[i] = Some(t);
                i
            }
            None => {
                self.tenants.push(Some(t));
                self.tenants.len() - 1
            }
        };
        self.tenant_ids.insert(name, i);
        i
    }

    fn tenant(&self, i: usize) -> &Tenant {
        self.tenants[i].as_ref().expect("live tenant")
    }

    fn tenant_mut(&mut self, i: usize) -> &mut Tenant {
        self.tenants[i].as_mut().expect("live tenant")
    }

    /// Forgets a tenant with nothing waiting and nothing running (bounded memory).
    fn maybe_forget(&mut self, i: usize) {
        let t = self.tenant(i);
        if t.queued.is_empty() && t.active == 0 {
            let name = t.name.clone();
            self.tenant_ids.remove(&name);
            self.tenants[i] = None;
            self.free_tenants.push(i);
        }
    }

    fn at_cap(&self, i: usize) -> bool {
        self.config
            .max_builds_per_tenant
            .is_some_and(|cap| self.tenant(i).active >= cap)
    }

    /// Puts a build at the tail of its tenant's FIFO. Nothing is decided until
    /// [`Queue::dispatch`].
    pub fn push(&mut self, now: Instant, tenant: &str, traits: BuildTraits, payload: T) -> Ticket {
        let i = self.tenant_id(tenant);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let t = self.tenant_mut(i);
        t.queued.push_back(ticket);
        if t.queued.len() == 1 {
            self.ring.push_back(i);
        }
        self.entries.insert(
            ticket,
            Entry {
                tenant: i,
                traits,
                enqueued: now,
                skips: 0,
                payload,
            },
        );
        Ticket(ticket)
    }

    /// Removes a waiting build at once (its client cancelled); `None` if it is not waiting.
    pub fn cancel(&mut self, ticket: Ticket) -> Option<T> {
        self.remove(ticket.0).map(|e| e.payload)
    }

    fn remove(&mut self, ticket: u64) -> Option<Entry<T>> {
        let e = self.entries.remove(&ticket)?;
        let t = self.tenant_mut(e.tenant);
        if t.queued.front() == Some(&ticket) {
            t.queued.pop_front();
        } else if let Some(k) = t.queued.iter().position(|&x| x == ticket) {
            t.queued.remove(k);
        }
        if t.queued.is_empty() {
            if let Some(k) = self.ring.iter().position(|&x| x == e.tenant) {
                self.ring.remove(k);
            }
        }
        self.maybe_forget(e.tenant);
        Some(e)
    }

    /// An admitted build ended: its tenant may start another. Call [`Queue::dispatch`] after.
    pub fn finish(&mut self, lease: Lease) {
        let Some(Some(t)) = self.tenants.get_mut(lease.tenant) else {
            return;
        };
        if t.generation != lease.generation {
            return;
        }
        t.active = t.active.saturating_sub(1);
        self.maybe_forget(lease.tenant);
    }

    /// Waiting builds in the order they would be served (round robin over the ring, FIFO within
    /// a tenant), tenants at their cap included.
    fn order(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let mut round = 0usize;
        let mut k = 0usize;
        let mut any = false;
        std::iter::from_fn(move || loop {
            if k == self.ring.len() {
                if !any {
                    return None;
                }
                (round, k, any) = (round + 1, 0, false);
            }
            let t = self.ring[k];
            k += 1;
            if let Some(&ticket) = self.tenant(t).queued.get(round) {
                any = true;
                return Some((t, ticket));
            }
        })
    }

    /// Builds ahead of `ticket` in the order the queue serves them (0: next).
    pub fn position(&self, ticket: Ticket) -> Option<usize> {
        let e = self.entries.get(&ticket.0)?;
        let q = &self.tenant(e.tenant).queued;
        let i = q.iter().position(|&x| x == ticket.0)?;
        let mut ahead = 0;
        let mut before = true;
        for &u in &self.ring {
            if u == e.tenant {
                before = false;
                ahead += i;
                continue;
            }
            let n = self.tenant(u).queued.len();
            ahead += n.min(i) + usize::from(before && n > i);
        }
        Some(ahead)
    }

    /// Every waiting build with its position, in serving order (for `/status`).
    pub fn waiting(&self, now: Instant) -> Vec<Waiting> {
        self.order()
            .enumerate()
            .map(|(position, (t, ticket))| {
                let e = &self.entries[&ticket];
                Waiting {
                    ticket: Ticket(ticket),
                    position,
                    tenant: self.tenant(t).name.clone(),
                    key_source: e.traits.key_source(),
                    key_hash: e.traits.key_hash(),
                    age: now.saturating_duration_since(e.enqueued),
                    skips: e.skips,
                }
            })
            .collect()
    }

    /// Waiting builds per tenant, largest first, at most `labels` tenants named and the rest
    /// summed under [`OTHER_TENANT`] (bounded metric cardinality). Empty when nothing waits.
    pub fn queued_by_tenant(&self, labels: usize) -> Vec<(Arc<str>, usize)> {
        let mut v: Vec<(Arc<str>, usize)> = self
            .ring
            .iter()
            .map(|&t| (self.tenant(t).name.clone(), self.tenant(t).queued.len()))
            .collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if v.len() > labels {
            let rest: usize = v[labels..].iter().map(|x| x.1).sum();
            v.truncate(labels);
            v.push((OTHER_TENANT.into(), rest));
        }
        v
    }

    /// How long the longest waiting build has waited.
    pub fn oldest_age(&self, now: Instant) -> Option<Duration> {
        self.oldest().map(|t0| now.saturating_duration_since(t0))
    }

    fn oldest(&self) -> Option<Instant> {
        // Each tenant's FIFO is in arrival order: its head is its oldest.
        self.ring
            .iter()
            .filter_map(|&t| self.tenant(t).queued.front())
            .map(|x| self.entries[x].enqueued)
            .min()
    }

    /// When the next build times out: call [`Queue::dispatch`] then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.oldest().map(|t0| t0 + self.config.timeout)
    }

    /// Serves the waiting builds the snapshot has room for, in order, and ends those that waited
    /// `--queue-timeout`. Each admitted build is counted in its backend's load for the rest of
    /// this call; the caller counts it from then on. Allocates only when it has outcomes.
    pub fn dispatch<N: Node>(
        &mut self,
        now: Instant,
        placement: &Placement,
        nodes: &[N],
    ) -> Vec<Outcome<T>> {
        let mut out = Vec::new();
        if self.entries.is_empty() {
            return out;
        }
        if nodes
            .iter()
            .any(|n| n.accepts_builds() && n.load() < placement.capacity_of(n))
        {
            let view: Vec<Loaded<'_, N>> = nodes
                .iter()
                .map(|node| Loaded {
                    node,
                    load: node.load(),
                })
                .collect();
            self.serve(now, placement, view, &mut out);
        }
        self.expire(now, placement, nodes, &mut out);
        out
    }

    fn serve<N: Node>(
        &mut self,
        now: Instant,
        placement: &Placement,
        mut view: Vec<Loaded<'_, N>>,
        out: &mut Vec<Outcome<T>>,
    ) {
        loop {
            if !view
                .iter()
                .any(|n| n.accepts_builds() && n.load < placement.capacity_of(n))
            {
                return;
            }
            let Some(pick) = self.pick(placement, &view, now, out) else {
                return;
            };
            let (tenant, choice) = {
                let e = &self.entries[&pick.ticket];
                (e.tenant, placement.choose_capped(&view, &e.traits))
            };
            let choice = match choice {
                Ok(c) => c,
                Err(error) => {
                    // pick() checked room; only a Node that answers differently twice gets here.
                    let e = self.remove(pick.ticket).expect("picked a waiting build");
                    out.push(Outcome::Rejected {
                        ticket: Ticket(pick.ticket),
                        waited: now.saturating_duration_since(e.enqueued),
                        payload: e.payload,
                        error,
                    });
                    continue;
                }
            };
            view[choice.index].load += 1;
            // Counted before the removal, so that the tenant is not forgotten.
            let t = self.tenant_mut(tenant);
            t.active += 1;
            let lease = Lease {
                tenant,
                generation: t.generation,
            };
            let e = self.remove(pick.ticket).expect("picked a waiting build");
            // Served: to the back of the ring.
            if let Some(k) = self.ring.iter().position(|&x| x == tenant) {
                self.ring.remove(k);
                self.ring.push_back(tenant);
            }
            out.push(Outcome::Admitted {
                ticket: Ticket(pick.ticket),
                choice,
                lease,
                waited: now.saturating_duration_since(e.enqueued),
                home_first: pick.home_first,
                payload: e.payload,
            });
        }
    }

    /// Chooses the next build to serve, rejecting on the way the builds no ready backend can
    /// build. `None`: nothing waiting can be placed now.
    fn pick<N: Node>(
        &mut self,
        placement: &Placement,
        view: &[Loaded<'_, N>],
        now: Instant,
        out: &mut Vec<Outcome<T>>,
    ) -> Option<Pick> {
        let mut passed = std::mem::take(&mut self.passed);
        let pick = loop {
            passed.clear();
            let mut reject: Option<(u64, PlacementError)> = None;
            let mut strict: Option<u64> = None;
            let mut jumper: Option<u64> = None;
            let home_has_room = |traits: &BuildTraits| {
                placement
                    .home(view, traits)
                    .is_some_and(|h| view[h].load < placement.capacity_of(&view[h]))
            };
            for (t, ticket) in self.order().take(self.config.scan_window) {
                if self.at_cap(t) {
                    continue;
                }
                let e = &self.entries[&ticket];
                match placement.room_for(view, &e.traits) {
                    Ok(()) => {}
                    Err(PlacementError::AllAtCapacity { .. }) => continue,
                    Err(PlacementError::NoBackend) => break,
                    Err(error) => {
                        reject = Some((ticket, error));
                        break;
                    }
                }
                let home = home_has_room(&e.traits);
                if strict.is_none() {
                    strict = Some(ticket);
                    if home || e.skips >= self.config.max_skips {
                        break;
                    }
                } else if home {
                    jumper = Some(ticket);
                    break;
                } else if e.skips >= self.config.max_skips {
                    // Passed often enough: nothing behind it may pass it.
                    break;
                }
                passed.push(ticket);
            }
            if let Some((ticket, error)) = reject {
                let e = self.remove(ticket).expect("waiting");
                out.push(Outcome::Rejected {
                    ticket: Ticket(ticket),
                    waited: now.saturating_duration_since(e.enqueued),
                    payload: e.payload,
                    error,
                });
                // Look again without it.
                continue;
            }
            break match (jumper, strict) {
                (Some(ticket), _) => {
                    for p in &passed {
                        if let Some(e) = self.entries.get_mut(p) {
                            e.skips += 1;
                        }
                    }
                    Some(Pick {
                        ticket,
                        home_first: true,
                    })
                }
                (None, Some(ticket)) => Some(Pick {
                    ticket,
                    home_first: false,
                }),
                (None, None) => None,
            };
        };
        self.passed = passed;
        pick
    }

    /// Ends the builds that waited `--queue-timeout`.
    fn expire<N: Node>(
        &mut self,
        now: Instant,
        placement: &Placement,
        nodes: &[N],
        out: &mut Vec<Outcome<T>>,
    ) {
        let timeout = self.config.timeout;
        if self
            .oldest()
            .is_none_or(|t0| now.saturating_duration_since(t0) < timeout)
        {
            return;
        }
        let pool = PoolState::of(placement, nodes);
        while let Some((ticket, t0)) = self
            .ring
            .iter()
            .filter_map(|&t| self.tenant(t).queued.front())
            .map(|&x| (x, self.entries[&x].enqueued))
            .min_by_key(|&(_, t0)| t0)
        {
            let waited = now.saturating_duration_since(t0);
            if waited < timeout {
                break;
            }
            let position = self.position(Ticket(ticket)).unwrap_or(0);
            let queued = self.entries.len();
            let tenant = self.tenant(self.entries[&ticket].tenant).name.clone();
            let e = self.remove(ticket).expect("waiting");
            out.push(Outcome::TimedOut(TimedOut {
                ticket: Ticket(ticket),
                payload: e.payload,
                tenant,
                waited,
                position,
                queued,
                pool,
            }));
        }
    }
}

#[cfg(test)]
mod tests;
