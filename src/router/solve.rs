//! Control/Solve: a new build is admitted (queue), placed, bound, and forwarded; its accounting
//! ends with its answer.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{info, warn};

use super::base::{
    error, error_response_invalid, peek_error, placement_error, unavailable_backend, ConnState,
    Router,
};
use crate::admission::{Admission, Admitted, LeaseGuard, Refusal};
use crate::body::{CallEnd, EndHook, RequestBody, ResponseBody};
use crate::forward::code;
use crate::metrics::Metrics;
use crate::placement::{BuildTraits, Choice, PlacementError, Reason};
use crate::pool::Backend;
use crate::registry::{Arriving, BuildRecord, KeyKind, Precheck, Registry};
use crate::wire;

/// How a queued build got its backend.
pub(super) enum Admit {
    Admitted(Admitted),
    /// A session it names was bound by another build while it waited.
    Pinned(Arc<Backend>),
}

/// Ends a build's accounting exactly once: when its Solve answer ends, or when the Solve is
/// dropped unanswered (client cancel before the daemon answered).
pub(super) struct BuildEnd {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    build_ref: Arc<str>,
    started: Instant,
    load: Option<crate::pool::LoadGuard>,
    /// The build's slot in its tenant's count (queueing on), given back when it ends.
    _lease: Option<LeaseGuard>,
    _pins: Vec<crate::registry::Pin>,
}

impl BuildEnd {
    pub(super) fn finish(mut self, end: CallEnd) {
        self.record(end);
    }

    pub(super) fn record(&mut self, end: CallEnd) {
        let Some(load) = self.load.take() else { return };
        let outcome = outcome_of(end);
        let elapsed = self.started.elapsed();
        let backend = load.backend().identity();
        self.metrics
            .builds_total
            .with_label_values(&[backend, outcome])
            .inc();
        self.metrics
            .build_duration_seconds
            .observe(elapsed.as_secs_f64());
        info!(build_ref = %self.build_ref, backend = %backend, outcome, seconds = elapsed.as_secs_f64(), "build ended");
        self.registry.end_build(&self.build_ref);
    }
}

impl Drop for BuildEnd {
    fn drop(&mut self) {
        self.record(CallEnd::Cancelled);
    }
}

pub(super) fn outcome_of(end: CallEnd) -> &'static str {
    match end {
        CallEnd::Status(0) => "success",
        CallEnd::Status(1) | CallEnd::Cancelled => "cancelled",
        CallEnd::Status(_) => "failed",
    }
}

impl Router {
    /// Runs placement over the current snapshot, skipping `excluded` backends.
    pub(super) fn place(
        &self,
        traits: &BuildTraits,
        excluded: &[Arc<str>],
    ) -> Result<(Arc<Backend>, Choice), PlacementError> {
        let snapshot = self.pool.snapshot();
        if excluded.is_empty() {
            let choice = self.placement.choose(&snapshot.backends, traits)?;
            return Ok((snapshot.backends[choice.index].clone(), choice));
        }
        let candidates: Vec<Arc<Backend>> = snapshot
            .backends
            .iter()
            .filter(|b| !excluded.contains(b.identity()))
            .cloned()
            .collect();
        let choice = self.placement.choose(&candidates, traits)?;
        Ok((candidates[choice.index].clone(), choice))
    }

    /// Waits in the admission queue for a backend with room, or until a session the build
    /// names is bound by another build (bake targets sharing a context): builds sharing a
    /// session share a daemon, so that one's backend is taken without waiting further.
    pub(super) async fn admit(
        &self,
        admission: &Arc<Admission>,
        conn: &ConnState,
        build_ref: &Arc<str>,
        sessions: &[&str],
        traits: &BuildTraits,
    ) -> Result<Admit, Response<ResponseBody>> {
        const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
        let tenant = crate::queue::tenant_of(
            self.settings.tenant_from,
            conn.identity.as_deref(),
            traits.key.as_ref(),
        )
        .to_owned();
        let session_ids: Vec<Arc<str>> = sessions.iter().map(|s| Arc::from(*s)).collect();
        let bound_elsewhere = async {
            if sessions.is_empty() {
                return std::future::pending().await;
            }
            let waits = sessions
                .iter()
                .map(|s| Box::pin(self.registry.wait_bound(KeyKind::Session, s, FOREVER)));
            match futures_util::future::select_all(waits).await {
                (Some(backend), _, _) => backend,
                (None, _, _) => std::future::pending().await,
            }
        };
        tokio::select! {
            verdict = admission.admit(build_ref.clone(), &session_ids, &tenant, traits.clone()) => {
                match verdict {
                    Ok(admitted) => Ok(Admit::Admitted(admitted)),
                    Err(Refusal::TimedOut(message)) => {
                        Err(error(code::RESOURCE_EXHAUSTED, format!("{message} (build {build_ref})")))
                    }
                    Err(Refusal::Placement(e)) => {
                        Err(placement_error(&e, &format!("build {build_ref}"), &self.pool))
                    }
                    Err(e @ Refusal::ShuttingDown) => Err(error(code::UNAVAILABLE, e.to_string())),
                }
            }
            backend = bound_elsewhere => Ok(Admit::Pinned(backend)),
        }
    }

    /// A Solve the router answers itself, before any daemon saw it: the calls of its build
    /// that wait for it (buildctl's Status waits for the Solve's ref, and then up to 5 s more
    /// for progress) end at once, instead of after `--ref-wait`. `build_ref` is `None` when
    /// it could not be read. `arriving` is given up once the refusal is recorded, so the calls
    /// waiting for the Solve see the refusal, not an unknown ref.
    fn refused_solve(
        &self,
        conn: &ConnState,
        build_ref: Option<&str>,
        arriving: Option<Arriving>,
        answer: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        let Some(build_ref) = build_ref else {
            return answer;
        };
        let headers = answer.headers();
        let status = crate::grpc::grpc_status_of(headers).unwrap_or(code::UNKNOWN);
        // A client that gave up on its own Solve (CANCELLED) was not refused.
        if status == code::OK || status == code::CANCELLED {
            return answer;
        }
        info!(build_ref = %build_ref, status, "build refused before reaching a daemon");
        self.metrics
            .builds_refused_total
            .with_label_values(&[crate::metrics::code_name(status)])
            .inc();
        let message = crate::grpc::grpc_message_of(headers);
        let (registry, build_ref, connection) =
            (self.registry.clone(), build_ref.to_owned(), conn.id.0);
        // Recorded once the answer is handed to HTTP/2, so the client has the Solve's own
        // error before its other calls end (buildx reports whichever error comes first).
        answer.map(|body| {
            body.with_hook(EndHook::new(move |_| {
                registry.refuse(&build_ref, status, &message, connection);
                drop(arriving);
            }))
        })
    }

    pub(super) async fn solve(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        // A Solve that cannot be read or decoded still names its build, in the log line of
        // the failure too (Go writes the ref first).
        fn name_build(read: &[u8]) -> Option<&str> {
            let build_ref = wire::leading_solve_ref(read);
            if let Some(build_ref) = build_ref {
                tracing::Span::current().record("build_ref", build_ref);
            }
            build_ref
        }
        // The build's other calls wait for this Solve from its leading bytes on, while the rest
        // of its first message comes or waits for room in the routing buffer.
        let mut arriving: Option<Arriving> = None;
        let announce = |read: &[u8]| {
            let Some(build_ref) = wire::leading_solve_ref(read) else {
                return false;
            };
            tracing::debug!(build_ref, "Solve arriving");
            arriving = Some(self.registry.solve_arriving(build_ref));
            true
        };
        let (parts, body, peeked) = match self.peek_keeping_read(request, announce).await {
            Ok(peeked) => peeked,
            Err((parts, failure)) => {
                let build_ref = name_build(&failure.read);
                let answer = peek_error(parts.uri.path(), &failure.error);
                return self.refused_solve(conn, build_ref, arriving, answer);
            }
        };
        let solve = match wire::decode_solve(peeked.message()) {
            Ok(solve) => solve,
            Err(error) => {
                let build_ref = name_build(&peeked.buffered);
                let answer = error_response_invalid("Control/Solve", &error);
                return self.refused_solve(conn, build_ref, arriving, answer);
            }
        };
        let build_ref: Arc<str> = if solve.build_ref.is_empty() {
            // buildkitd names such a build itself; give it a private registry key so unrelated
            // ref-less Solves never share a binding.
            Arc::from(format!("(unnamed-{:016x})", rand::random::<u64>()))
        } else {
            Arc::from(solve.build_ref)
        };
        tracing::Span::current().record("build_ref", &*build_ref);
        // A Solve whose ref does not come first (not written by Go) arrives only now, and so
        // does one whose leading ref is not the one it decodes to (proto3: the last `Ref` wins):
        // the calls of the ref its leading bytes named stop waiting for it.
        let arriving = arriving
            .filter(|_| wire::leading_solve_ref(&peeked.buffered) == Some(&*build_ref))
            .unwrap_or_else(|| self.registry.solve_arriving(&build_ref));
        let sessions = solve.session_ids();
        // Keyless builds may be keyed by their Dockerfile, read through their held Session.
        let pinned = matches!(
            self.registry.precheck(&build_ref, &sessions),
            Precheck::Pinned(_)
        );
        let traits = self
            .content
            .traits_for_solve(&self.placement, &solve, pinned)
            .await;

        // Choose a backend we can reach before binding anything to it, so a dead pod costs a
        // retry on the next candidate instead of a failed build.
        let mut excluded: Vec<Arc<str>> = Vec::new();
        let mut last_failure: Option<(Arc<Backend>, crate::pool::ConnectError)> = None;
        // With queueing on: the build's slot (load and tenant lease) from admission.
        let mut admitted: Option<Admitted>;
        let pinned = |backend| {
            (
                backend,
                Choice {
                    index: 0,
                    reason: Reason::PinnedSession,
                    rank: 0,
                },
            )
        };
        let (bound, choice) = loop {
            admitted = None;
            let (candidate, choice) = match self.registry.precheck(&build_ref, &sessions) {
                Precheck::Pinned(backend) => pinned(backend),
                Precheck::Free => match &self.admission {
                    // buildx's probe build takes milliseconds: it never waits behind full
                    // daemons, only for a ready one.
                    Some(admission)
                        if !(traits.internal && self.pool.snapshot().any_ready().is_some()) =>
                    {
                        match self
                            .admit(admission, conn, &build_ref, &sessions, &traits)
                            .await
                        {
                            Ok(Admit::Admitted(a)) => {
                                let found = (a.backend.clone(), a.choice);
                                admitted = Some(a);
                                found
                            }
                            Ok(Admit::Pinned(backend)) => pinned(backend),
                            Err(answer) => {
                                return self.refused_solve(
                                    conn,
                                    Some(&build_ref),
                                    Some(arriving),
                                    answer,
                                )
                            }
                        }
                    }
                    _ => match self.place(&traits, &excluded) {
                        Ok(found) => found,
                        Err(error) => {
                            // Every candidate failed to connect: say which and why.
                            let answer = match last_failure {
                                Some((backend, connect_error)) => {
                                    unavailable_backend(&backend, Some(&build_ref), connect_error)
                                }
                                None => placement_error(
                                    &error,
                                    &format!("build {build_ref}"),
                                    &self.pool,
                                ),
                            };
                            return self.refused_solve(
                                conn,
                                Some(&build_ref),
                                Some(arriving),
                                answer,
                            );
                        }
                    },
                },
            };
            if let Err(error) = candidate.sender().await {
                // A failed connect ejects the backend (`Backend::sender`), so admission will
                // not choose it again; without the queue it is excluded explicitly.
                let retry = choice.reason != Reason::PinnedSession
                    && excluded.len() + 1 < self.settings.connect_attempts;
                if retry {
                    warn!(backend = %candidate.identity(), %error, "cannot reach the chosen backend; trying the next candidate");
                    excluded.push(candidate.identity().clone());
                    last_failure = Some((candidate, error));
                    continue;
                }
                let answer = unavailable_backend(&candidate, Some(&build_ref), error);
                return self.refused_solve(conn, Some(&build_ref), Some(arriving), answer);
            }
            let bound = self.registry.bind_solve(&build_ref, &sessions, candidate);
            let choice = if bound.pinned_by_session {
                Choice {
                    reason: Reason::PinnedSession,
                    ..choice
                }
            } else {
                choice
            };
            break (bound, choice);
        };
        // Bound: its calls find the backend now.
        drop(arriving);
        drop(solve);
        let backend = bound.backend.clone();
        let (load, lease) = match admitted {
            // Counted at admission, on the backend the build is bound to.
            Some(a) if Arc::ptr_eq(&a.backend, &backend) => (a.load, Some(a.lease)),
            // A session it names was bound elsewhere meanwhile: builds sharing a session share
            // a daemon, even one at its cap.
            Some(a) => (backend.start_build(), Some(a.lease)),
            None => (backend.start_build(), None),
        };
        let started = Instant::now();
        self.metrics.placement.observe(&choice, &traits);
        let record = BuildRecord {
            backend: backend.identity().clone(),
            started,
            reason: choice.reason.as_str(),
            rank: choice.rank,
            key_source: traits.key_source().as_str(),
            key_hash: traits.key_hash().map(|h| format!("{h:016x}")),
            internal: traits.internal,
        };
        self.registry.record_build(build_ref.clone(), record);
        info!(
            build_ref = %build_ref,
            backend = %backend.identity(),
            reason = choice.reason.as_str(),
            rank = choice.rank,
            key_source = traits.key_source().as_str(),
            key = traits.key.as_ref().map(|k| k.text.as_str()),
            sessions = sessions.len(),
            internal = traits.internal,
            "build placed"
        );
        // Recorded when the answer ends, or when the client gives up before any answer.
        let build_end = BuildEnd {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            build_ref: build_ref.clone(),
            started,
            load: Some(load),
            _lease: lease,
            _pins: bound.pins,
        };
        let response = self
            .forward_to(
                conn,
                &backend,
                Some(&build_ref),
                parts,
                RequestBody::prefixed(peeked.buffered, body).holding(peeked.share),
            )
            .await;
        response.map(|body| body.with_hook(EndHook::new(move |end| build_end.finish(end))))
    }
}
