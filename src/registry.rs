//! Live builds: build ref -> backend, session id -> backend.
//!
//! Every ref and session id has a slot holding its backend once bound. Waiters (a Status before
//! its Solve, a Session before the Solve that names it) subscribe to the slot and wake when it is
//! bound. Binding a Solve and all the sessions it names happens under one short lock, so
//! concurrent Solves that share a session (bake) always agree on one backend. A slot is pinned
//! while a Solve or Session stream uses it, lingers a little after the last pin drops (for the
//! history and Content calls that follow a build), and is swept after that, or after the TTL as a
//! backstop, so memory does not grow with the number of builds served.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::pool::Backend;

/// Which namespace a key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Ref,
    Session,
}

struct Slot {
    backend: watch::Sender<Option<Arc<Backend>>>,
    created: Instant,
    pins: AtomicUsize,
    /// Woken whenever a pin drops (see [`Pin::wait_sole`]).
    unpinned: tokio::sync::Notify,
    /// When an unpinned slot may be swept.
    expires: Mutex<Instant>,
    /// Set when the router refused the build itself (its Solve never reached a daemon): calls
    /// waiting for the ref end at once instead of waiting for a Solve that will not come.
    /// Cleared when a Solve naming the ref arrives again. Never held across an await.
    refused: Mutex<Option<Refused>>,
    /// Solves naming the ref whose first message is still being read ([`Arriving`]): calls
    /// waiting for the ref wait on past their timeout while there are any.
    arriving: AtomicUsize,
}

/// How the router refused a build: the gRPC status its Solve got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: u32,
    pub message: Arc<str>,
    /// The client connection the refused Solve came on (`router::ConnId`'s number).
    pub connection: u64,
}

impl Slot {
    fn new(now: Instant, expires: Instant) -> Arc<Self> {
        Arc::new(Self {
            backend: watch::Sender::new(None),
            created: now,
            pins: AtomicUsize::new(0),
            unpinned: tokio::sync::Notify::new(),
            expires: Mutex::new(expires),
            refused: Mutex::new(None),
            arriving: AtomicUsize::new(0),
        })
    }

    fn bound(&self) -> Option<Arc<Backend>> {
        self.backend.borrow().clone()
    }

    fn refusal(&self) -> Option<Refused> {
        self.refused.lock().expect("refusal lock").clone()
    }

    fn is_refused(&self) -> bool {
        self.refused.lock().expect("refusal lock").is_some()
    }

    /// Waits up to `within` until `settled` holds, checked against the binding whenever the
    /// binding or the refusal changes (both notify the binding's watch). The binding then;
    /// `None` on timeout.
    async fn wait_until(
        &self,
        within: Duration,
        settled: impl FnMut(&Option<Arc<Backend>>) -> bool,
    ) -> Option<Option<Arc<Backend>>> {
        let mut rx = self.backend.subscribe();
        let waited = tokio::time::timeout(within, rx.wait_for(settled)).await;
        match waited {
            Ok(Ok(bound)) => Some(bound.clone()),
            _ => None,
        }
    }

    /// [`Slot::wait_until`], waiting on past `within` while a Solve naming the key is arriving
    /// (its first message is still being read), but not past `arriving_until`: until `settled`
    /// holds, or the last such Solve is gone without settling it, or that deadline (`None`).
    async fn wait_until_arrived(
        &self,
        within: Duration,
        arriving_until: Instant,
        mut settled: impl FnMut(&Option<Arc<Backend>>) -> bool,
    ) -> Option<Option<Arc<Backend>>> {
        if let Some(bound) = self.wait_until(within, &mut settled).await {
            return Some(bound);
        }
        // An arriving Solve's end notifies the binding's watch (see `Arriving`'s drop).
        let mut rx = self.backend.subscribe();
        let wait =
            rx.wait_for(|bound| settled(bound) || self.arriving.load(Ordering::Acquire) == 0);
        let bound = tokio::time::timeout_at(arriving_until, wait)
            .await
            .ok()?
            .ok()?
            .clone();
        settled(&bound).then_some(bound)
    }
}

/// A Solve naming a ref whose first message is still being read: the ref's calls wait for it
/// past `--ref-wait`. Dropped when the Solve is bound or refused, or its handler ends in any
/// other way (the client went away); the calls then see the outcome, or an unknown ref.
#[must_use = "the Solve counts as arriving only while this lives"]
pub struct Arriving {
    slot: Arc<Slot>,
}

impl Drop for Arriving {
    fn drop(&mut self) {
        if self.slot.arriving.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Wakes waiters past their timeout (`Slot::wait_until_arrived`).
            self.slot.backend.send_modify(|_| {});
        }
    }
}

/// Keeps a ref or session slot alive while a stream uses it.
pub struct Pin {
    slot: Arc<Slot>,
    linger: Duration,
}

impl Pin {
    /// Resolves, within `timeout`, once this is the only pin left on its slot: every other
    /// stream that used the ref or session (a Solve naming a session) has ended. True if it is.
    pub fn sole(
        &self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let slot = self.slot.clone();
        let sole = async move {
            loop {
                let unpinned = slot.unpinned.notified();
                tokio::pin!(unpinned);
                unpinned.as_mut().enable();
                if slot.pins.load(Ordering::Acquire) <= 1 {
                    return;
                }
                unpinned.await;
            }
        };
        async move { tokio::time::timeout(timeout, sole).await.is_ok() }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if self.slot.pins.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.slot.expires.lock().expect("expiry lock") = Instant::now() + self.linger;
        }
        self.slot.unpinned.notify_waiters();
    }
}

/// The outcome of binding a Solve.
pub struct BoundBuild {
    pub backend: Arc<Backend>,
    /// True when an already-bound session decided the backend (not placement).
    pub pinned_by_session: bool,
    /// Keeps the ref and every named session bound while the Solve runs.
    pub pins: Vec<Pin>,
}

/// What a Solve's sessions say before placement runs.
pub enum Precheck {
    /// A named session (or the ref itself) is already bound: the build must go there.
    Pinned(Arc<Backend>),
    /// Nothing is bound yet: placement decides.
    Free,
}

/// Registry sizing and timers.
#[derive(Debug, Clone, Copy)]
pub struct RegistrySettings {
    /// How long a slot stays after its last user is gone.
    pub linger: Duration,
    /// Backstop: slots older than this are swept whatever their pins.
    pub ttl: Duration,
    /// How long a slot created only by a waiter stays unbound before it is swept.
    pub unbound_expiry: Duration,
    /// How long, past its own timeout, a call waits for a Solve that is still arriving (its
    /// first message read in part): `--routing-buffer-wait`, the longest such a message waits
    /// for room. Bounds the wait a Solve that stalls mid-message can impose on its ref's calls.
    pub arriving_wait: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            linger: Duration::from_secs(120),
            ttl: Duration::from_secs(24 * 3600),
            unbound_expiry: Duration::from_secs(60),
            arriving_wait: Duration::from_secs(30),
        }
    }
}

/// One running build, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildRecord {
    pub backend: Arc<str>,
    #[serde(skip)]
    pub started: Instant,
    /// Why placement chose the backend (`placement_total` reason).
    pub reason: &'static str,
    /// Rank of the backend for the build's affinity key (0 = home).
    pub rank: usize,
    /// Where the affinity key came from ("none" without one).
    pub key_source: &'static str,
    /// A short hash of the affinity key (never the raw key).
    pub key_hash: Option<String>,
    /// buildx's probe build.
    pub internal: bool,
}

/// The routing state of live builds.
pub struct Registry {
    builds: DashMap<Arc<str>, BuildRecord>,
    refs: DashMap<Arc<str>, Arc<Slot>>,
    sessions: DashMap<Arc<str>, Arc<Slot>>,
    /// Serialises bind decisions (never held across an await).
    bind_lock: Mutex<()>,
    settings: RegistrySettings,
}

impl Registry {
    pub fn new(settings: RegistrySettings) -> Arc<Self> {
        Arc::new(Self {
            builds: DashMap::new(),
            refs: DashMap::new(),
            sessions: DashMap::new(),
            bind_lock: Mutex::new(()),
            settings,
        })
    }

    fn map(&self, kind: KeyKind) -> &DashMap<Arc<str>, Arc<Slot>> {
        match kind {
            KeyKind::Ref => &self.refs,
            KeyKind::Session => &self.sessions,
        }
    }

    fn slot(&self, kind: KeyKind, key: &str) -> Arc<Slot> {
        let map = self.map(kind);
        if let Some(slot) = map.get(key) {
            return slot.clone();
        }
        let now = Instant::now();
        map.entry(Arc::from(key))
            .or_insert_with(|| Slot::new(now, now + self.settings.unbound_expiry))
            .clone()
    }

    fn pin(&self, slot: &Arc<Slot>) -> Pin {
        slot.pins.fetch_add(1, Ordering::AcqRel);
        Pin {
            slot: slot.clone(),
            linger: self.settings.linger,
        }
    }

    /// The backend a ref or session is bound to, if any. Lock-free.
    pub fn lookup(&self, kind: KeyKind, key: &str) -> Option<Arc<Backend>> {
        self.map(kind).get(key).and_then(|slot| slot.bound())
    }

    /// Waits up to `timeout` for `key` to be bound, and past it while a Solve naming the ref
    /// is arriving ([`Registry::solve_arriving`]). `None` as soon as it is refused
    /// ([`Registry::refuse`]), or once the timeout passed and no Solve is arriving.
    pub async fn wait_bound(
        &self,
        kind: KeyKind,
        key: &str,
        timeout: Duration,
    ) -> Option<Arc<Backend>> {
        let arriving_until = Instant::now() + timeout + self.settings.arriving_wait;
        self.wait_bound_by(kind, key, timeout, arriving_until).await
    }

    /// [`Registry::wait_bound`], waiting for an arriving Solve until `arriving_until` (a call's
    /// absolute deadline, for a caller that waits in several steps).
    pub async fn wait_bound_by(
        &self,
        kind: KeyKind,
        key: &str,
        timeout: Duration,
        arriving_until: Instant,
    ) -> Option<Arc<Backend>> {
        let slot = self.slot(kind, key);
        slot.wait_until_arrived(timeout, arriving_until, |bound| {
            bound.is_some() || slot.is_refused()
        })
        .await
        .flatten()
    }

    /// How long past its own timeout a call waits for a Solve still arriving
    /// ([`RegistrySettings::arriving_wait`]).
    pub fn arriving_wait(&self) -> Duration {
        self.settings.arriving_wait
    }

    /// Whether a Solve naming `build_ref` is arriving ([`Registry::solve_arriving`]).
    pub fn is_arriving(&self, build_ref: &str) -> bool {
        self.refs
            .get(build_ref)
            .is_some_and(|slot| slot.arriving.load(Ordering::Acquire) > 0)
    }

    /// Records that the router refused the build `build_ref` itself (its Solve got `code` and
    /// `message` and reached no daemon): calls waiting for the ref are woken and see
    /// [`Registry::refusal`], until a Solve naming the ref arrives again
    /// ([`Registry::solve_arriving`]) or binds it. The entry is swept like any unbound one
    /// (`unbound_expiry`).
    pub fn refuse(&self, build_ref: &str, code: u32, message: &str, connection: u64) {
        let slot = self.slot(KeyKind::Ref, build_ref);
        if slot.bound().is_some() {
            return;
        }
        *slot.refused.lock().expect("refusal lock") = Some(Refused {
            code,
            message: Arc::from(message),
            connection,
        });
        // Wakes `wait_bound` (the value is unchanged; its waiters check the refusal too).
        slot.backend.send_modify(|_| {});
    }

    /// A Solve naming `build_ref` arrives (its leading bytes named it; the rest of its first
    /// message may still be coming, or waiting for room in the routing buffer): a refusal of an
    /// earlier Solve with the same ref no longer speaks for the build (a client that retries
    /// with the same request), and the ref's calls wait for this Solve, past their timeout,
    /// while the returned guard lives (until the Solve is bound or refused, or ends).
    pub fn solve_arriving(&self, build_ref: &str) -> Arriving {
        let slot = self.slot(KeyKind::Ref, build_ref);
        slot.arriving.fetch_add(1, Ordering::AcqRel);
        let cleared = slot.refused.lock().expect("refusal lock").take().is_some();
        if cleared {
            // Wakes `wait_refusal_cleared`.
            slot.backend.send_modify(|_| {});
        }
        Arriving { slot }
    }

    /// Waits up to `within` for a refusal of `build_ref` to be cleared by a Solve naming the
    /// ref ([`Registry::solve_arriving`]) or binding it. True when it was (or there is none).
    pub async fn wait_refusal_cleared(&self, build_ref: &str, within: Duration) -> bool {
        let slot = self.slot(KeyKind::Ref, build_ref);
        slot.wait_until(within, |bound| bound.is_some() || !slot.is_refused())
            .await
            .is_some()
    }

    /// How the router refused `build_ref`, if it did and no Solve named or bound the ref since.
    pub fn refusal(&self, build_ref: &str) -> Option<Refused> {
        let slot = self.refs.get(build_ref)?;
        if slot.bound().is_some() {
            return None;
        }
        slot.refusal()
    }

    /// Whether a Solve naming `build_ref` and `sessions` is already tied to a backend.
    pub fn precheck(&self, build_ref: &str, sessions: &[&str]) -> Precheck {
        if let Some(backend) = self.lookup(KeyKind::Ref, build_ref) {
            return Precheck::Pinned(backend);
        }
        match sessions
            .iter()
            .find_map(|s| self.lookup(KeyKind::Session, s))
        {
            Some(backend) => Precheck::Pinned(backend),
            None => Precheck::Free,
        }
    }

    /// Binds a Solve's ref and every session it names to one backend, atomically.
    ///
    /// If another Solve bound one of the sessions (or the ref) meanwhile, that binding wins and
    /// `chosen` is ignored: builds that share a session must share a daemon.
    pub fn bind_solve(
        &self,
        build_ref: &str,
        sessions: &[&str],
        chosen: Arc<Backend>,
    ) -> BoundBuild {
        let _guard = self.bind_lock.lock().expect("bind lock");
        let ref_slot = self.slot(KeyKind::Ref, build_ref);
        let session_slots: Vec<Arc<Slot>> = sessions
            .iter()
            .map(|s| self.slot(KeyKind::Session, s))
            .collect();
        let existing = ref_slot
            .bound()
            .or_else(|| session_slots.iter().find_map(|slot| slot.bound()));
        let pinned_by_session = existing.is_some();
        let backend = existing.unwrap_or(chosen);
        let mut pins = Vec::with_capacity(1 + session_slots.len());
        for (slot, key) in std::iter::once((&ref_slot, build_ref))
            .chain(session_slots.iter().zip(sessions.iter().copied()))
        {
            match slot.bound() {
                None => {
                    slot.backend.send_replace(Some(backend.clone()));
                }
                Some(other) if !Arc::ptr_eq(&other, &backend) => {
                    tracing::warn!(
                        build_ref,
                        key,
                        bound = %other.identity(),
                        backend = %backend.identity(),
                        "a session named by this build is already bound to another backend; keeping its binding"
                    );
                }
                Some(_) => {}
            }
            pins.push(self.pin(slot));
        }
        BoundBuild {
            backend,
            pinned_by_session,
            pins,
        }
    }

    /// Binds a session no Solve named within the bind window, unless one did meanwhile.
    /// `place` runs under the bind lock only when the session is still unbound.
    pub fn bind_session<E>(
        &self,
        session: &str,
        place: impl FnOnce() -> Result<Arc<Backend>, E>,
    ) -> Result<(Arc<Backend>, bool), E> {
        let _guard = self.bind_lock.lock().expect("bind lock");
        let slot = self.slot(KeyKind::Session, session);
        if let Some(backend) = slot.bound() {
            return Ok((backend, false));
        }
        let backend = place()?;
        slot.backend.send_replace(Some(backend.clone()));
        Ok((backend, true))
    }

    /// Keeps a session bound while its stream is open.
    pub fn pin_session(&self, session: &str) -> Pin {
        let slot = self.slot(KeyKind::Session, session);
        self.pin(&slot)
    }

    /// Records a running build for `/status`.
    pub fn record_build(&self, build_ref: Arc<str>, record: BuildRecord) {
        self.builds.insert(build_ref, record);
    }

    /// Forgets a build that ended.
    pub fn end_build(&self, build_ref: &str) {
        self.builds.remove(build_ref);
    }

    /// The running builds, oldest first.
    pub fn running_builds(&self) -> Vec<(Arc<str>, BuildRecord)> {
        let mut builds: Vec<_> = self
            .builds
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        builds.sort_by_key(|(_, record)| record.started);
        builds
    }

    /// Removes expired slots. Returns how many were removed.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let ttl = self.settings.ttl;
        let mut removed = 0;
        for map in [&self.refs, &self.sessions] {
            map.retain(|_, slot| {
                let expired = now.duration_since(slot.created) > ttl
                    || (slot.pins.load(Ordering::Acquire) == 0
                        && slot.arriving.load(Ordering::Acquire) == 0
                        && *slot.expires.lock().expect("expiry lock") <= now);
                removed += usize::from(expired);
                !expired
            });
        }
        removed
    }

    /// Sweeps every `interval`, forever.
    pub async fn run_sweeper(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            let removed = self.sweep();
            if removed > 0 {
                tracing::debug!(removed, "swept expired routing entries");
            }
        }
    }

    /// Number of (refs, sessions) tracked.
    pub fn len(&self) -> (usize, usize) {
        (self.refs.len(), self.sessions.len())
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty() && self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{
        BackendAddress, EndpointSpec, EndpointState, Pool, PoolSettings, PoolUpdate,
    };

    fn backends(n: usize) -> Vec<Arc<Backend>> {
        let pool = Pool::new(PoolSettings::default());
        let specs = (0..n)
            .map(|i| EndpointSpec {
                identity: format!("bk-{i}"),
                address: BackendAddress::tcp("127.0.0.1", 1000 + i as u16),
                state: EndpointState::Ready,
                zone: None,
                node: None,
            })
            .collect();
        pool.apply(PoolUpdate::Reset(specs));
        pool.snapshot().backends.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_waiting_for_its_solve_wakes_when_bound() {
        let registry = Registry::new(RegistrySettings::default());
        let b = backends(1);
        let waiter = {
            let registry = registry.clone();
            tokio::spawn(async move {
                registry
                    .wait_bound(KeyKind::Ref, "r1", Duration::from_secs(5))
                    .await
            })
        };
        tokio::task::yield_now().await;
        let bound = registry.bind_solve("r1", &["s1"], b[0].clone());
        assert!(!bound.pinned_by_session);
        let got = waiter.await.expect("join").expect("bound");
        assert!(Arc::ptr_eq(&got, &b[0]));
        assert!(Arc::ptr_eq(
            &registry.lookup(KeyKind::Session, "s1").expect("session"),
            &b[0]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_an_unknown_ref_gives_up_after_the_timeout() {
        let registry = Registry::new(RegistrySettings::default());
        let started = Instant::now();
        assert!(registry
            .wait_bound(KeyKind::Ref, "nope", Duration::from_secs(5))
            .await
            .is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_waiting_for_a_refused_solve_ends_at_once() {
        let registry = Registry::new(RegistrySettings::default());
        let waiter = {
            let registry = registry.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let bound = registry
                    .wait_bound(KeyKind::Ref, "r1", Duration::from_secs(5))
                    .await;
                (bound.is_none(), started.elapsed())
            })
        };
        tokio::task::yield_now().await;
        registry.refuse("r1", 8, "too large", 1);
        let (unbound, waited) = waiter.await.expect("join");
        assert!(unbound);
        assert_eq!(
            waited,
            Duration::ZERO,
            "woken by the refusal, not the timeout"
        );
        let refused = registry.refusal("r1").expect("refusal recorded");
        assert_eq!((refused.code, &*refused.message), (8, "too large"));
        // A later call waiting for the same ref does not wait either.
        let started = Instant::now();
        assert!(registry
            .wait_bound(KeyKind::Ref, "r1", Duration::from_secs(5))
            .await
            .is_none());
        assert_eq!(started.elapsed(), Duration::ZERO);
        // A refusal stands until a Solve naming the ref again clears it (a client retrying the
        // same request); then calls wait for that Solve as for any other.
        let started = Instant::now();
        assert!(
            !registry
                .wait_refusal_cleared("r1", Duration::from_millis(250))
                .await
        );
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        let retry = {
            let registry = registry.clone();
            tokio::spawn(async move {
                registry
                    .wait_refusal_cleared("r1", Duration::from_millis(250))
                    .await
            })
        };
        tokio::task::yield_now().await;
        // Gone at once: the Solve's client went away.
        drop(registry.solve_arriving("r1"));
        assert!(retry.await.expect("join"), "woken by the new Solve");
        assert!(registry.refusal("r1").is_none());
        let started = Instant::now();
        assert!(registry
            .wait_bound(KeyKind::Ref, "r1", Duration::from_secs(5))
            .await
            .is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // A Solve that binds the ref after all wins over a refusal.
        registry.refuse("r1", 8, "too large", 1);
        registry.bind_solve("r1", &[], backends(1)[0].clone());
        assert!(registry.refusal("r1").is_none());
        assert!(registry.refusal("never-seen").is_none());
    }

    /// A Solve whose first message is still being read (it waits for room in the routing
    /// buffer) keeps its build's calls waiting past their timeout, until it is bound, refused,
    /// or gone.
    #[tokio::test(start_paused = true)]
    async fn calls_wait_past_their_timeout_while_their_solve_is_arriving() {
        let registry = Registry::new(RegistrySettings {
            // Far beyond the minutes below (bounded: `a_stalled_arriving_solve_...`).
            arriving_wait: Duration::from_secs(3600),
            ..RegistrySettings::default()
        });
        let b = backends(1);
        let wait = |build_ref: &'static str| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let bound = registry
                    .wait_bound(KeyKind::Ref, build_ref, Duration::from_secs(5))
                    .await;
                (bound, started.elapsed())
            })
        };
        // Bound after 60 s.
        let arriving = registry.solve_arriving("bound");
        assert!(registry.is_arriving("bound"));
        let waiter = wait("bound");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !waiter.is_finished(),
            "still waiting for the arriving Solve"
        );
        let _bound = registry.bind_solve("bound", &[], b[0].clone());
        drop(arriving);
        let (bound, waited) = waiter.await.expect("join");
        assert!(bound.is_some_and(|got| Arc::ptr_eq(&got, &b[0])));
        assert_eq!(waited, Duration::from_secs(60));
        assert!(!registry.is_arriving("bound"));

        // Refused after 60 s: the refusal is recorded before the guard goes.
        let arriving = registry.solve_arriving("refused");
        let waiter = wait("refused");
        tokio::time::sleep(Duration::from_secs(60)).await;
        registry.refuse("refused", 8, "no room", 1);
        drop(arriving);
        let (bound, waited) = waiter.await.expect("join");
        assert!(bound.is_none());
        assert_eq!(waited, Duration::from_secs(60));
        assert!(registry.refusal("refused").is_some());

        // Gone after 60 s (the client vanished): the waiter ends then, unbound.
        let arriving = registry.solve_arriving("gone");
        let waiter = wait("gone");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiter.is_finished());
        drop(arriving);
        let (bound, waited) = waiter.await.expect("join");
        assert!(bound.is_none());
        assert_eq!(waited, Duration::from_secs(60));

        // Gone before the timeout: the usual wait.
        drop(registry.solve_arriving("brief"));
        let (bound, waited) = wait("brief").await.expect("join");
        assert!(bound.is_none());
        assert_eq!(waited, Duration::from_secs(5));

        // An arriving Solve's slot is not swept under it.
        let arriving = registry.solve_arriving("slow");
        tokio::time::advance(Duration::from_secs(3600)).await;
        registry.sweep();
        assert!(registry.is_arriving("slow"));
        drop(arriving);
        registry.sweep();
        assert!(!registry.is_arriving("slow"));
    }

    /// A Solve that names its ref and then stalls mid-message holds its ref's calls for at most
    /// `arriving_wait` past their own timeout.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_arriving_solve_holds_calls_at_most_the_arriving_wait() {
        let registry = Registry::new(RegistrySettings {
            arriving_wait: Duration::from_secs(30),
            ..RegistrySettings::default()
        });
        let _stalled = registry.solve_arriving("stalled");
        let started = Instant::now();
        let bound = registry
            .wait_bound(KeyKind::Ref, "stalled", Duration::from_secs(5))
            .await;
        assert!(bound.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(35));
        assert!(
            registry.is_arriving("stalled"),
            "the Solve itself is untouched"
        );
    }

    #[test]
    fn solves_sharing_a_session_agree_on_one_backend() {
        let registry = Registry::new(RegistrySettings::default());
        let b = backends(2);
        let first = registry.bind_solve("ra", &["own-a", "shared"], b[0].clone());
        // The second target was placed elsewhere, but the shared session wins.
        let second = registry.bind_solve("rb", &["own-b", "shared"], b[1].clone());
        assert!(Arc::ptr_eq(&first.backend, &second.backend));
        assert!(second.pinned_by_session);
        assert!(Arc::ptr_eq(
            &registry.lookup(KeyKind::Session, "own-b").expect("own-b"),
            &b[0]
        ));
    }

    #[test]
    fn a_session_bound_by_fallback_pins_the_later_solve() {
        let registry = Registry::new(RegistrySettings::default());
        let b = backends(2);
        let (backend, placed) = registry
            .bind_session::<()>("s", || Ok(b[1].clone()))
            .expect("bind");
        assert!(placed);
        assert!(Arc::ptr_eq(&backend, &b[1]));
        assert!(
            matches!(registry.precheck("r", &["s"]), Precheck::Pinned(p) if Arc::ptr_eq(&p, &b[1]))
        );
        let bound = registry.bind_solve("r", &["s"], b[0].clone());
        assert!(Arc::ptr_eq(&bound.backend, &b[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_linger_after_the_build_then_are_swept() {
        let settings = RegistrySettings {
            linger: Duration::from_secs(60),
            ..Default::default()
        };
        let registry = Registry::new(settings);
        let b = backends(1);
        let bound = registry.bind_solve("r", &["s"], b[0].clone());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(registry.sweep(), 0, "pinned while the Solve runs");
        drop(bound);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(registry.sweep(), 0, "still lingering");
        assert!(registry.lookup(KeyKind::Ref, "r").is_some());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(registry.sweep(), 2);
        assert!(registry.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn slots_made_by_waiters_that_never_bind_expire() {
        let registry = Registry::new(RegistrySettings::default());
        let _ = registry
            .wait_bound(KeyKind::Ref, "ghost", Duration::from_millis(10))
            .await;
        assert_eq!(registry.len(), (1, 0));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(registry.sweep(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_ttl_is_a_backstop_even_for_pinned_entries() {
        let settings = RegistrySettings {
            ttl: Duration::from_secs(100),
            ..Default::default()
        };
        let registry = Registry::new(settings);
        let b = backends(1);
        let _bound = registry.bind_solve("r", &[], b[0].clone());
        tokio::time::advance(Duration::from_secs(101)).await;
        assert_eq!(registry.sweep(), 1);
    }
}
