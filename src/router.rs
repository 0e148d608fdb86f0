//! One request's way: classify it, find its backend (registry, else placement), and hand it to
//! forwarding or the session relay. The only module that knows every other module's role.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderValue, Request, Response};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{field, info, warn, Instrument};

use crate::admission::{Admission, Admitted, LeaseGuard, Progress, Refusal};
use crate::body::{CallEnd, EndHook, RequestBody, ResponseBody, StreamContext};
use crate::classify::{classify, Route};
use crate::forward::{self, code, ForwardError, Head, PeekError};
use crate::grpc::status_trailers;
use crate::metrics::Metrics;
use crate::placement::{BuildTraits, Choice, Placement, PlacementError, Reason};
use crate::pool::{Backend, BackendState, Pool};
use crate::queue::TenantFrom;
use crate::registry::{BuildRecord, KeyKind, Precheck, Registry};
use crate::session;
use crate::waiting;
use crate::wire;
use crate::workers::OfflineAnswers;

/// The header naming an LLBBridge call's build.
pub const BUILD_ID_HEADER: &str = "buildkit-controlapi-buildid";

/// Routing timers and limits.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub session_bind_window: Duration,
    pub ref_wait: Duration,
    pub max_message_size: usize,
    /// How many backends a new build may try when connecting fails before anything was sent.
    pub connect_attempts: usize,
    /// What a tenant of the admission queue is (`--tenant-from`).
    pub tenant_from: TenantFrom,
    /// Where ListWorkers/Info answers are kept across restarts (`--state-dir`).
    pub state_dir: Option<std::path::PathBuf>,
    /// Platforms ListWorkers reports before any daemon was seen (`--default-platforms`).
    pub default_platforms: Vec<String>,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            session_bind_window: Duration::from_secs(3),
            ref_wait: Duration::from_secs(5),
            max_message_size: 16 * 1024 * 1024 + 64 * 1024,
            connect_attempts: 3,
            tenant_from: TenantFrom::KeyOwner,
            state_dir: None,
            default_platforms: Vec::new(),
        }
    }
}

/// What the router remembers about one client connection.
#[derive(Debug, Default)]
pub struct ConnState {
    last_backend: Mutex<Option<Arc<Backend>>>,
    /// The client certificate's identity (mTLS), for `--tenant-from mtls`.
    identity: Option<Arc<str>>,
}

impl ConnState {
    /// A connection whose client presented a certificate naming `identity`.
    pub fn with_identity(identity: Option<Arc<str>>) -> Self {
        Self {
            identity,
            ..Self::default()
        }
    }

    fn last_backend(&self) -> Option<Arc<Backend>> {
        self.last_backend.lock().expect("conn lock").clone()
    }

    fn used(&self, backend: &Arc<Backend>) {
        let mut last = self.last_backend.lock().expect("conn lock");
        if !last.as_ref().is_some_and(|b| Arc::ptr_eq(b, backend)) {
            *last = Some(backend.clone());
        }
    }
}

/// How often a ListWorkers/Info answer is read whole to refresh the cache; in between, answers
/// are relayed frame by frame like any other call.
const CACHE_REFRESH: Duration = Duration::from_secs(30);

/// `LLBBridge/Ping`: answered by the router for queued builds.
const PING_PATH: &str = crate::workers::PING;
const HISTORY_PATH: &str = "/moby.buildkit.v1.Control/ListenBuildHistory";
/// The ref of buildx's history API probe (buildkit-protocol.md, "What one build looks like").
const BUILDX_HISTORY_PROBE: &str = "buildx-test-history-api-feature";
/// How long a call for an unknown ref waits for its Solve before daemons' histories are asked.
const LOCATE_AFTER: Duration = Duration::from_secs(1);

/// Where a build's calls go.
enum RefState {
    Bound(Arc<Backend>),
    Queued(tokio::sync::watch::Receiver<Progress>),
    Unknown,
}

/// How a queued build got its backend.
enum Admit {
    Admitted(Admitted),
    /// A session it names was bound by another build while it waited.
    Pinned(Arc<Backend>),
}

/// Routes every call.
pub struct Router {
    pool: Arc<Pool>,
    registry: Arc<Registry>,
    placement: Placement,
    metrics: Arc<Metrics>,
    settings: RouterSettings,
    /// When each of ListWorkers/Info was last read whole (its answer kept in `offline`).
    refreshed: Mutex<HashMap<&'static str, Instant>>,
    /// The admission queue; `None` with `--queue off` (builds are placed at once).
    admission: Option<Arc<Admission>>,
    /// ListWorkers/Info answers for when no backend is ready.
    offline: OfflineAnswers,
}

fn error(code: u32, message: impl AsRef<str>) -> Response<ResponseBody> {
    forward::status_response(code, message.as_ref())
}

fn unavailable_backend(
    backend: &Backend,
    build_ref: Option<&str>,
    error: impl std::fmt::Display,
) -> Response<ResponseBody> {
    let message = match build_ref {
        Some(r) => format!(
            "buildkit-router: buildkitd backend {} is unavailable for build {r}: {error}",
            backend.label()
        ),
        None => format!(
            "buildkit-router: buildkitd backend {} is unavailable: {error}",
            backend.label()
        ),
    };
    warn!(backend = %backend.identity(), build_ref, %error, "backend unavailable");
    forward::status_response(code::UNAVAILABLE, &message)
}

/// A queued build's progress once it left the queue (placed or ended), or as last seen if its
/// waiter is gone.
async fn settled(progress: &mut tokio::sync::watch::Receiver<Progress>) -> Progress {
    let _ = progress
        .wait_for(|p| !matches!(p, Progress::Waiting { .. }))
        .await;
    progress.borrow().clone()
}

/// Counts a call whose handler was dropped unanswered (the client cancelled it).
struct Unanswered<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.record_call(self.method, None);
        }
    }
}

/// Ends a build's accounting exactly once: when its Solve answer ends, or when the Solve is
/// dropped unanswered (client cancel before the daemon answered).
struct BuildEnd {
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
    fn finish(mut self, end: CallEnd) {
        self.record(end);
    }

    fn record(&mut self, end: CallEnd) {
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

/// A placement failure, naming the build and what the pool looks like, so the user can tell
/// "all daemons down" from "pool scaled to zero" from "wrong platform".
fn placement_error(error: &PlacementError, build: &str, pool: &Pool) -> Response<ResponseBody> {
    let (code, message) = placement_refusal(error, build, pool);
    forward::status_response(code, &message)
}

/// The gRPC status of a placement failure (see [`placement_error`]).
fn placement_refusal(error: &PlacementError, build: &str, pool: &Pool) -> (u32, String) {
    let code = match error {
        PlacementError::NoBackend => code::UNAVAILABLE,
        PlacementError::NoPlatform { .. } => code::FAILED_PRECONDITION,
        PlacementError::AllAtCapacity { .. } => code::RESOURCE_EXHAUSTED,
    };
    let snapshot = pool.snapshot();
    let mut states: Vec<String> = snapshot
        .backends
        .iter()
        .take(5)
        .map(|b| match b.last_error() {
            Some(why) => format!("{} {}: {why}", b.identity(), b.state().as_str()),
            None => format!("{} {}", b.identity(), b.state().as_str()),
        })
        .collect();
    if snapshot.backends.len() > 5 {
        states.push(format!("and {} more", snapshot.backends.len() - 5));
    }
    let pool_text = if states.is_empty() {
        "no backends discovered".to_owned()
    } else {
        states.join(", ")
    };
    warn!(%error, build, pool = %pool_text, "cannot place");
    (
        code,
        format!("buildkit-router: {error} for {build} ({pool_text})"),
    )
}

fn peek_error(what: &str, error: &PeekError) -> Response<ResponseBody> {
    warn!(%error, "cannot read {what} request");
    forward::status_response(
        error.code(),
        &format!("buildkit-router: cannot read {what} request: {error}"),
    )
}

fn outcome_of(end: CallEnd) -> &'static str {
    match end {
        CallEnd::Status(0) => "success",
        CallEnd::Status(1) | CallEnd::Cancelled => "cancelled",
        CallEnd::Status(_) => "failed",
    }
}

impl Router {
    pub fn new(
        pool: Arc<Pool>,
        registry: Arc<Registry>,
        placement: Placement,
        metrics: Arc<Metrics>,
        settings: RouterSettings,
        admission: Option<Arc<Admission>>,
    ) -> Arc<Self> {
        let offline = OfflineAnswers::new(
            settings.state_dir.clone(),
            settings.default_platforms.clone(),
        );
        Arc::new(Self {
            pool,
            registry,
            placement,
            metrics,
            settings,
            refreshed: Mutex::new(HashMap::new()),
            admission,
            offline,
        })
    }

    /// The admission queue, when queueing is on.
    pub fn admission(&self) -> Option<&Arc<Admission>> {
        self.admission.as_ref()
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Handles one request from a client connection.
    pub async fn handle(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let call = classify(request.uri().path());
        // Calls that belong to a build get a span carrying its ref and backend, so one build can
        // be followed through the logs; pool-wide calls (ListWorkers, DiskUsage, health...) skip
        // the span's cost, which is measurable at this rate (docs/performance.md).
        let span = if call.route.belongs_to_build() {
            tracing::info_span!(
                "call",
                method = call.method,
                build_ref = field::Empty,
                backend = field::Empty
            )
        } else {
            tracing::Span::none()
        };
        // A call the client cancels before any answer (a Solve runs the whole build before its
        // answer's headers) is counted when its future is dropped.
        let mut unanswered = Unanswered {
            metrics: &self.metrics,
            method: call.method,
            armed: true,
        };
        let response = self.route(call.route, conn, request).instrument(span).await;
        unanswered.armed = false;
        let metrics = self.metrics.clone();
        let method = call.method;
        response.map(|body| {
            body.with_hook(EndHook::new(move |end| {
                metrics.record_call(
                    method,
                    match end {
                        CallEnd::Status(code) => Some(code),
                        CallEnd::Cancelled => None,
                    },
                )
            }))
        })
    }

    async fn route(
        self: &Arc<Self>,
        route: Route,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        // Each route's future is boxed: inline, the largest (Solve's) would make every call's
        // future kilobytes big, copied whole into hyper's per-stream task at every call.
        match route {
            Route::Solve => Box::pin(self.solve(conn, request)).await,
            Route::Session => Box::pin(self.session(conn, request)).await,
            Route::Status => Box::pin(self.status(conn, request)).await,
            Route::Bridge => Box::pin(self.bridge(conn, request)).await,
            Route::ListenHistory => Box::pin(self.history(conn, request, true)).await,
            Route::UpdateHistory => Box::pin(self.history(conn, request, false)).await,
            Route::FanOutUnary => Box::pin(self.fan_out_unary(request)).await,
            Route::FanOutStream => Box::pin(self.fan_out_stream(request)).await,
            Route::AnyReady => Box::pin(self.any_ready(conn, request)).await,
            Route::Sticky => Box::pin(self.sticky(conn, request)).await,
            Route::Health => self.health(request),
        }
    }

    /// Sends the call to `backend` and relays the answer; the build ref names the build in errors.
    async fn forward_to(
        &self,
        conn: &ConnState,
        backend: &Arc<Backend>,
        build_ref: Option<&str>,
        parts: http::request::Parts,
        body: RequestBody,
    ) -> Response<ResponseBody> {
        tracing::Span::current().record("backend", &**backend.identity());
        conn.used(backend);
        match forward::send(backend, parts, body).await {
            Ok(response) => forward::relay(response, stream_context(backend, build_ref)),
            Err(error) => {
                if let ForwardError::Send { source, .. } = &error {
                    if !crate::body::is_stream_reset(source) {
                        backend.mark_unreachable(&source.to_string());
                    }
                }
                unavailable_backend(backend, build_ref, error)
            }
        }
    }

    /// Splits a request and reads its first gRPC message (needed to route it), or gives the
    /// answer a client gets when that fails.
    async fn peek(
        &self,
        request: Request<Incoming>,
    ) -> Result<(http::request::Parts, Incoming, forward::Peeked), Response<ResponseBody>> {
        let (parts, mut body) = request.into_parts();
        match forward::read_first_message(&mut body, self.settings.max_message_size).await {
            Ok(peeked) => Ok((parts, body, peeked)),
            Err(error) => Err(peek_error(parts.uri.path(), &error)),
        }
    }

    /// Runs placement over the current snapshot, skipping `excluded` backends.
    fn place(
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
    async fn admit(
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

    async fn solve(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let (parts, body, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let solve = match wire::decode_solve(peeked.message()) {
            Ok(solve) => solve,
            Err(error) => return error_response_invalid("Control/Solve", &error),
        };
        let build_ref: Arc<str> = if solve.build_ref.is_empty() {
            // buildkitd names such a build itself; give it a private registry key so unrelated
            // ref-less Solves never share a binding.
            Arc::from(format!("(unnamed-{:016x})", rand::random::<u64>()))
        } else {
            Arc::from(solve.build_ref)
        };
        tracing::Span::current().record("build_ref", &*build_ref);
        let sessions = solve.session_ids();
        let traits = self.placement.traits_for_solve(&solve);

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
                            Err(answer) => return answer,
                        }
                    }
                    _ => match self.place(&traits, &excluded) {
                        Ok(found) => found,
                        Err(error) => {
                            // Every candidate failed to connect: say which and why.
                            if let Some((backend, connect_error)) = last_failure {
                                return unavailable_backend(
                                    &backend,
                                    Some(&build_ref),
                                    connect_error,
                                );
                            }
                            return placement_error(
                                &error,
                                &format!("build {build_ref}"),
                                &self.pool,
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
                return unavailable_backend(&candidate, Some(&build_ref), error);
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
                RequestBody::prefixed(peeked.buffered, body),
            )
            .await;
        response.map(|body| body.with_hook(EndHook::new(move |end| build_end.finish(end))))
    }

    /// Control/Session: answered at once and held by the router (its inner HTTP/2 connection
    /// to the client keeps the client's timers satisfied) until a Solve names it or the bind
    /// window places it, then relayed to that backend. The tunnel work is in `session`.
    async fn session(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let Some(uuid) = header(session::UUID_HEADER).filter(|u| !u.is_empty()) else {
            // buildkitd rejects it with its own error; pass it on untouched.
            return self.sticky(conn, request).await;
        };
        let shared_key = header(session::SHARED_KEY_HEADER).unwrap_or_default();
        tracing::Span::current()
            .record("build_ref", field::display(format_args!("session:{uuid}")));
        let wait = {
            let router = self.clone();
            let uuid = uuid.clone();
            async move {
                // A Session whose build waits in the queue is held (the relay keeps the
                // client's inner connection alive) until that build is placed.
                let held_since = Instant::now();
                let bind_window = match &router.admission {
                    Some(admission) => router
                        .wait_for_queued_owner(admission, &uuid)
                        .await
                        .map_err(|(code, message)| session::Refusal { code, message })?,
                    None => router.settings.session_bind_window,
                };
                let held = held_since.elapsed();
                let mut bound = session::bind(
                    &router.registry,
                    &router.pool,
                    &router.placement,
                    &uuid,
                    &shared_key,
                    bind_window,
                )
                .await
                .map_err(|error| {
                    let (code, message) =
                        placement_refusal(&error, &format!("session {uuid}"), &router.pool);
                    session::Refusal { code, message }
                })?;
                if !held.is_zero() && bound.how == session::BindHow::Immediate {
                    // A Solve bound it while it was held for its queued build.
                    bound.how = session::BindHow::Solve;
                    bound.waited += held;
                }
                router
                    .metrics
                    .session_bind_seconds
                    .with_label_values(&[bound.how.as_str()])
                    .observe(bound.waited.as_secs_f64());
                let pin = router.registry.pin_session(&uuid);
                Ok(session::Placed {
                    backend: bound.backend,
                    keep: Some(Box::new(pin)),
                })
            }
        };
        let open: session::Open = {
            let conn = conn.clone();
            Box::new(move |backend, parts, body| {
                Box::pin(async move {
                    conn.used(&backend);
                    forward::send(&backend, parts, body).await.map_err(|error| {
                        if let ForwardError::Send { source, .. } = &error {
                            if !crate::body::is_stream_reset(source) {
                                backend.mark_unreachable(&source.to_string());
                            }
                        }
                        error.to_string()
                    })
                })
            })
        };
        let gauges = session::Gauges {
            held: self.metrics.sessions.with_label_values(&["held"]),
            relayed: self.metrics.sessions.with_label_values(&["relayed"]),
        };
        session::serve(
            session::SessionCall {
                uuid,
                request,
                // The tunnel carries whole inner connections: BuildKit's own message limit
                // applies there, whatever limit the router reads routed calls with.
                max_message: self
                    .settings
                    .max_message_size
                    .max(session::tunnel::MAX_MESSAGE),
                gauges,
            },
            wait,
            open,
        )
    }

    /// Holds a Session while the build that names it waits in the queue, until that build is
    /// placed (and binds it). Returns what is left of the bind window for `session::bind`.
    async fn wait_for_queued_owner(
        &self,
        admission: &Admission,
        uuid: &str,
    ) -> Result<Duration, (u32, String)> {
        let deadline = Instant::now() + self.settings.session_bind_window;
        loop {
            let arrived = admission.arrivals().notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.registry.lookup(KeyKind::Session, uuid).is_some() {
                return Ok(Duration::ZERO);
            }
            if let Some(mut progress) = admission.queued_session(uuid) {
                if let Progress::Ended { code, message } = settled(&mut progress).await {
                    return Err((code, message.to_string()));
                }
                // Placed: its Solve binds this session right after admission.
                let _ = self
                    .registry
                    .wait_bound(KeyKind::Session, uuid, self.settings.ref_wait)
                    .await;
                return Ok(Duration::ZERO);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(remaining);
            }
            tokio::select! {
                _ = self.registry.wait_bound(KeyKind::Session, uuid, remaining) => return Ok(Duration::ZERO),
                _ = arrived => {}
            }
        }
    }

    /// The backend of `build_ref`, waiting up to the ref wait for its Solve.
    async fn backend_of(&self, build_ref: &str) -> Option<Arc<Backend>> {
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
    /// after the ref wait (its Solve never came to this router).
    async fn resolve_ref(&self, build_ref: &str) -> RefState {
        let Some(admission) = &self.admission else {
            return match self.backend_of(build_ref).await {
                Some(backend) => RefState::Bound(backend),
                None => RefState::Unknown,
            };
        };
        let deadline = Instant::now() + self.settings.ref_wait;
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
            if remaining.is_zero() {
                return RefState::Unknown;
            }
            tokio::select! {
                bound = self.registry.wait_bound(KeyKind::Ref, build_ref, remaining) => {
                    return bound.map_or(RefState::Unknown, RefState::Bound);
                }
                _ = arrived => {}
            }
        }
    }

    /// The backend whose build history holds `build_ref` (a build another replica placed, or
    /// one this router has forgotten): every live backend is asked with
    /// `ListenBuildHistory{Ref, EarlyExit}`, which answers at once; the first with a record wins.
    async fn locate_ref(&self, build_ref: &str) -> Option<Arc<Backend>> {
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
    async fn resolve_or_locate(&self, build_ref: &str) -> RefState {
        let resolve = self.resolve_ref(build_ref);
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
    async fn placed(
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

    async fn status(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let (parts, body, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let build_ref = match wire::decode_status_ref(peeked.message()) {
            Ok(r) => r.to_owned(),
            Err(error) => return error_response_invalid("Control/Status", &error),
        };
        tracing::Span::current().record("build_ref", &*build_ref);
        let backend = match self.resolve_or_locate(&build_ref).await {
            RefState::Bound(backend) => Some(backend),
            RefState::Queued(progress) => {
                let placed = match &*progress.borrow() {
                    Progress::Placed(backend) => Some(backend.clone()),
                    _ => None,
                };
                match placed {
                    Some(backend) => Some(backend),
                    // The client sees the wait as a vertex, then the daemon's own stream.
                    None => {
                        return waiting::status_while_queued(
                            Arc::from(build_ref.as_str()),
                            progress,
                            Head::from_parts(&parts),
                            peeked.buffered,
                            body,
                        )
                    }
                }
            }
            RefState::Unknown => None,
        };
        if let Some(backend) = backend {
            return self
                .forward_to(
                    conn,
                    &backend,
                    Some(&build_ref),
                    parts,
                    RequestBody::prefixed(peeked.buffered, body),
                )
                .await;
        }
        // Not a build this router placed (another replica's, or one that ended long ago): ask
        // every backend and relay the one that knows it.
        info!(build_ref = %build_ref, "unknown build ref; asking every backend");
        let head = Head::from_parts(&parts);
        self.first_answer(&head, peeked.buffered, Some(&build_ref))
            .await
    }

    /// Sends a copy of the call to every live backend and relays the first that answers with a
    /// stream rather than an error; if every backend errs, relays the first error.
    async fn first_answer(
        &self,
        head: &Head,
        request: Bytes,
        build_ref: Option<&str>,
    ) -> Response<ResponseBody> {
        let backends = self.live_backends();
        if backends.is_empty() {
            return error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            );
        }
        let mut pending: FuturesUnordered<_> = backends
            .iter()
            .map(|backend| {
                let request = request.clone();
                async move { (backend, forward::send_copy(backend, head, request).await) }
            })
            .collect();
        let mut first_error: Option<Response<ResponseBody>> = None;
        while let Some((backend, result)) = pending.next().await {
            let context = stream_context(backend, build_ref);
            match result {
                Ok(response)
                    if crate::grpc::grpc_status_of(response.headers()).is_none()
                        || pending.is_empty() =>
                {
                    tracing::Span::current().record("backend", &**backend.identity());
                    if crate::grpc::grpc_status_of(response.headers()).is_some() {
                        if let Some(first) = first_error {
                            return first;
                        }
                    }
                    return forward::relay(response, context);
                }
                Ok(response) => {
                    first_error.get_or_insert_with(|| forward::relay(response, context));
                }
                Err(error) => {
                    if pending.is_empty() {
                        return first_error
                            .unwrap_or_else(|| unavailable_backend(backend, build_ref, error));
                    }
                }
            }
        }
        first_error.unwrap_or_else(|| {
            error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend answered",
            )
        })
    }

    /// Forwards an `LLBBridge/Ping` and keeps its Pong (small), to answer queued builds' Pings.
    async fn forward_ping(
        &self,
        conn: &ConnState,
        backend: &Arc<Backend>,
        build_ref: &str,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        tracing::Span::current().record("backend", &**backend.identity());
        conn.used(backend);
        let (parts, body) = request.into_parts();
        let response = match forward::send(backend, parts, RequestBody::incoming(body)).await {
            Ok(response) => response,
            Err(error) => return unavailable_backend(backend, Some(build_ref), error),
        };
        let collected = match forward::collect(response, self.settings.max_message_size).await {
            Ok(collected) => collected,
            Err(error) => return unavailable_backend(backend, Some(build_ref), error),
        };
        if collected.status != code::OK {
            return error(collected.status, collected.message);
        }
        self.offline.remember(PING_PATH, &collected.body);
        forward::ok_response(Some(&collected.headers), collected.body)
    }

    async fn bridge(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let build_ref = request
            .headers()
            .get(BUILD_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|r| !r.is_empty())
            .map(str::to_owned);
        let Some(build_ref) = build_ref else {
            // buildkitd answers "no buildid found in context" itself.
            return self.sticky(conn, request).await;
        };
        tracing::Span::current().record("build_ref", &*build_ref);
        let is_ping = request.uri().path() == PING_PATH;
        let found = match self.resolve_ref(&build_ref).await {
            RefState::Bound(backend) => Some(backend),
            // The gateway client gives Ping 15 s: a queued build's Ping is answered here.
            RefState::Queued(progress) if is_ping => {
                if let Some(pong) = self.offline.known(PING_PATH) {
                    return waiting::pong(pong);
                }
                // No daemon's Pong known yet: wait for the placement within the Ping's own
                // deadline, then ask the daemon; else answer with the pinned release's Pong.
                let budget = crate::grpc::grpc_timeout_of(request.headers())
                    .unwrap_or(Duration::from_secs(15))
                    .saturating_sub(Duration::from_secs(2));
                match tokio::time::timeout(budget, self.placed(&build_ref, progress)).await {
                    Ok(Ok(backend)) => {
                        return self.forward_ping(conn, &backend, &build_ref, request).await
                    }
                    Ok(Err(answer)) => return answer,
                    Err(_) => {
                        let pong = self.offline.answer(PING_PATH).unwrap_or_default();
                        return waiting::pong(pong);
                    }
                }
            }
            RefState::Queued(progress) => match self.placed(&build_ref, progress).await {
                Ok(backend) => Some(backend),
                Err(answer) => return answer,
            },
            RefState::Unknown => None,
        };
        if let (Some(backend), true) = (&found, is_ping) {
            return self.forward_ping(conn, backend, &build_ref, request).await;
        }
        let backend = match found {
            Some(backend) => backend,
            None => {
                // The daemon answers `no such job` with its own wait; send it where the
                // connection's builds go.
                warn!(build_ref = %build_ref, "LLBBridge call for a build ref no Solve named; forwarding to this connection's backend");
                match self.connection_backend(conn) {
                    Some(backend) => backend,
                    None => {
                        return error(
                            code::UNAVAILABLE,
                            "buildkit-router: no buildkitd backend is ready",
                        )
                    }
                }
            }
        };
        let (parts, body) = request.into_parts();
        self.forward_to(
            conn,
            &backend,
            Some(&build_ref),
            parts,
            RequestBody::incoming(body),
        )
        .await
    }

    async fn history(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
        listen: bool,
    ) -> Response<ResponseBody> {
        let what = if listen {
            "Control/ListenBuildHistory"
        } else {
            "Control/UpdateBuildHistory"
        };
        let (parts, body, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let build_ref = if listen {
            wire::decode_history_request(peeked.message()).map(|h| h.build_ref)
        } else {
            wire::decode_update_history_ref(peeked.message())
        };
        let build_ref = match build_ref {
            Ok(r) => r.to_owned(),
            Err(error) => return error_response_invalid(what, &error),
        };
        if !build_ref.is_empty() {
            tracing::Span::current().record("build_ref", &*build_ref);
            // Known to this router, else found in a daemon's history (the Content reads that
            // follow on this connection then go there too); else every backend is asked.
            let backend = match self.registry.lookup(KeyKind::Ref, &build_ref) {
                Some(backend) => Some(backend),
                // buildx's feature probe names a ref no daemon holds: skip the search.
                None if build_ref == BUILDX_HISTORY_PROBE => None,
                None => self.locate_ref(&build_ref).await,
            };
            if let Some(backend) = backend {
                return self
                    .forward_to(
                        conn,
                        &backend,
                        Some(&build_ref),
                        parts,
                        RequestBody::prefixed(peeked.buffered, body),
                    )
                    .await;
            }
        }
        // History is per daemon: ask them all.
        let head = Head::from_parts(&parts);
        if listen {
            self.merge_streams(head, peeked.buffered)
        } else {
            self.first_ok(
                &head,
                peeked.buffered,
                (!build_ref.is_empty()).then_some(build_ref.as_str()),
            )
            .await
        }
    }

    /// Every backend that may hold state: ready, draining or unhealthy (not gone).
    fn live_backends(&self) -> Vec<Arc<Backend>> {
        self.pool
            .snapshot()
            .backends
            .iter()
            .filter(|b| b.state() != BackendState::Gone)
            .cloned()
            .collect()
    }

    /// Unary call to every backend; relays the first OK answer, else the first error.
    /// Sends a copy of a unary call to every live backend and reads each whole answer.
    async fn collect_from_all(
        &self,
        head: &Head,
        request: &Bytes,
    ) -> (Vec<Arc<Backend>>, Vec<Result<forward::Collected, String>>) {
        let backends = self.live_backends();
        let max = self.settings.max_message_size;
        let answers = futures_util::future::join_all(backends.iter().map(|backend| async move {
            let response = forward::send_copy(backend, head, request.clone())
                .await
                .map_err(|e| e.to_string())?;
            forward::collect(response, max)
                .await
                .map_err(|e| e.to_string())
        }))
        .await;
        (backends, answers)
    }

    async fn first_ok(
        &self,
        head: &Head,
        request: Bytes,
        build_ref: Option<&str>,
    ) -> Response<ResponseBody> {
        let (backends, answers) = self.collect_from_all(head, &request).await;
        let mut first_error = None;
        for (backend, answer) in backends.iter().zip(answers) {
            match answer {
                Ok(collected) if collected.status == code::OK => {
                    return forward::ok_response(Some(&collected.headers), collected.body)
                }
                Ok(collected) => {
                    first_error.get_or_insert((collected.status, collected.message));
                }
                Err(e) => {
                    first_error.get_or_insert((
                        code::UNAVAILABLE,
                        format!(
                            "buildkit-router: buildkitd backend {}: {e}",
                            backend.identity()
                        ),
                    ));
                }
            }
        }
        match first_error {
            Some((code, message)) => error(code, message),
            None => error(
                code::UNAVAILABLE,
                match build_ref {
                    Some(r) => {
                        format!("buildkit-router: no buildkitd backend is ready for build {r}")
                    }
                    None => "buildkit-router: no buildkitd backend is ready".into(),
                },
            ),
        }
    }

    async fn fan_out_unary(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let (parts, _rest, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let head = Head::from_parts(&parts);
        let (backends, answers) = self.collect_from_all(&head, &peeked.buffered).await;
        if backends.is_empty() {
            return error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            );
        }
        let max = self.settings.max_message_size;
        let mut merged = Vec::new();
        let mut first_error = None;
        let mut headers = None;
        for (backend, answer) in backends.iter().zip(answers) {
            match answer {
                Ok(collected) if collected.status == code::OK => {
                    headers.get_or_insert(collected.headers);
                    merged.push(collected.body);
                }
                Ok(collected) => {
                    warn!(backend = %backend.identity(), code = collected.status, message = %collected.message, "fan-out call failed on one backend");
                    first_error.get_or_insert((collected.status, collected.message));
                }
                Err(e) => {
                    warn!(backend = %backend.identity(), error = %e, "fan-out call failed on one backend");
                    first_error.get_or_insert((
                        code::UNAVAILABLE,
                        format!(
                            "buildkit-router: buildkitd backend {}: {e}",
                            backend.identity()
                        ),
                    ));
                }
            }
        }
        if merged.is_empty() {
            let (code, message) = first_error.unwrap_or((
                code::UNAVAILABLE,
                "buildkit-router: no backend answered".into(),
            ));
            return error(code, message);
        }
        match forward::merge_unary_payloads(merged.iter(), max) {
            Ok(message) => forward::ok_response(headers.as_ref(), message),
            Err(e) => error(
                code::INTERNAL,
                format!("buildkit-router: cannot merge answers: {e}"),
            ),
        }
    }

    async fn fan_out_stream(
        self: &Arc<Self>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let (parts, _rest, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        self.merge_streams(Head::from_parts(&parts), peeked.buffered)
    }

    /// Streams every backend's answer to the client, message by message, and ends with OK if
    /// any backend ended OK, else with the first error.
    fn merge_streams(&self, head: Head, request: Bytes) -> Response<ResponseBody> {
        let backends = self.live_backends();
        if backends.is_empty() {
            return error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            );
        }
        let (tx, rx) = mpsc::channel::<Frame<Bytes>>(16);
        let max = self.settings.max_message_size;
        tokio::spawn(
            async move {
                let results = futures_util::future::join_all(backends.iter().map(|backend| {
                    let (head, request, tx) = (&head, request.clone(), &tx);
                    async move {
                        let response = forward::send_copy(backend, head, request).await.map_err(|e| e.to_string())?;
                        forward::pump_messages(response, tx, max).await
                    }
                }))
                .await;
                let mut first_error = None;
                let mut any_ok = false;
                for (backend, result) in backends.iter().zip(results) {
                    match result {
                        Ok((code::OK, _)) => any_ok = true,
                        Ok((code, message)) => {
                            first_error.get_or_insert((code, message));
                        }
                        Err(e) => {
                            warn!(backend = %backend.identity(), error = %e, "merged stream failed on one backend");
                            first_error.get_or_insert((code::UNAVAILABLE, format!("buildkit-router: buildkitd backend {}: {e}", backend.identity())));
                        }
                    }
                }
                let trailers = match (any_ok, first_error) {
                    (true, _) | (false, None) => status_trailers(code::OK, ""),
                    (false, Some((code, message))) => status_trailers(code, &message),
                };
                let _ = tx.send(Frame::trailers(trailers)).await;
            }
            .in_current_span(),
        );
        let mut response = Response::new(ResponseBody::channel(rx));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        response
    }

    /// This connection's backend if it still serves, else any ready one.
    fn connection_backend(&self, conn: &ConnState) -> Option<Arc<Backend>> {
        if let Some(backend) = conn.last_backend() {
            if backend.state() != BackendState::Gone {
                return Some(backend);
            }
        }
        self.least_loaded_ready()
    }

    fn least_loaded_ready(&self) -> Option<Arc<Backend>> {
        let snapshot = self.pool.snapshot();
        snapshot
            .backends
            .iter()
            .filter(|b| b.state() == BackendState::Ready)
            .min_by_key(|b| b.active_builds())
            .cloned()
    }

    async fn any_ready(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let path: &'static str = match request.uri().path() {
            "/moby.buildkit.v1.Control/ListWorkers" => "/moby.buildkit.v1.Control/ListWorkers",
            _ => "/moby.buildkit.v1.Control/Info",
        };
        // This connection's backend first, then the others by load: a daemon that died a
        // moment ago costs a retry on the next, never the client's call.
        let mut candidates: Vec<Arc<Backend>> = self
            .pool
            .snapshot()
            .backends
            .iter()
            .filter(|b| b.state() == BackendState::Ready)
            .cloned()
            .collect();
        candidates.sort_by_key(|b| b.active_builds());
        if let Some(last) = conn.last_backend() {
            if let Some(i) = candidates.iter().position(|b| Arc::ptr_eq(b, &last)) {
                let last = candidates.remove(i);
                candidates.insert(0, last);
            }
        }
        let fresh = self
            .refreshed
            .lock()
            .expect("refresh lock")
            .get(path)
            .is_some_and(|at| at.elapsed() < CACHE_REFRESH);
        // ListWorkersRequest / InfoRequest: one small message, read to be sent again.
        let (parts, _rest, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let head = Head::from_parts(&parts);
        let mut response = None;
        for backend in candidates {
            match forward::send_copy(&backend, &head, peeked.buffered.clone()).await {
                Ok(answer) => {
                    tracing::Span::current().record("backend", &**backend.identity());
                    conn.used(&backend);
                    response = Some((backend, answer));
                    break;
                }
                Err(error) => {
                    if let ForwardError::Send { source, .. } = &error {
                        if !crate::body::is_stream_reset(source) {
                            backend.mark_unreachable(&source.to_string());
                        }
                    }
                    warn!(backend = %backend.identity(), %error, "{path} failed on a backend; trying the next");
                }
            }
        }
        let Some((backend, response)) = response else {
            return self.offline_answer(path);
        };
        if fresh {
            return forward::relay(response, stream_context(&backend, None));
        }
        // Small answers: read them whole, to cache them and learn the workers' platforms.
        let collected = match forward::collect(response, self.settings.max_message_size).await {
            Ok(collected) => collected,
            Err(error) => return unavailable_backend(&backend, None, error),
        };
        if collected.status != code::OK {
            return error(collected.status, collected.message);
        }
        self.offline.remember(path, &collected.body);
        if path.ends_with("ListWorkers") {
            let mut splitter = wire::MessageSplitter::default();
            splitter.push(&collected.body);
            if let Ok(Some(message)) = splitter.next_message(self.settings.max_message_size) {
                if let Ok(platforms) =
                    wire::decode_worker_platforms(&message[wire::GRPC_PREFIX_LEN..])
                {
                    backend.set_platforms(platforms);
                }
            }
        }
        self.refreshed
            .lock()
            .expect("refresh lock")
            .insert(path, Instant::now());
        forward::ok_response(Some(&collected.headers), collected.body)
    }

    /// ListWorkers/Info with no backend to ask (see [`crate::workers`]).
    fn offline_answer(&self, path: &str) -> Response<ResponseBody> {
        match self.offline.answer(path) {
            Some(framed) => {
                info!("no backend is ready; answering {path} from the last known answer");
                forward::ok_response(None, framed)
            }
            None => error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            ),
        }
    }

    async fn sticky(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let Some(backend) = self.connection_backend(conn) else {
            return error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            );
        };
        let (parts, body) = request.into_parts();
        self.forward_to(conn, &backend, None, parts, RequestBody::incoming(body))
            .await
    }

    /// grpc.health.v1: the router answers for itself. SERVING once it can route builds.
    fn health(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        match request.uri().path() {
            "/grpc.health.v1.Health/Check" => {
                // With the queue on, an empty pool still takes builds (they wait for a daemon).
                let serving = self.pool.is_synced()
                    && (self.admission.is_some() || self.pool.snapshot().any_ready().is_some());
                // HealthCheckResponse { status = 1 SERVING | 2 NOT_SERVING }
                let message = wire::encode_frame(&[0x08, if serving { 1 } else { 2 }]);
                forward::ok_response(None, message)
            }
            _ => error(
                code::UNIMPLEMENTED,
                "buildkit-router: only grpc.health.v1.Health/Check is served",
            ),
        }
    }
}

fn stream_context(backend: &Arc<Backend>, build_ref: Option<&str>) -> StreamContext {
    StreamContext {
        backend: backend.identity().clone(),
        build_ref: build_ref.map(Arc::from),
        health: Some(backend.clone() as Arc<dyn crate::body::ConnectionHealth>),
    }
}

fn error_response_invalid(what: &str, error: &wire::WireError) -> Response<ResponseBody> {
    warn!(%error, "undecodable {what} request");
    let code = match error {
        wire::WireError::TooLarge { .. } => code::RESOURCE_EXHAUSTED,
        _ => code::INVALID_ARGUMENT,
    };
    forward::status_response(
        code,
        &format!("buildkit-router: undecodable {what} request: {error}"),
    )
}
