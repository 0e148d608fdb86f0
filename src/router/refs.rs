//! Where a build's calls go: bound to a backend, waiting in the queue, or found in a daemon's
//! history.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::Response;
use tokio::time::Instant;
use tracing::info;

use super::base::{error, ConnState, Router};
use crate::admission::Progress;
use crate::body::ResponseBody;
use crate::forward::{self, code, Head};
use crate::pool::Backend;
use crate::registry::{KeyKind, Refused};
use crate::wire;

pub(super) const HISTORY_PATH: &str = "/moby.buildkit.v1.Control/ListenBuildHistory";
/// How long a call for an unknown ref waits for its Solve before daemons' histories are asked.
pub(super) const LOCATE_AFTER: Duration = Duration::from_secs(1);
/// How long a call that finds its build refused waits for a new Solve naming the ref before it
/// ends: a client that retries with the same ref sends its new Solve beside the call.
pub(super) const REFUSAL_GRACE: Duration = Duration::from_millis(250);
/// [`REFUSAL_GRACE`] for a call on the refused Solve's own connection. buildctl sends its
/// Status and Ping beside the Solve, so they may reach the router after the refusal: they are
/// the refused build's own and should end at once. A retry on that connection would send its
/// new Solve on the same stream of bytes right beside its call, so a few ms cover it.
pub(super) const SAME_CONNECTION_REFUSAL_GRACE: Duration = Duration::from_millis(20);

/// Where a build's calls go.
pub(super) enum RefState {
    Bound(Arc<Backend>),
    Queued(tokio::sync::watch::Receiver<Progress>),
    /// The router refused its Solve itself: no daemon will ever know it.
    Refused(Refused),
    Unknown,
}

/// A queued build's progress once it left the queue (placed or ended), or as last seen if its
/// waiter is gone.
pub(super) async fn settled(progress: &mut tokio::sync::watch::Receiver<Progress>) -> Progress {
    let _ = progress
        .wait_for(|p| !matches!(p, Progress::Waiting { .. }))
        .await;
    progress.borrow().clone()
}

impl Router {
    /// The backend of `build_ref`, waiting up to the ref wait for its Solve, and past it while
    /// that Solve is arriving (its first message is still being read).
    pub(super) async fn backend_of(&self, build_ref: &str) -> Option<Arc<Backend>> {
        match self.registry.lookup(KeyKind::Ref, build_ref) {
            Some(backend) => Some(backend),
            None => {
                self.registry
                    .wait_bound(KeyKind::Ref, build_ref, self.settings.ref_wait)
                    .await
            }
        }
    }

    /// Where the build `build_ref` is: bound to a backend, waiting in the queue, or unknown
    /// after the ref wait (its Solve never came to this router). A Solve whose leading bytes
    /// named the ref but whose first message is still being read is waited for past the ref
    /// wait ([`crate::registry::Registry::solve_arriving`]). `conn` is the call's client
    /// connection.
    pub(super) async fn resolve_ref(&self, build_ref: &str, conn: &ConnState) -> RefState {
        // A refusal recorded before this call may be an earlier attempt's: a client retrying
        // the same request sends its new Solve at the same moment, and that clears it.
        if let Some(refused) = self.registry.refusal(build_ref) {
            let grace = if refused.connection == conn.id.0 {
                SAME_CONNECTION_REFUSAL_GRACE
            } else {
                REFUSAL_GRACE
            };
            if !self.registry.wait_refusal_cleared(build_ref, grace).await {
                return RefState::Refused(refused);
            }
        }
        let Some(admission) = &self.admission else {
            return match self.backend_of(build_ref).await {
                Some(backend) => RefState::Bound(backend),
                None => self.unbound(build_ref),
            };
        };
        let deadline = Instant::now() + self.settings.ref_wait;
        let arriving_until = deadline + self.registry.arriving_wait();
        loop {
            let arrived = admission.arrivals().notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(backend) = self.registry.lookup(KeyKind::Ref, build_ref) {
                return RefState::Bound(backend);
            }
            if let Some(progress) = admission.progress_of(build_ref) {
                return RefState::Queued(progress);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            // A Solve whose first message is still being read is waited for past the ref wait
            // (`wait_bound` too): it may wait for room in the routing buffer.
            if remaining.is_zero()
                && (!self.registry.is_arriving(build_ref) || Instant::now() >= arriving_until)
            {
                return self.unbound(build_ref);
            }
            tokio::select! {
                bound = self.registry.wait_bound_by(KeyKind::Ref, build_ref, remaining, arriving_until) => {
                    return bound.map_or_else(|| self.unbound(build_ref), RefState::Bound);
                }
                _ = arrived => {}
            }
        }
    }

    /// A ref no Solve bound (yet): refused by the router, or unknown.
    fn unbound(&self, build_ref: &str) -> RefState {
        self.registry
            .refusal(build_ref)
            .map_or(RefState::Unknown, RefState::Refused)
    }

    /// The backend whose build history holds `build_ref` (a build another replica placed, or
    /// one this router has forgotten): every live backend is asked with
    /// `ListenBuildHistory{Ref, EarlyExit}`, which answers at once; the first with a record wins.
    pub(super) async fn locate_ref(&self, build_ref: &str) -> Option<Arc<Backend>> {
        use prost::Message;
        let request = wire::encode_frame(
            &crate::proto::control::BuildHistoryRequest {
                r#ref: build_ref.to_owned(),
                early_exit: true,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let head = Head::grpc(HISTORY_PATH);
        let max = self.settings.max_message_size;
        let mut asks: FuturesUnordered<_> = self
            .live_backends()
            .into_iter()
            .map(|backend| {
                let (head, request) = (&head, request.clone());
                async move {
                    let response = forward::send_copy(&backend, head, request).await.ok()?;
                    let collected = forward::collect(response, max).await.ok()?;
                    (collected.status == code::OK && !collected.body.is_empty()).then_some(backend)
                }
            })
            .collect();
        while let Some(found) = asks.next().await {
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// [`Router::resolve_ref`], but a ref that some daemon's history already holds is routed
    /// there without waiting out the ref wait (`buildctl debug logs`, `buildx history` on old
    /// builds). Asked only after a short delay: a new build's Solve binds its ref sooner.
    pub(super) async fn resolve_or_locate(&self, build_ref: &str, conn: &ConnState) -> RefState {
        let resolve = self.resolve_ref(build_ref, conn);
        let locate = async {
            tokio::time::sleep(LOCATE_AFTER).await;
            self.locate_ref(build_ref).await
        };
        tokio::pin!(resolve, locate);
        tokio::select! {
            state = &mut resolve => state,
            Some(backend) = &mut locate => {
                info!(build_ref, backend = %backend.identity(), "found the build in a backend's history");
                RefState::Bound(backend)
            }
        }
    }

    /// Waits while the queued build `progress` belongs to is waiting; its backend once placed,
    /// else the answer its calls get (why it left the queue).
    pub(super) async fn placed(
        &self,
        build_ref: &str,
        mut progress: tokio::sync::watch::Receiver<Progress>,
    ) -> Result<Arc<Backend>, Response<ResponseBody>> {
        match settled(&mut progress).await {
            Progress::Placed(backend) => {
                // Its Solve binds the ref right after admission.
                let bound = self
                    .registry
                    .wait_bound(KeyKind::Ref, build_ref, self.settings.ref_wait)
                    .await;
                Ok(bound.unwrap_or(backend))
            }
            Progress::Ended { code, message } => Err(error(code, &*message)),
            Progress::Waiting { .. } => Err(error(
                code::UNAVAILABLE,
                format!("buildkit-router: build {build_ref} left the queue without a builder"),
            )),
        }
    }
}
