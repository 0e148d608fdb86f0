//! The backends: identity, address, state, load, platforms, and one long-lived multiplexed
//! HTTP/2 client connection each, reconnected with backoff and health-checked.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri};
use http_body_util::BodyExt;
use hyper::Response;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
// Tokio's clock, so that tests with paused time drive health checks and backoff.
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::body::BackendBody;
use crate::body::RequestBody;
use crate::io::BufferedIo;
use crate::upstream::{self, Connection};

/// TLS settings used to reach one backend.
#[derive(Clone)]
pub struct BackendTls {
    pub client_config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Where a backend listens and how to talk to it.
#[derive(Debug, Clone)]
pub struct BackendAddress {
    pub host: String,
    pub port: u16,
    /// `None`: h2c with prior knowledge (`tcp://`).
    pub tls: Option<BackendTls>,
}

impl BackendAddress {
    pub fn tcp(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            tls: None,
        }
    }

    fn same_endpoint(&self, other: &Self) -> bool {
        self.host == other.host
            && self.port == other.port
            && self.tls.is_some() == other.tls.is_some()
    }
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "tls" } else { "tcp" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// What discovery says of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// Takes new builds.
    Ready,
    /// Terminating, or not ready but still serving: no new builds, running builds go on.
    Draining,
}

/// One backend as a discovery source sees it.
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    /// Stable identity: pod name where known, else the address.
    pub identity: String,
    pub address: BackendAddress,
    pub state: EndpointState,
    pub zone: Option<String>,
    pub node: Option<String>,
}

/// A change to the set of backends, from a discovery source.
#[derive(Debug, Clone)]
pub enum PoolUpdate {
    /// The complete set: anything not in it is gone.
    Reset(Vec<EndpointSpec>),
    Add(EndpointSpec),
    Update(EndpointSpec),
    /// Gone, by identity.
    Remove(String),
}

/// A backend's state as the router acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Takes new builds.
    Ready,
    /// Serves its running builds, takes no new ones.
    Draining,
    /// Failed its health checks: takes no new builds until it passes again.
    Unhealthy,
    /// Removed by discovery: finishes its builds, then its connection closes.
    Gone,
}

impl BackendState {
    pub const ALL: [BackendState; 4] = [Self::Ready, Self::Draining, Self::Unhealthy, Self::Gone];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Unhealthy => "unhealthy",
            Self::Gone => "gone",
        }
    }
}

/// Why a backend could not be reached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {address}: {reason}")]
    Failed {
        backend: Arc<str>,
        address: String,
        reason: String,
    },
    #[error("{address} is unreachable ({reason}); next connect attempt in {retry_in:.1?}")]
    BackingOff {
        backend: Arc<str>,
        address: String,
        retry_in: Duration,
        reason: String,
    },
    /// Declared dead: it stopped answering health checks (see [`Backend::dead_reason`]).
    #[error("{reason}")]
    Dead { backend: Arc<str>, reason: Arc<str> },
}

/// HTTP/2 and connect settings for backend connections.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub health_interval: Duration,
    /// How long one health check may take before it counts as unanswered.
    pub health_timeout: Duration,
    /// Consecutive unanswered health checks after which a backend is declared dead.
    pub health_failures: u32,
    pub max_builds_per_backend: Option<usize>,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// HTTP/2 connections kept to each backend for calls: one per worker thread
    /// ([`crate::runtime`]), so a call's backend side runs on the thread that serves its client.
    pub shards: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            health_interval: Duration::from_secs(10),
            health_timeout: Duration::from_secs(2),
            health_failures: 3,
            max_builds_per_backend: None,
            stream_window: 2 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            shards: 1,
        }
    }
}

const DISCOVERED_READY: u8 = 0;
const DISCOVERED_DRAINING: u8 = 1;

struct Backoff {
    failures: u32,
    next_attempt: Instant,
    last_error: String,
}

/// One HTTP/2 connection to a backend for calls, made when first needed.
#[derive(Default)]
struct Link {
    sender: Mutex<Option<Connection>>,
    connecting: tokio::sync::Mutex<()>,
}

impl Link {
    fn cached(&self) -> Option<Connection> {
        let mut guard = self.sender.lock().expect("sender lock");
        match guard.as_ref() {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                guard.take();
                None
            }
            None => None,
        }
    }
}

/// How the pool tells others that it changed.
#[derive(Default)]
struct PoolEvents {
    /// One stored permit for the dispatcher ([`Pool::changed`]).
    room: tokio::sync::Notify,
    /// A counter bumped on every change and build start ([`Pool::load_changes`]).
    load: watch::Sender<u64>,
}

impl PoolEvents {
    fn fire(&self) {
        self.room.notify_one();
        self.bump_load();
    }

    fn bump_load(&self) {
        self.load.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Health checks left unanswered in a row (timed out, or no connection).
#[derive(Clone, Copy)]
struct Silence {
    checks: u32,
    /// When the first of them started.
    since: Instant,
}

/// What one health check learned.
enum Probe {
    /// The daemon answered SERVING.
    Serving,
    /// The daemon answered, but not SERVING (or with an error status): alive, not usable.
    Refused(String),
    /// Nothing listens (connection refused): the daemon is gone or draining after SIGTERM
    /// (buildkitd closes its listener and lets running calls finish). Its connections end by
    /// themselves, so this never declares it dead.
    NotListening(String),
    /// No answer: the check timed out, or the network path failed under it.
    Silent(String),
}

/// Why a connection to a backend could not be made.
#[derive(Debug)]
struct ConnectFailure {
    /// The TCP connect was refused: nothing listens there.
    refused: bool,
    reason: String,
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl ConnectFailure {
    fn other(reason: impl fmt::Display) -> Self {
        Self {
            refused: false,
            reason: reason.to_string(),
        }
    }
}

/// One buildkitd daemon.
pub struct Backend {
    identity: Arc<str>,
    address: RwLock<BackendAddress>,
    /// Scheme and authority of requests to this backend, built once per address.
    target: RwLock<(Scheme, Authority)>,
    /// The identity's rendezvous hash, computed once.
    identity_hash: u64,
    zone: Option<String>,
    node: Option<String>,
    discovered: AtomicU8,
    healthy: AtomicBool,
    gone: AtomicBool,
    /// Unanswered health checks in a row; `None` once the daemon answers.
    silence: Mutex<Option<Silence>>,
    /// Why the backend was declared dead (it stopped answering health checks), until it
    /// answers again. Every stream on its connections was ended when this was set.
    dead: RwLock<Option<Arc<str>>>,
    /// Why the backend was last ejected, for error messages and /status.
    last_error: Mutex<Option<String>>,
    active: AtomicUsize,
    /// Builds the daemon itself reports running (`ListenBuildHistory{ActiveOnly}`), all router
    /// replicas together; `usize::MAX` while unknown (no report stream open).
    reported: AtomicUsize,
    /// A task keeps the report stream open (started by the health checks).
    watching: AtomicBool,
    platforms: RwLock<Arc<Vec<String>>>,
    settings: Arc<PoolSettings>,
    /// Wakes whoever waits for the pool to change (the admission queue's dispatcher).
    events: Arc<PoolEvents>,
    /// One HTTP/2 connection per worker thread (see [`PoolSettings::shards`]).
    links: Box<[Link]>,
    /// Stops the tasks that drive this backend's HTTP/2 connections (see [`Backend::drive`])
    /// when cancelled, which fails every stream on them at once (h2 ends every stream of a
    /// dropped connection): cancelled and replaced when
    /// the backend is declared dead.
    life: Mutex<CancellationToken>,
    /// A connection of its own for health checks, so that a busy build connection (flow
    /// control, many streams) never delays a check and a frozen daemon is told from a slow one.
    health_sender: Mutex<Option<Connection>>,
    backoff: Mutex<Option<Backoff>>,
    /// When the next health check is due, and the delay before the one after while the
    /// backend is unhealthy (doubling from [`FIRST_PROBE`] up to the health interval).
    next_check: Mutex<(Instant, Duration)>,
    /// A health check is running.
    checking: AtomicBool,
}

/// How soon an ejected backend is probed again; the delay doubles up to [`MAX_PROBE`] (or the
/// health interval, if shorter).
const FIRST_PROBE: Duration = Duration::from_millis(200);
/// The longest delay between two probes of an ejected backend (a TCP connect is cheap).
const MAX_PROBE: Duration = Duration::from_secs(2);
/// How often the health loop looks for due checks.
const HEALTH_TICK: Duration = Duration::from_millis(100);

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("identity", &self.identity)
            .field("state", &self.state())
            .finish()
    }
}

impl Backend {
    fn new(spec: EndpointSpec, settings: Arc<PoolSettings>, events: Arc<PoolEvents>) -> Self {
        let links = (0..settings.shards.max(1))
            .map(|_| Link::default())
            .collect();
        Self {
            identity_hash: crate::placement::hash::hash_str(&spec.identity),
            identity: spec.identity.into(),
            target: RwLock::new(target_of(&spec.address)),
            address: RwLock::new(spec.address),
            zone: spec.zone,
            node: spec.node,
            discovered: AtomicU8::new(match spec.state {
                EndpointState::Ready => DISCOVERED_READY,
                EndpointState::Draining => DISCOVERED_DRAINING,
            }),
            healthy: AtomicBool::new(true),
            gone: AtomicBool::new(false),
            silence: Mutex::new(None),
            dead: RwLock::new(None),
            last_error: Mutex::new(None),
            active: AtomicUsize::new(0),
            reported: AtomicUsize::new(usize::MAX),
            watching: AtomicBool::new(false),
            platforms: RwLock::new(Arc::new(Vec::new())),
            settings,
            events,
            links,
            life: Mutex::new(CancellationToken::new()),
            health_sender: Mutex::new(None),
            backoff: Mutex::new(None),
            next_check: Mutex::new((Instant::now(), FIRST_PROBE)),
            checking: AtomicBool::new(false),
        }
    }

    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    /// How errors name the backend: its identity, with the address when that differs.
    pub fn label(&self) -> String {
        let address = self.address.read().expect("address lock").to_string();
        if *self.identity == *address {
            address
        } else {
            format!("{} ({address})", self.identity)
        }
    }

    pub fn address(&self) -> BackendAddress {
        self.address.read().expect("address lock").clone()
    }

    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Why the backend was last ejected (connect or health failure), while it is unhealthy.
    pub fn last_error(&self) -> Option<String> {
        if self.healthy.load(Ordering::Acquire) {
            return None;
        }
        self.last_error.lock().expect("error lock").clone()
    }

    pub fn state(&self) -> BackendState {
        if self.gone.load(Ordering::Acquire) {
            BackendState::Gone
        } else if !self.healthy.load(Ordering::Acquire) {
            BackendState::Unhealthy
        } else if self.discovered.load(Ordering::Acquire) == DISCOVERED_DRAINING {
            BackendState::Draining
        } else {
            BackendState::Ready
        }
    }

    /// Builds running on this backend that this router started.
    pub fn active_builds(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Builds the daemon reports running, when its report stream is open.
    pub fn reported_builds(&self) -> Option<usize> {
        match self.reported.load(Ordering::Relaxed) {
            usize::MAX => None,
            n => Some(n),
        }
    }

    fn set_reported(&self, n: Option<usize>) {
        let n = n.unwrap_or(usize::MAX);
        if self.reported.swap(n, Ordering::Relaxed) != n {
            self.events.fire();
        }
    }

    /// Counts a build from its Solve until the returned guard drops.
    pub fn start_build(self: &Arc<Self>) -> LoadGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        // Only load observers: a started build frees no room for the dispatcher.
        self.events.bump_load();
        LoadGuard(self.clone())
    }

    pub fn capacity(&self) -> Option<usize> {
        self.settings.max_builds_per_backend
    }

    pub fn platforms(&self) -> Arc<Vec<String>> {
        self.platforms.read().expect("platforms lock").clone()
    }

    /// Keeps the workers' platforms, normalised (see `placement::normalize_platform`), so that
    /// matching a build's (normalised) platforms allocates nothing.
    pub fn set_platforms(&self, platforms: Vec<String>) {
        let mut platforms: Vec<String> = platforms
            .iter()
            .map(|p| crate::placement::normalize_platform(p))
            .collect();
        platforms.dedup();
        *self.platforms.write().expect("platforms lock") = Arc::new(platforms);
    }

    fn apply_spec(&self, spec: &EndpointSpec) {
        self.discovered.store(
            match spec.state {
                EndpointState::Ready => DISCOVERED_READY,
                EndpointState::Draining => DISCOVERED_DRAINING,
            },
            Ordering::Release,
        );
        self.gone.store(false, Ordering::Release);
        let mut address = self.address.write().expect("address lock");
        if !address.same_endpoint(&spec.address) {
            info!(backend = %self.identity, old = %*address, new = %spec.address, "backend address changed; reconnecting");
            *address = spec.address.clone();
            drop(address);
            *self.target.write().expect("target lock") = target_of(&spec.address);
            self.drop_connections();
            self.backoff.lock().expect("backoff lock").take();
        }
    }

    /// Ejects the backend from placement until a health check passes: its connection failed
    /// or could not be made. Running builds keep their routes.
    pub fn mark_unreachable(&self, reason: &str) {
        self.drop_connections();
        *self.last_error.lock().expect("error lock") = Some(reason.to_owned());
        if self.healthy.swap(false, Ordering::AcqRel) {
            warn!(backend = %self.identity, %reason, "backend connection failed; no new builds until a health check passes");
            self.events.fire();
            // Probe it again soon, not at the next health interval.
            *self.next_check.lock().expect("check lock") =
                (Instant::now() + FIRST_PROBE, FIRST_PROBE * 2);
        }
    }

    /// Why the backend was declared dead (`it stopped answering health checks for 7 s ...`),
    /// while it is: calls to it fail at once with this reason instead of hanging.
    pub fn dead_reason(&self) -> Option<Arc<str>> {
        self.dead.read().expect("dead lock").clone()
    }

    /// Takes the backend out of placement: a health check failed.
    fn eject(&self, reason: &str) {
        *self.last_error.lock().expect("error lock") = Some(reason.to_owned());
        if self.healthy.swap(false, Ordering::AcqRel) {
            warn!(backend = %self.identity, %reason, "backend failed a health check; no new builds until one passes");
            self.events.fire();
        }
    }

    /// Declares the backend dead: every stream on its connections ends now (the client gets
    /// UNAVAILABLE naming the backend, its build and `reason`), and calls to it fail at once
    /// until a health check passes.
    fn declare_dead(&self, reason: String) {
        warn!(backend = %self.identity, %reason, "backend declared dead; ending every stream on it");
        *self.dead.write().expect("dead lock") = Some(Arc::from(reason));
        self.drop_connections();
        // Dropping a connection's tasks fails every stream on it (h2 ends them when its
        // connection is dropped); the router's stream ends see the reason above.
        std::mem::take(&mut *self.life.lock().expect("life lock")).cancel();
        self.events.fire();
    }

    /// Forgets every call connection to the backend (new calls connect anew).
    fn drop_connections(&self) {
        for link in self.links.iter() {
            link.sender.lock().expect("sender lock").take();
        }
    }

    /// Forgets `connection` if it is still this thread's cached one: it refused a new stream
    /// (GOAWAY received, or failed), so the next call connects anew.
    pub fn forget(&self, connection: &Connection) {
        let mut cached = self.link().sender.lock().expect("sender lock");
        if cached.as_ref().is_some_and(|c| c.same(connection)) {
            cached.take();
        }
    }

    /// This worker thread's call connection to the backend.
    fn link(&self) -> &Link {
        &self.links[crate::runtime::shard() % self.links.len()]
    }

    /// An HTTP/2 connection to this backend: this worker thread's cached one, or a new one.
    pub async fn sender(&self) -> Result<Connection, ConnectError> {
        if let Some(reason) = self.dead_reason() {
            return Err(ConnectError::Dead {
                backend: self.identity.clone(),
                reason,
            });
        }
        let link = self.link();
        if let Some(sender) = link.cached() {
            return Ok(sender);
        }
        // One connect at a time per link; callers that waited reuse its result.
        let _connecting = link.connecting.lock().await;
        if let Some(sender) = link.cached() {
            return Ok(sender);
        }
        let address = self.address();
        if let Some(backoff) = self.backoff.lock().expect("backoff lock").as_ref() {
            let now = Instant::now();
            if backoff.next_attempt > now {
                return Err(ConnectError::BackingOff {
                    backend: self.identity.clone(),
                    address: address.to_string(),
                    retry_in: backoff.next_attempt - now,
                    reason: backoff.last_error.clone(),
                });
            }
        }
        match tokio::time::timeout(self.settings.connect_timeout, self.connect(&address)).await {
            Ok(Ok(sender)) => {
                self.backoff.lock().expect("backoff lock").take();
                *link.sender.lock().expect("sender lock") = Some(sender.clone());
                info!(backend = %self.identity, address = %address, "connected to backend");
                Ok(sender)
            }
            result => {
                let reason = match result {
                    Ok(Err(failure)) => failure.reason,
                    _ => format!(
                        "connect timed out after {:?}",
                        self.settings.connect_timeout
                    ),
                };
                let mut backoff = self.backoff.lock().expect("backoff lock");
                let failures = backoff.as_ref().map_or(0, |b| b.failures) + 1;
                // 100 ms, doubling, capped at MAX_PROBE: a daemon that comes up (scale from
                // zero) is used within about that long.
                let delay = Duration::from_millis(100u64.saturating_mul(1 << failures.min(7)))
                    .min(MAX_PROBE);
                *backoff = Some(Backoff {
                    failures,
                    next_attempt: Instant::now() + delay,
                    last_error: reason.clone(),
                });
                warn!(backend = %self.identity, address = %address, %reason, retry_in = ?delay, "backend connect failed");
                drop(backoff);
                self.mark_unreachable(&reason);
                Err(ConnectError::Failed {
                    backend: self.identity.clone(),
                    address: address.to_string(),
                    reason,
                })
            }
        }
    }

    /// Spawns the task that drives a new connection, stopped when the backend is declared
    /// dead (its life token), which ends every stream on it at once.
    fn drive<C>(&self, conn: C, identity: Arc<str>)
    where
        C: std::future::Future<Output = Result<(), h2::Error>> + Send + 'static,
    {
        let life = self.life.lock().expect("life lock").clone();
        tokio::spawn(async move {
            if let Some(Err(error)) = life.run_until_cancelled(conn).await {
                debug!(backend = %identity, %error, "backend connection ended");
            }
        });
    }

    async fn connect(&self, address: &BackendAddress) -> Result<Connection, ConnectFailure> {
        let tcp = TcpStream::connect((address.host.as_str(), address.port))
            .await
            .map_err(|e| ConnectFailure {
                refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
                reason: e.to_string(),
            })?;
        tcp.set_nodelay(true).map_err(ConnectFailure::other)?;
        // No HTTP/2 PINGs at all (no keepalive, no adaptive window, which pings to estimate
        // bandwidth): buildkitd v0.32.2 runs grpc-go v1.82.1 with the default keepalive
        // enforcement policy (MinTime 5 min, PermitWithoutStream false). A client that pings more
        // often, or at all without an active stream, collects strikes, and after 2 of them gets
        // GOAWAY ENHANCE_YOUR_CALM "too_many_pings" (internal/transport/http2_server.go,
        // handlePing), which would fail every build on the connection. Health checks are
        // ordinary gRPC requests on a connection of their own instead.
        let settings = upstream::Settings {
            stream_window: self.settings.stream_window,
            connection_window: self.settings.connection_window,
            max_frame_size: self.settings.max_frame_size,
            max_send_buffer: 1024 * 1024,
            max_header_list_size: 256 * 1024,
        };
        let identity = self.identity.clone();
        let mut io = BufferedIo::new(tcp);
        io.set_defer_small(false);
        let (connection, drive) = match &address.tls {
            None => Connection::handshake(io, settings)
                .await
                .map_err(ConnectFailure::other)?,
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.client_config.clone());
                let mut io = io;
                // The handshake does not flush again when woken (see BufferedIo).
                io.set_defer_flush(false);
                let mut stream = connector
                    .connect(tls.server_name.clone(), io)
                    .await
                    .map_err(|e| ConnectFailure::other(format!("TLS handshake: {e}")))?;
                stream.get_mut().0.set_defer_flush(true);
                let (connection, drive) = Connection::handshake(stream, settings)
                    .await
                    .map_err(ConnectFailure::other)?;
                self.drive(drive, identity);
                return Ok(connection);
            }
        };
        self.drive(drive, identity);
        Ok(connection)
    }

    /// The URI of `path` on this backend (scheme and authority as a direct client would send).
    pub fn uri_for(&self, path_and_query: PathAndQuery) -> Uri {
        let target = self.target.read().expect("target lock");
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(target.0.clone());
        parts.authority = Some(target.1.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("http://invalid/"))
    }

    /// Sends a router-made gRPC call (`message` framed) and returns the response head.
    async fn router_call(
        &self,
        path: &'static str,
        message: &[u8],
    ) -> Result<Response<BackendBody>, String> {
        let mut sender = self.sender().await.map_err(|e| e.to_string())?;
        let request = Request::post(self.uri_for(PathAndQuery::from_static(path)))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(RequestBody::full(crate::wire::encode_frame(message)))
            .map_err(|e| e.to_string())?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let response = sender.send(request).map_err(|e| e.to_string())?;
        response.await.map_err(|e| e.to_string())
    }

    /// One unary gRPC call with an empty request on the health connection (health checks and
    /// the worker refresh), bounded by `timeout`. An error status or a bad answer is
    /// [`Probe::Refused`] (the daemon answered); a timeout or a connection failure is
    /// [`Probe::Silent`]. Any failure drops the health connection: the next check connects anew.
    async fn health_call(&self, path: &'static str, timeout: Duration) -> Result<Bytes, Probe> {
        let cached = self.health_sender.lock().expect("health lock").take();
        let call = async {
            let mut sender = match cached {
                Some(sender) if !sender.is_closed() => sender,
                _ => {
                    let address = self.address();
                    self.connect(&address).await.map_err(|e| {
                        let reason = format!("cannot connect to {address}: {e}");
                        if e.refused {
                            Probe::NotListening(reason)
                        } else {
                            Probe::Silent(reason)
                        }
                    })?
                }
            };
            let silent = |e: h2::Error| Probe::Silent(format!("{path} failed: {e}"));
            sender.ready().await.map_err(silent)?;
            let request = Request::post(self.uri_for(PathAndQuery::from_static(path)))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(RequestBody::full(crate::wire::encode_frame(&[])))
                .map_err(|e| Probe::Refused(e.to_string()))?;
            let response = sender
                .send(request)
                .map_err(silent)?
                .await
                .map_err(silent)?;
            let refused = |code| Probe::Refused(format!("{path} answered grpc-status {code}"));
            if let Some(code) = crate::grpc::grpc_status_of(response.headers()) {
                if code != 0 {
                    return Err(refused(code));
                }
            }
            let collected = response.into_body().collect().await.map_err(silent)?;
            if let Some(code) = collected.trailers().and_then(crate::grpc::grpc_status_of) {
                if code != 0 {
                    return Err(refused(code));
                }
            }
            let bytes = collected.to_bytes();
            let message = match crate::wire::parse_frame_header(&bytes, 64 * 1024 * 1024) {
                Ok(Some(header)) if bytes.len() >= crate::wire::GRPC_PREFIX_LEN + header.len => {
                    bytes.slice(
                        crate::wire::GRPC_PREFIX_LEN..crate::wire::GRPC_PREFIX_LEN + header.len,
                    )
                }
                Ok(_) => {
                    return Err(Probe::Refused(format!(
                        "{path} answered no complete message"
                    )))
                }
                Err(e) => {
                    return Err(Probe::Refused(format!(
                        "{path} answered a bad message: {e}"
                    )))
                }
            };
            Ok((sender, message))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok((sender, message))) => {
                *self.health_sender.lock().expect("health lock") = Some(sender);
                Ok(message)
            }
            Ok(Err(probe)) => Err(probe),
            Err(_) => Err(Probe::Silent(format!("{path} timed out after {timeout:?}"))),
        }
    }

    /// Keeps `ListenBuildHistory{ActiveOnly: true}` open and counts the builds the daemon
    /// reports running (STARTED adds a ref, COMPLETE and DELETED remove it), so that every router
    /// replica sees the builds of all of them. Reopened with backoff (1 s to 5 s) while the
    /// backend exists; the count is unknown while the stream is down.
    async fn watch_active_builds(self: Arc<Self>) {
        const LISTEN: &str = "/moby.buildkit.v1.Control/ListenBuildHistory";
        // BuildHistoryRequest{ActiveOnly (1): true}
        const ACTIVE_ONLY: &[u8] = &[0x08, 0x01];
        let mut delay = Duration::from_secs(1);
        while !self.gone.load(Ordering::Acquire) {
            let opened = Instant::now();
            let result = self.stream_active_builds(LISTEN, ACTIVE_ONLY).await;
            self.set_reported(None);
            if opened.elapsed() > Duration::from_secs(60) {
                delay = Duration::from_secs(1);
            }
            debug!(backend = %self.identity, reason = %result.err().unwrap_or_default(), retry_in = ?delay, "active-build report stream ended");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.watching.store(false, Ordering::Release);
    }

    async fn stream_active_builds(&self, path: &'static str, message: &[u8]) -> Result<(), String> {
        let response = self.router_call(path, message).await?;
        if let Some(code) = crate::grpc::grpc_status_of(response.headers()) {
            return Err(format!("{path} answered grpc-status {code}"));
        }
        let mut body = response.into_body();
        let mut splitter = crate::wire::MessageSplitter::default();
        let mut active: std::collections::HashSet<String> = Default::default();
        self.set_reported(Some(0));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Ok(data) = frame.into_data() else {
                return Ok(()); // trailers: the daemon ended the stream
            };
            splitter.push(&data);
            while let Some(framed) = splitter.next_message(16 << 20).map_err(|e| e.to_string())? {
                let (kind, build_ref) =
                    crate::wire::decode_history_event(&framed[crate::wire::GRPC_PREFIX_LEN..])
                        .map_err(|e| e.to_string())?;
                match kind {
                    crate::wire::HISTORY_STARTED => active.insert(build_ref.to_owned()),
                    _ => active.remove(build_ref),
                };
            }
            self.set_reported(Some(active.len()));
        }
        Ok(())
    }

    /// Whether a health check is due: every health interval while healthy; after a backoff from
    /// [`FIRST_PROBE`] (doubling to the interval) while ejected, so a daemon that comes back
    /// rejoins within a fraction of a second.
    fn health_due(&self, now: Instant) -> bool {
        self.next_check.lock().expect("check lock").0 <= now
    }

    fn schedule_next_check(&self) {
        let now = Instant::now();
        let interval = self.settings.health_interval;
        let mut next = self.next_check.lock().expect("check lock");
        let cap = interval.min(MAX_PROBE);
        *next = if self.healthy.load(Ordering::Acquire) {
            (now + interval, FIRST_PROBE)
        } else {
            (now + next.1.min(cap), (next.1 * 2).min(cap))
        };
    }

    /// One health check: gRPC health on the health connection, bounded by the health timeout.
    /// Any failure takes the backend out of placement at once. `--health-failures` unanswered
    /// checks in a row declare it dead (see [`Backend::declare_dead`]). A passing check
    /// re-admits it and refreshes its workers' platforms.
    async fn check_health(&self) {
        const HEALTH: &str = "/grpc.health.v1.Health/Check";
        const LIST_WORKERS: &str = "/moby.buildkit.v1.Control/ListWorkers";
        let timeout = self.settings.health_timeout;
        let started = Instant::now();
        let probe = match self.health_call(HEALTH, timeout).await {
            Ok(message) => match crate::wire::decode_health_status(&message) {
                Ok(1) => Probe::Serving,
                Ok(status) => Probe::Refused(format!("health status {status} (not SERVING)")),
                Err(e) => Probe::Refused(format!("bad health answer: {e}")),
            },
            Err(probe) => probe,
        };
        let reason = match probe {
            Probe::Serving => {
                self.silence.lock().expect("silence lock").take();
                if self.dead.write().expect("dead lock").take().is_some() {
                    info!(backend = %self.identity, "backend declared dead answers health checks again");
                }
                // Refresh the platforms the workers support (cheap; buildx calls it per build)
                // before (re-)admitting the backend, so that its first placement knows them
                // (`--strict-platforms` refused nothing when a build came right after start).
                match self.health_call(LIST_WORKERS, timeout).await {
                    Ok(message) => match crate::wire::decode_worker_platforms(&message) {
                        Ok(platforms) => self.set_platforms(platforms),
                        Err(e) => {
                            warn!(backend = %self.identity, error = %e, "cannot decode ListWorkers answer")
                        }
                    },
                    Err(Probe::Refused(e) | Probe::NotListening(e) | Probe::Silent(e)) => {
                        debug!(backend = %self.identity, error = %e, "ListWorkers refresh failed")
                    }
                    Err(Probe::Serving) => {}
                }
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    info!(backend = %self.identity, "backend passes health checks again; re-admitted");
                    self.events.fire();
                }
                return;
            }
            Probe::Refused(reason) => {
                // It answered: alive, so its running builds go on.
                self.silence.lock().expect("silence lock").take();
                reason
            }
            // Neither alive nor silent: its streams end by themselves (see `Probe`).
            Probe::NotListening(reason) => reason,
            Probe::Silent(reason) => {
                let silence = {
                    let mut silence = self.silence.lock().expect("silence lock");
                    let s = silence.get_or_insert(Silence {
                        checks: 0,
                        since: started,
                    });
                    s.checks += 1;
                    *s
                };
                if silence.checks >= self.settings.health_failures.max(1)
                    && self.dead_reason().is_none()
                {
                    self.declare_dead(format!(
                        "it stopped answering health checks for {} s ({} checks in a row; last: {reason})",
                        silence.since.elapsed().as_secs(),
                        silence.checks
                    ));
                }
                reason
            }
        };
        self.eject(&reason);
    }
}

impl crate::body::ConnectionHealth for Backend {
    fn connection_failed(&self, reason: &str) {
        self.mark_unreachable(reason);
    }

    fn dead_reason(&self) -> Option<Arc<str>> {
        Backend::dead_reason(self)
    }
}

/// Counts one running build on a backend; dropping it ends the count.
pub struct LoadGuard(Arc<Backend>);

impl LoadGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.events.fire();
    }
}

impl crate::placement::Node for Arc<Backend> {
    fn identity(&self) -> &str {
        &self.identity
    }
    fn identity_hash(&self) -> u64 {
        self.identity_hash
    }
    fn active_builds(&self) -> usize {
        Backend::active_builds(self)
    }
    fn reported_builds(&self) -> Option<usize> {
        Backend::reported_builds(self)
    }
    fn accepts_builds(&self) -> bool {
        self.state() == BackendState::Ready
    }
    fn capacity(&self) -> Option<usize> {
        Backend::capacity(self)
    }
    fn supports_platform(&self, platform: &str) -> bool {
        let platforms = self.platforms.read().expect("platforms lock");
        platforms.is_empty() || platforms.iter().any(|p| platform_matches(p, platform))
    }
    fn platforms(&self) -> Vec<String> {
        Backend::platforms(self).as_ref().clone()
    }
}

/// The scheme and authority a direct client would use for `address`.
fn target_of(address: &BackendAddress) -> (Scheme, Authority) {
    let scheme = if address.tls.is_some() {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    let text = if address.host.contains(':') {
        format!("[{}]:{}", address.host, address.port)
    } else {
        format!("{}:{}", address.host, address.port)
    };
    let authority =
        Authority::try_from(text.as_str()).unwrap_or_else(|_| Authority::from_static("invalid"));
    (scheme, authority)
}

/// Whether a worker listing `worker` builds `wanted`, both normalised: the same platform, or a
/// variant of the wanted one (`linux/amd64/v3` builds `linux/amd64`; a wanted bare OS takes any
/// architecture).
fn platform_matches(worker: &str, wanted: &str) -> bool {
    worker == wanted
        || worker
            .strip_prefix(wanted)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The backends at one instant. Cheap to take: an `Arc` clone.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub backends: Vec<Arc<Backend>>,
    index: HashMap<Arc<str>, usize>,
}

impl Snapshot {
    pub fn get(&self, identity: &str) -> Option<&Arc<Backend>> {
        self.index.get(identity).map(|&i| &self.backends[i])
    }

    pub fn any_ready(&self) -> Option<&Arc<Backend>> {
        self.backends
            .iter()
            .find(|b| b.state() == BackendState::Ready)
    }
}

/// The set of backends.
pub struct Pool {
    snapshot: RwLock<Arc<Snapshot>>,
    settings: Arc<PoolSettings>,
    synced: watch::Sender<bool>,
    events: Arc<PoolEvents>,
}

impl Pool {
    /// The settings of its backends' connections.
    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("backends", &self.snapshot().backends)
            .finish()
    }
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        Arc::new(Self {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            settings: Arc::new(settings),
            synced: watch::Sender::new(false),
            events: Arc::new(PoolEvents::default()),
        })
    }

    /// Fires (one stored permit) when the pool may have room it had not before, or lost some:
    /// a backend added, removed, ejected or re-admitted, a build ended, a daemon's report of its
    /// running builds changed. For one waiter: the admission queue's dispatcher.
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.events.room
    }

    /// Changes whenever [`Pool::changed`] fires or a build starts: for any number of observers
    /// of the pool's load (the KEDA scaler), which must not take the dispatcher's permit.
    pub fn load_changes(&self) -> watch::Receiver<u64> {
        self.events.load.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    /// True once a discovery source delivered its first complete list.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first complete list of backends has arrived.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Applies one discovery update.
    pub fn apply(&self, update: PoolUpdate) {
        let mut guard = self.snapshot.write().expect("snapshot lock");
        let mut backends = guard.backends.clone();
        match update {
            PoolUpdate::Reset(specs) => {
                let wanted: HashMap<&str, &EndpointSpec> =
                    specs.iter().map(|s| (s.identity.as_str(), s)).collect();
                backends.retain(|b| {
                    let keep = wanted.contains_key(&*b.identity);
                    if !keep {
                        b.gone.store(true, Ordering::Release);
                        info!(backend = %b.identity, "backend removed by discovery");
                    }
                    keep
                });
                for spec in &specs {
                    self.upsert(&mut backends, spec.clone());
                }
                self.synced.send_replace(true);
            }
            PoolUpdate::Add(spec) | PoolUpdate::Update(spec) => self.upsert(&mut backends, spec),
            PoolUpdate::Remove(identity) => backends.retain(|b| {
                let keep = *b.identity != *identity;
                if !keep {
                    b.gone.store(true, Ordering::Release);
                    info!(backend = %b.identity, "backend removed by discovery");
                }
                keep
            }),
        }
        let index = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.identity.clone(), i))
            .collect();
        *guard = Arc::new(Snapshot { backends, index });
        self.events.fire();
    }

    fn upsert(&self, backends: &mut Vec<Arc<Backend>>, spec: EndpointSpec) {
        match backends.iter().find(|b| *b.identity == *spec.identity) {
            Some(existing) => existing.apply_spec(&spec),
            None => {
                info!(backend = %spec.identity, address = %spec.address, state = ?spec.state, "backend added");
                backends.push(Arc::new(Backend::new(
                    spec,
                    self.settings.clone(),
                    self.events.clone(),
                )));
            }
        }
    }

    /// Applies updates from discovery sources until every sender is gone.
    pub async fn run_updates(self: Arc<Self>, mut updates: mpsc::Receiver<PoolUpdate>) {
        while let Some(update) = updates.recv().await {
            self.apply(update);
        }
    }

    /// Health-checks every backend when due (see `Backend::health_due`), forever. Each check
    /// runs in its own task, so a backend that does not answer delays no other.
    pub async fn run_health_checks(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEALTH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let snapshot = self.snapshot();
            for backend in &snapshot.backends {
                if !backend.watching.swap(true, Ordering::AcqRel) {
                    tokio::spawn(backend.clone().watch_active_builds());
                }
                if backend.health_due(now) && !backend.checking.swap(true, Ordering::AcqRel) {
                    let backend = backend.clone();
                    tokio::spawn(async move {
                        backend.check_health().await;
                        backend.schedule_next_check();
                        backend.checking.store(false, Ordering::Release);
                    });
                }
            }
        }
    }

    /// Number of backends in each state.
    pub fn state_counts(&self) -> [(BackendState, usize); 4] {
        let snapshot = self.snapshot();
        BackendState::ALL.map(|state| {
            (
                state,
                snapshot
                    .backends
                    .iter()
                    .filter(|b| b.state() == state)
                    .count(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, state: EndpointState) -> EndpointSpec {
        EndpointSpec {
            identity: id.into(),
            address: BackendAddress::tcp("127.0.0.1", 1),
            state,
            zone: None,
            node: None,
        }
    }

    #[test]
    fn reset_adds_updates_and_removes() {
        let pool = Pool::new(PoolSettings::default());
        assert!(!pool.is_synced());
        pool.apply(PoolUpdate::Reset(vec![
            spec("a", EndpointState::Ready),
            spec("b", EndpointState::Ready),
        ]));
        assert!(pool.is_synced());
        let a = pool.snapshot().get("a").cloned().expect("a");
        pool.apply(PoolUpdate::Reset(vec![
            spec("a", EndpointState::Draining),
            spec("c", EndpointState::Ready),
        ]));
        let snap = pool.snapshot();
        assert_eq!(snap.backends.len(), 2);
        assert!(snap.get("b").is_none());
        assert_eq!(
            a.state(),
            BackendState::Draining,
            "same backend object keeps its builds"
        );
        pool.apply(PoolUpdate::Remove("a".into()));
        assert_eq!(a.state(), BackendState::Gone);
        assert!(pool.snapshot().get("a").is_none());
    }

    #[test]
    fn platform_variants_match() {
        // Aliases, as buildkitd accepts them, once both sides are normalised.
        let matches = |worker: &str, wanted: &str| {
            let n = crate::placement::normalize_platform;
            platform_matches(&n(worker), &n(wanted))
        };
        assert!(matches("linux/arm64/v8", "linux/arm64"));
        assert!(matches("linux/arm64", "linux/arm64/v8"));
        assert!(matches("linux/arm64", "linux/aarch64"));
        assert!(matches("linux/arm64", "arm64"));
        assert!(matches("linux/amd64", "linux/x86_64"));
        assert!(matches("linux/386", "linux/i386"));
        assert!(matches("linux/arm/v7", "linux/armhf"));
        assert!(matches("linux/arm/v7", "linux/arm"));
        assert!(!matches("linux/arm/v6", "linux/arm"));
        assert!(!matches("linux/amd64", "linux/aarch64"));
        assert!(platform_matches("linux/amd64", "linux/amd64"));
        assert!(!platform_matches("linux/amd64/v2", "linux/arm64"));
        assert!(!platform_matches("linux/arm", "linux/arm64"));
    }
}
