//! Admission, the async side: the router's builds wait here for a backend with room.
//!
//! [`crate::queue::Queue`] decides (pure); this room runs it. One dispatcher task calls
//! [`Queue::dispatch`] whenever something may have freed or taken room: a build pushed, a build
//! ended, the pool changed ([`Pool::changed`]), a timeout due. The queue sits behind a short
//! `Mutex`, never held across an await; an admitted build is counted in its backend's load
//! (`Backend::start_build`) before the lock is released, so no other decision can take its slot.
//!
//! A waiting build is visible to the rest of the router by its ref ([`Admission::progress_of`])
//! and by the sessions it names ([`Admission::queued_session`]): Status streams show the wait,
//! LLBBridge calls and Sessions wait for the placement instead of timing out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::grpc::code;
use crate::metrics::Metrics;
use crate::placement::{BuildTraits, Choice, Placement, PlacementError};
use crate::pool::{Backend, LoadGuard, Pool};
use crate::queue::{Lease, Outcome, PoolState, Queue, QueueConfig, Ticket, Waiting};

/// Where a queued build stands, for its Status stream and its other calls.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting: `ahead` builds are served before it; `pool` is what the pool looks like.
    Waiting {
        ahead: usize,
        queued: usize,
        pool: PoolState,
    },
    /// Admitted onto this backend.
    Placed(Arc<Backend>),
    /// Left the queue without a backend (timed out, refused, cancelled), with the gRPC code
    /// and message its other calls answer with.
    Ended { code: u32, message: Arc<str> },
}

impl Progress {
    fn ended(code: u32, message: impl Into<Arc<str>>) -> Self {
        Progress::Ended {
            code,
            message: message.into(),
        }
    }
}

/// A build's place on a backend, from admission until it ends.
pub struct Admitted {
    pub backend: Arc<Backend>,
    pub choice: Choice,
    /// Counts the build in the backend's load.
    pub load: LoadGuard,
    /// Counts the build against its tenant's cap until dropped.
    pub lease: LeaseGuard,
    /// Time spent waiting.
    pub waited: Duration,
}

/// Why a build was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Waited `--queue-timeout`: RESOURCE_EXHAUSTED.
    #[error("{0}")]
    TimedOut(String),
    /// No backend can ever take it (strict platforms).
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// The router is shutting down.
    #[error("buildkit-router is shutting down; the build was never started")]
    ShuttingDown,
}

/// Gives a tenant's slot back when the build ends.
pub struct LeaseGuard {
    admission: Arc<Admission>,
    lease: Option<Lease>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.admission.lock().finish(lease);
            self.admission.kick.notify_one();
        }
    }
}

/// What the queue holds for each waiting build.
struct Waiter {
    build_ref: Arc<str>,
    verdict: oneshot::Sender<Result<Admitted, Refusal>>,
    progress: watch::Sender<Progress>,
}

/// The queue and the dispatcher that serves it.
pub struct Admission {
    queue: Mutex<Queue<Waiter>>,
    placement: Placement,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    /// Wakes the dispatcher: a build was pushed or a lease was given back.
    kick: Notify,
    /// Wakes calls that wait for a build to appear (its Status or Session came first).
    arrivals: Notify,
    /// Queued builds by ref.
    by_ref: DashMap<Arc<str>, watch::Receiver<Progress>>,
    /// Sessions named by queued builds -> their build's ref.
    sessions: DashMap<Arc<str>, Arc<str>>,
    /// Builds waiting, after each decision round ([`Admission::queued_changes`]).
    queued_now: watch::Sender<usize>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("queued", &self.by_ref.len())
            .finish()
    }
}

/// Removes a build from the queue if its waiter goes away first (the client cancelled).
struct Pending<'a> {
    admission: &'a Admission,
    ticket: Ticket,
    build_ref: Arc<str>,
    sessions: &'a [Arc<str>],
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.admission.forget(&self.build_ref, self.sessions);
        if !self.done {
            let cancelled = self.admission.lock().cancel(self.ticket);
            if let Some(waiter) = cancelled {
                waiter.progress.send_replace(Progress::ended(
                    code::CANCELLED,
                    "buildkit-router: the build was cancelled by its client while queued",
                ));
                info!(build_ref = %self.build_ref, "build cancelled by its client while queued");
            }
            self.admission.kick.notify_one();
        }
    }
}

impl Admission {
    pub fn new(
        config: QueueConfig,
        placement: Placement,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue::new(config)),
            placement,
            pool,
            metrics,
            kick: Notify::new(),
            arrivals: Notify::new(),
            by_ref: DashMap::new(),
            sessions: DashMap::new(),
            queued_now: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<Waiter>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a backend with room for the build `build_ref` (naming `sessions`), in its
    /// tenant's turn; `Err` when it timed out or can never be placed. Dropping the future takes
    /// the build out of the queue at once.
    pub async fn admit(
        self: &Arc<Self>,
        build_ref: Arc<str>,
        sessions: &[Arc<str>],
        tenant: &str,
        traits: BuildTraits,
    ) -> Result<Admitted, Refusal> {
        let (verdict_tx, verdict_rx) = oneshot::channel();
        let (progress_tx, progress_rx) = watch::channel(Progress::Waiting {
            ahead: 0,
            queued: 0,
            pool: PoolState::default(),
        });
        let (ticket, waits) = {
            let mut queue = self.lock();
            let ticket = queue.push(
                Instant::now().into_std(),
                tenant,
                traits,
                Waiter {
                    build_ref: build_ref.clone(),
                    verdict: verdict_tx,
                    progress: progress_tx,
                },
            );
            self.dispatch_locked(&mut queue);
            let waits = queue.contains(ticket);
            if waits {
                // Visible to its other calls only while it really waits (under the lock, so
                // the dispatcher cannot admit it in between).
                self.by_ref.insert(build_ref.clone(), progress_rx);
                for s in sessions {
                    self.sessions.insert(s.clone(), build_ref.clone());
                }
            }
            (ticket, waits)
        };
        if waits {
            self.arrivals.notify_waiters();
            // The dispatcher recomputes its next timeout with this build in the queue.
            self.kick.notify_one();
        }
        let mut pending = Pending {
            admission: self,
            ticket,
            build_ref,
            sessions,
            done: false,
        };
        let verdict = verdict_rx.await.unwrap_or(Err(Refusal::ShuttingDown));
        pending.done = true;
        verdict
    }

    fn forget(&self, build_ref: &Arc<str>, sessions: &[Arc<str>]) {
        self.by_ref.remove(build_ref);
        for s in sessions {
            self.sessions.remove_if(s, |_, r| r == build_ref);
        }
    }

    /// Fires whenever a build enters the queue (create the `notified()` future before checking
    /// [`Admission::progress_of`], then await it).
    pub fn arrivals(&self) -> &Notify {
        &self.arrivals
    }

    /// Where the queued build `build_ref` stands; `None` when it is not queued.
    pub fn progress_of(&self, build_ref: &str) -> Option<watch::Receiver<Progress>> {
        self.by_ref.get(build_ref).map(|r| r.clone())
    }

    /// The progress of the queued build that names session `id`, if any.
    pub fn queued_session(&self, id: &str) -> Option<watch::Receiver<Progress>> {
        let build_ref = self.sessions.get(id)?.clone();
        self.progress_of(&build_ref)
    }

    /// The number of builds waiting, updated after every decision round (a build pushed,
    /// admitted, timed out or cancelled): the KEDA scaler reacts to a first queued build at once.
    pub fn queued_changes(&self) -> watch::Receiver<usize> {
        self.queued_now.subscribe()
    }

    /// Builds waiting now.
    pub fn queued(&self) -> usize {
        self.lock().len()
    }

    /// Every waiting build with its ref, in serving order (for `/status`).
    pub fn waiting(&self) -> Vec<(Arc<str>, Waiting)> {
        let queue = self.lock();
        let now = Instant::now().into_std();
        let refs: HashMap<Ticket, Arc<str>> = queue
            .payloads()
            .map(|(t, w)| (t, w.build_ref.clone()))
            .collect();
        queue
            .waiting(now)
            .into_iter()
            .filter_map(|w| refs.get(&w.ticket).map(|r| (r.clone(), w)))
            .collect()
    }

    /// Serves the queue until `shutdown`: on every push, lease given back, pool change, and
    /// timeout due. At shutdown every waiting build is refused.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let deadline = self.lock().next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.kick.notified() => {}
                _ = self.pool.changed().notified() => {}
                _ = sleep => {}
            }
            let mut queue = self.lock();
            self.dispatch_locked(&mut queue);
        }
        let mut queue = self.lock();
        for (ticket, _) in queue.payloads().map(|(t, _)| (t, ())).collect::<Vec<_>>() {
            if let Some(waiter) = queue.cancel(ticket) {
                waiter.progress.send_replace(Progress::ended(
                    code::UNAVAILABLE,
                    Refusal::ShuttingDown.to_string(),
                ));
                let _ = waiter.verdict.send(Err(Refusal::ShuttingDown));
            }
        }
        self.metrics.set_queued(&[]);
        self.queued_now.send_replace(0);
    }

    /// One decision round, under the lock: admit what fits, end what timed out, tell every
    /// waiting build where it stands.
    fn dispatch_locked(self: &Arc<Self>, queue: &mut Queue<Waiter>) {
        if queue.is_empty() {
            self.metrics.set_queued(&[]);
            self.queued_now
                .send_if_modified(|n| std::mem::replace(n, 0) != 0);
            return;
        }
        let snapshot = self.pool.snapshot();
        let now = Instant::now().into_std();
        let outcomes = queue.dispatch(now, &self.placement, &snapshot.backends);
        // The gauges first: a client told its verdict may read them at once.
        self.metrics
            .set_queued(&queue.queued_by_tenant(crate::queue::DEFAULT_TENANT_LABELS));
        for outcome in outcomes {
            match outcome {
                Outcome::Admitted {
                    payload,
                    choice,
                    lease,
                    waited,
                    home_first,
                    ..
                } => {
                    let backend = snapshot.backends[choice.index].clone();
                    let load = backend.start_build();
                    self.metrics
                        .queue_wait_seconds
                        .observe(waited.as_secs_f64());
                    if waited > Duration::from_millis(1) {
                        info!(build_ref = %payload.build_ref, backend = %backend.identity(), waited_seconds = waited.as_secs_f64(), home_first, "queued build admitted");
                    }
                    payload
                        .progress
                        .send_replace(Progress::Placed(backend.clone()));
                    let admitted = Admitted {
                        backend,
                        choice,
                        load,
                        lease: LeaseGuard {
                            admission: self.clone(),
                            lease: Some(lease),
                        },
                        waited,
                    };
                    if let Err(Ok(unclaimed)) = payload.verdict.send(Ok(admitted)) {
                        // The client left in the same instant: give the slot back (outside
                        // the lock: the lease guard takes it).
                        let Admitted { lease, .. } = unclaimed;
                        let mut lease = lease;
                        if let Some(l) = lease.lease.take() {
                            queue.finish(l);
                        }
                    }
                }
                Outcome::TimedOut(timed_out) => {
                    let message = timed_out.message();
                    warn!(build_ref = %timed_out.payload.build_ref, waited_seconds = timed_out.waited.as_secs_f64(), position = timed_out.position, "queued build timed out");
                    self.metrics.queue_timeouts_total.inc();
                    timed_out.payload.progress.send_replace(Progress::ended(
                        code::RESOURCE_EXHAUSTED,
                        format!("{message} (build {})", timed_out.payload.build_ref),
                    ));
                    let _ = timed_out
                        .payload
                        .verdict
                        .send(Err(Refusal::TimedOut(message)));
                }
                Outcome::Rejected { payload, error, .. } => {
                    let code = match error {
                        PlacementError::NoPlatform { .. } => code::FAILED_PRECONDITION,
                        _ => code::UNAVAILABLE,
                    };
                    payload.progress.send_replace(Progress::ended(
                        code,
                        format!("buildkit-router: {error} for build {}", payload.build_ref),
                    ));
                    let _ = payload.verdict.send(Err(Refusal::Placement(error)));
                }
            }
        }
        // Tell every waiting build where it stands now.
        let pool = PoolState::of(&self.placement, &snapshot.backends);
        let queued = queue.len();
        for (ticket, waiter) in queue.payloads() {
            let ahead = queue.position(ticket).unwrap_or(0);
            waiter.progress.send_if_modified(|p| {
                let next = Progress::Waiting {
                    ahead,
                    queued,
                    pool,
                };
                let changed = !matches!(p, Progress::Waiting { ahead: a, queued: q, pool: s } if *a == ahead && *q == queued && *s == pool);
                if changed {
                    *p = next;
                }
                changed
            });
        }
        let queued = queue.len();
        self.queued_now
            .send_if_modified(|n| std::mem::replace(n, queued) != queued);
    }
}
