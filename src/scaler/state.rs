//! The pool's demand and activity: what KEDA is told, recomputed on every queue, load and peer
//! change.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::peers::Peers;
use crate::admission::Admission;
use crate::pool::Pool;

/// The pool's demand and activity, as KEDA is told them.
pub struct Scaler {
    pool: Arc<Pool>,
    admission: Option<Arc<Admission>>,
    target: u64,
    idle: Duration,
    pub(super) instance: Arc<str>,
    /// What KEDA sees: builds anywhere in the pool, or within `idle` of the last one.
    active: watch::Sender<bool>,
    /// This replica alone: builds it queued or started (what peers see, `scope: replica`).
    local_busy: watch::Sender<bool>,
    peers: Arc<Peers>,
}

impl std::fmt::Debug for Scaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scaler")
            .field("instance", &self.instance)
            .field("active", &*self.active.borrow())
            .finish()
    }
}

impl Scaler {
    pub(super) fn new(
        pool: Arc<Pool>,
        admission: Option<Arc<Admission>>,
        target: usize,
        idle: Duration,
        instance: Arc<str>,
        peers: Arc<Peers>,
    ) -> Self {
        Self {
            pool,
            admission,
            target: target.max(1) as u64,
            idle,
            instance,
            active: watch::Sender::new(false),
            local_busy: watch::Sender::new(false),
            peers,
        }
    }

    /// This process's id in [`INSTANCE_HEADER`].
    pub fn instance(&self) -> &Arc<str> {
        &self.instance
    }

    /// Builds running in the pool: per daemon, the larger of what this replica started and
    /// what the daemon reports running (every replica's builds).
    pub fn pool_running(&self) -> u64 {
        self.pool
            .snapshot()
            .backends
            .iter()
            .map(|b| {
                let own = b.active_builds();
                b.reported_builds().map_or(own, |r| r.max(own)) as u64
            })
            .sum()
    }

    /// Builds waiting in this replica's queue.
    pub fn local_queued(&self) -> u64 {
        self.admission.as_ref().map_or(0, |a| a.queued() as u64)
    }

    /// Builds this replica queued or started.
    pub(super) fn local_busy_now(&self) -> bool {
        self.local_queued() > 0
            || self
                .pool
                .snapshot()
                .backends
                .iter()
                .any(|b| b.active_builds() > 0)
    }

    /// Any build queued or running anywhere in the pool, as far as this replica knows now.
    fn busy_now(&self) -> bool {
        self.local_busy_now() || self.pool_running() > 0 || self.peers.any_busy()
    }

    /// What `IsActive` answers: busy now, or within `--scale-to-zero-idle` of the last build.
    /// When this replica knows of nothing, the peers are asked now (a peer whose state stream
    /// is not open yet, e.g. just after a restart, is not missed).
    pub async fn is_active(&self) -> bool {
        self.busy_now() || *self.active.borrow() || self.peers.queued().await > 0
    }

    /// The metric's value: builds running in the pool plus builds queued on every replica
    /// (peers asked now, each bounded by [`super::peers::ASK_TIMEOUT`]).
    pub async fn demand(&self) -> u64 {
        self.pool_running() + self.local_queued() + self.peers.queued().await
    }

    /// Peer replicas whose state this replica follows now (an open `StreamIsActive`).
    pub fn peers_following(&self) -> usize {
        self.peers.following()
    }

    /// `--target-builds-per-backend`.
    pub fn target(&self) -> u64 {
        self.target
    }

    /// Follows the activity state (what `StreamIsActive` pushes).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.active.subscribe()
    }

    /// Follows this replica's own activity (what peers are pushed).
    pub fn subscribe_local(&self) -> watch::Receiver<bool> {
        self.local_busy.subscribe()
    }

    /// Recomputes the activity state on every queue, load and peer change, and when the idle
    /// time runs out. Starts inactive: a restarted router must not wake a pool at zero.
    pub(super) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut load = self.pool.load_changes();
        let mut queued = self.admission.as_ref().map(|a| a.queued_changes());
        let mut peers = self.peers.changes();
        let mut last_busy: Option<Instant> = None;
        let mut was_busy = false;
        loop {
            load.borrow_and_update();
            peers.borrow_and_update();
            if let Some(q) = queued.as_mut() {
                q.borrow_and_update();
            }
            let local = self.local_busy_now();
            self.local_busy
                .send_if_modified(|v| std::mem::replace(v, local) != local);
            let busy = local || self.pool_running() > 0 || self.peers.any_busy();
            let now = Instant::now();
            // The idle window starts when the last build left (ran, timed out or was
            // cancelled), not when it was last seen arriving.
            if busy || was_busy {
                last_busy = Some(now);
            }
            was_busy = busy;
            let idle_until = last_busy.map(|at| at + self.idle);
            let active = busy || idle_until.is_some_and(|until| now < until);
            if self
                .active
                .send_if_modified(|v| std::mem::replace(v, active) != active)
            {
                if active {
                    info!(
                        queued = self.local_queued(),
                        running = self.pool_running(),
                        "scaler: builds waiting or running; reporting active to KEDA"
                    );
                } else {
                    info!(idle = ?self.idle, "scaler: no build for --scale-to-zero-idle; reporting inactive to KEDA");
                }
            }
            let idle_timer = async {
                match idle_until {
                    Some(until) if active && !busy => tokio::time::sleep_until(until).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changed(&mut load) => {}
                _ = changed(&mut peers) => {}
                _ = async {
                    match queued.as_mut() {
                        Some(q) => changed(q).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = idle_timer => {}
            }
        }
    }
}

/// Waits for a change; never returns once the sender is gone (the loop then waits on the rest).
async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
