//! The router and what every room shares: its state, the answers it gives when a call cannot
//! be routed, and forwarding one call to one backend. The rooms (`solve`, `session`, ...) build
//! on this floor; nothing here knows about them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::warn;

use crate::admission::Admission;
use crate::body::{RequestBody, ResponseBody, StreamContext};
use crate::content::{ContentKeys, ContentSettings};
use crate::forward::{self, code, ForwardError, PeekError};
use crate::metrics::Metrics;
use crate::placement::{Placement, PlacementError};
use crate::pool::{Backend, BackendState, Pool};
use crate::queue::TenantFrom;
use crate::registry::Registry;
use crate::routing_buffer::{
    RoutingBuffer, DEFAULT_CLIENT_STREAM_WINDOW, DEFAULT_ROUTING_BUFFER,
    DEFAULT_ROUTING_BUFFER_WAIT,
};
use crate::wire;
use crate::workers::OfflineAnswers;

/// The header naming an LLBBridge call's build.
pub const BUILD_ID_HEADER: &str = "buildkit-controlapi-buildid";

/// Routing timers and limits.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub session_bind_window: Duration,
    /// How long a Session waits to be placed before the router holds it; one placed sooner is
    /// passed through as it came (`--session-passthrough-window`; zero: every session is held).
    pub session_passthrough_window: Duration,
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
    /// Bounds of the Dockerfile read for the content key.
    pub content: ContentSettings,
    /// The memory shared by the first messages read to route calls (`--routing-buffer`).
    pub routing_buffer: RoutingBuffer,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            session_bind_window: Duration::from_secs(3),
            session_passthrough_window: Duration::from_secs(1),
            ref_wait: Duration::from_secs(5),
            max_message_size: 16 * 1024 * 1024 + 64 * 1024,
            connect_attempts: 3,
            tenant_from: TenantFrom::KeyOwner,
            state_dir: None,
            default_platforms: Vec::new(),
            content: ContentSettings::default(),
            routing_buffer: RoutingBuffer::unmetered(
                DEFAULT_ROUTING_BUFFER,
                DEFAULT_ROUTING_BUFFER_WAIT,
                DEFAULT_CLIENT_STREAM_WINDOW as usize,
            ),
        }
    }
}

/// What the router remembers about one client connection.
#[derive(Debug, Default)]
pub struct ConnState {
    pub(super) id: ConnId,
    pub(super) last_backend: Mutex<Option<Arc<Backend>>>,
    /// The client certificate's identity (mTLS), for `--tenant-from mtls`.
    pub(super) identity: Option<Arc<str>>,
}

/// A client connection's number, unique in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnId(pub u64);

impl Default for ConnId {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        ConnId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl ConnState {
    /// A connection whose client presented a certificate naming `identity`.
    pub fn with_identity(identity: Option<Arc<str>>) -> Self {
        Self {
            identity,
            ..Self::default()
        }
    }

    pub(super) fn last_backend(&self) -> Option<Arc<Backend>> {
        self.last_backend.lock().expect("conn lock").clone()
    }

    pub(super) fn used(&self, backend: &Arc<Backend>) {
        let mut last = self.last_backend.lock().expect("conn lock");
        if !last.as_ref().is_some_and(|b| Arc::ptr_eq(b, backend)) {
            *last = Some(backend.clone());
        }
    }
}

/// Routes every call.
pub struct Router {
    pub(super) pool: Arc<Pool>,
    pub(super) registry: Arc<Registry>,
    pub(super) placement: Placement,
    pub(super) metrics: Arc<Metrics>,
    pub(super) settings: RouterSettings,
    /// When each of ListWorkers/Info was last read whole (its answer kept in `offline`).
    pub(super) refreshed: Mutex<HashMap<&'static str, Instant>>,
    /// The admission queue; `None` with `--queue off` (builds are placed at once).
    pub(super) admission: Option<Arc<Admission>>,
    /// ListWorkers/Info answers for when no backend is ready.
    pub(super) offline: OfflineAnswers,
    /// Live sessions' inner clients (the router reads Dockerfiles through them).
    pub(super) sessions: Arc<crate::session::Directory>,
    pub(super) content: ContentKeys,
}

pub(super) fn error(code: u32, message: impl AsRef<str>) -> Response<ResponseBody> {
    forward::status_response(code, message.as_ref())
}

pub(super) fn unavailable_backend(
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

/// A placement failure, naming the build and what the pool looks like, so the user can tell
/// "all daemons down" from "pool scaled to zero" from "wrong platform".
pub(super) fn placement_error(
    error: &PlacementError,
    build: &str,
    pool: &Pool,
) -> Response<ResponseBody> {
    let (code, message) = placement_refusal(error, build, pool);
    forward::status_response(code, &message)
}

/// The gRPC status of a placement failure (see [`placement_error`]).
pub(super) fn placement_refusal(error: &PlacementError, build: &str, pool: &Pool) -> (u32, String) {
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

pub(super) fn peek_error(what: &str, error: &PeekError) -> Response<ResponseBody> {
    if matches!(error, PeekError::Body(_)) {
        // The client gave up on its own call (cancel, connection gone): nothing went wrong here.
        tracing::debug!(%error, "cannot read {what} request");
    } else {
        warn!(%error, "cannot read {what} request");
    }
    forward::status_response(
        error.code(),
        &format!("buildkit-router: cannot read {what} request: {error}"),
    )
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
        let sessions = crate::session::Directory::new();
        let content = ContentKeys::new(
            settings.content.clone(),
            sessions.clone(),
            metrics.content.clone(),
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
            sessions,
            content,
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

    /// Sends the call to `backend` and relays the answer; the build ref names the build in errors.
    pub(super) async fn forward_to(
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
    pub(super) async fn peek(
        &self,
        request: Request<Incoming>,
    ) -> Result<(http::request::Parts, Incoming, forward::Peeked), Response<ResponseBody>> {
        self.peek_keeping_read(request, |_| true)
            .await
            .map_err(|(parts, failure)| peek_error(parts.uri.path(), &failure.error))
    }

    /// [`Router::peek`], giving on failure the request head and the bytes read (a refused
    /// Solve's ref is in them) instead of the answer: the caller makes it with [`peek_error`].
    /// `seen` is shown the leading bytes as they arrive until it returns true, before the
    /// message waits for room in the routing buffer ([`forward::read_first_message_seen`]).
    pub(super) async fn peek_keeping_read(
        &self,
        request: Request<Incoming>,
        seen: impl FnMut(&[u8]) -> bool,
    ) -> Result<
        (http::request::Parts, Incoming, forward::Peeked),
        (http::request::Parts, forward::PeekFailure),
    > {
        let (parts, mut body) = request.into_parts();
        let max = self.settings.max_message_size;
        let buffer = &self.settings.routing_buffer;
        match forward::read_first_message_seen(&mut body, max, buffer, seen).await {
            Ok(peeked) => Ok((parts, body, peeked)),
            Err(failure) => Err((parts, failure)),
        }
    }

    /// Every backend that may hold state: ready, draining or unhealthy (not gone).
    pub(super) fn live_backends(&self) -> Vec<Arc<Backend>> {
        self.pool
            .snapshot()
            .backends
            .iter()
            .filter(|b| b.state() != BackendState::Gone)
            .cloned()
            .collect()
    }

    /// This connection's backend if it still serves, else any ready one.
    pub(super) fn connection_backend(&self, conn: &ConnState) -> Option<Arc<Backend>> {
        if let Some(backend) = conn.last_backend() {
            if backend.state() != BackendState::Gone {
                return Some(backend);
            }
        }
        self.least_loaded_ready()
    }

    pub(super) fn least_loaded_ready(&self) -> Option<Arc<Backend>> {
        let snapshot = self.pool.snapshot();
        snapshot
            .backends
            .iter()
            .filter(|b| b.state() == BackendState::Ready)
            .min_by_key(|b| b.active_builds())
            .cloned()
    }

    pub(super) async fn sticky(
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
}

pub(super) fn stream_context(backend: &Arc<Backend>, build_ref: Option<&str>) -> StreamContext {
    StreamContext {
        backend: backend.identity().clone(),
        build_ref: build_ref.map(Arc::from),
        subject: crate::body::Subject::Build,
        health: Some(backend.clone() as Arc<dyn crate::body::ConnectionHealth>),
    }
}

pub(super) fn error_response_invalid(
    what: &str,
    error: &wire::WireError,
) -> Response<ResponseBody> {
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
