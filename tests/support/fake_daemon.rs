//! A faithful fake buildkitd: a real HTTP/2 (h2c or TLS) gRPC server implementing the Control,
//! LLBBridge and `grpc.health.v1` services the BuildKit clients use, with BuildKit's own waits and
//! error texts, the daemon side of the Session tunnel (it is the HTTP/2 *client* of the inner
//! connection and calls the build client's Health and FileSync/FileSend through it), and counters
//! of everything that reached it.
//!
//! ```ignore
//! let d = FakeDaemon::start("d0", DaemonOpts::default()).await;
//! let c = Client::connect(d.addr()).await.unwrap();
//! assert!(c.build(BuildOpts::buildctl()).await.ok());
//! assert_eq!(d.counters().calls("Solve"), 1);
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use buildkit_router::proto::control::control_server::{Control, ControlServer};
use buildkit_router::proto::control::{
    self as pb, BuildHistoryEvent, BuildHistoryEventType, BuildHistoryRecord, BytesMessage,
};
use buildkit_router::proto::filesync::file_send_client::FileSendClient;
use buildkit_router::proto::filesync::file_sync_client::FileSyncClient;
use buildkit_router::proto::filesync::Packet;
use buildkit_router::proto::gateway as gw;
use buildkit_router::proto::gateway::llb_bridge_server::{LlbBridge, LlbBridgeServer};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::gate::{Gate, GatedIo};
use super::tunnel;
use super::MAX_MESSAGE;

/// fsutil packet types.
pub const PACKET_STAT: i32 = 0;
pub const PACKET_REQ: i32 = 1;
pub const PACKET_DATA: i32 = 2;
pub const PACKET_FIN: i32 = 3;
pub const PACKET_ERR: i32 = 4;

/// BuildKit's timers. [`Timers::default`] is the real daemon's values; tests that must run on
/// real time (sockets) shorten them.
#[derive(Clone, Debug)]
pub struct Timers {
    /// How long a Solve waits for a session it names (`no active session for <id>: context
    /// deadline exceeded`). BuildKit: 5 s per lookup.
    pub session_wait: Duration,
    /// How long `Status` waits for its job (`no such job <ref>`). BuildKit: 6 s.
    pub status_wait: Duration,
    /// How long an `LLBBridge` call waits for its job (`no such job <ref>`). BuildKit: 3 s.
    pub bridge_wait: Duration,
    /// Interval of the health check through each session's tunnel. BuildKit: 5 s.
    pub health_interval: Duration,
    /// Timeout of one such health check.
    pub health_timeout: Duration,
    /// Consecutive failed health checks after which the session is dropped. BuildKit: 2.
    pub health_failures: u32,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            session_wait: Duration::from_secs(5),
            status_wait: Duration::from_secs(6),
            bridge_wait: Duration::from_secs(3),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(5),
            health_failures: 2,
        }
    }
}

/// Options of a fake daemon.
#[derive(Clone)]
pub struct DaemonOpts {
    /// Listen here instead of an ephemeral port (a daemon that comes up at a known address).
    pub listen: Option<std::net::SocketAddr>,
    /// Serve TLS with this config (set its ALPN as you need); h2c when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Worker platforms reported by ListWorkers (`os/arch[/variant]`). Default `linux/amd64`.
    pub platforms: Vec<String>,
    pub timers: Timers,
    /// Hold every build after its context upload until [`FakeDaemon::release_builds`].
    pub hold_builds: bool,
    /// Artificial extra build time after the context upload (a sleep inside the fake build,
    /// never used for synchronisation).
    pub build_duration: Option<Duration>,
    /// Bytes sent to the client by a local/oci/tar export (FileSend). Default 1 MiB.
    pub export_size: usize,
    /// Test knob, not BuildKit behaviour: accept Session streams but never start the inner
    /// connection nor register the session (what a proxy that holds a Session too long looks
    /// like to the client).
    pub stall_sessions: bool,
    /// Test knob: drop the build context's FileSync/DiffCopy call (the client sees
    /// RST_STREAM CANCEL inside the tunnel) once this many context bytes arrived, and carry on
    /// as if the upload had finished.
    pub abort_context_after: Option<u64>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        DaemonOpts {
            listen: None,
            tls: None,
            platforms: vec!["linux/amd64".into()],
            timers: Timers::default(),
            hold_builds: false,
            build_duration: None,
            export_size: 1 << 20,
            stall_sessions: false,
            abort_context_after: None,
        }
    }
}

/// What a session registered on this daemon looked like.
#[derive(Clone, Debug, Default)]
pub struct SessionInfo {
    pub shared_key: String,
    /// The `x-docker-expose-session-grpc-method` values.
    pub methods: Vec<String>,
    /// Calls the daemon made into the client through the tunnel, in order.
    pub tunnel_calls: Vec<String>,
    /// Bytes received through FileSync/DiffCopy on this session.
    pub bytes_uploaded: u64,
    /// The Dockerfile the daemon's frontend read through FileSync (the `dockerfile` local),
    /// as received.
    pub dockerfile: Vec<u8>,
    /// DATA packets received through FileSync whose bytes were not what the client sent
    /// (see `support::pattern_ok`): corruption or reordering on the way.
    pub corrupt_packets: u64,
    pub health_checks_ok: u64,
    pub health_checks_failed: u64,
    pub ended: bool,
}

/// Counters of everything that reached a daemon. Read them with the accessor methods.
#[derive(Default)]
pub struct Counters {
    calls: Mutex<HashMap<String, u64>>,
    by_ref: Mutex<HashMap<String, Vec<String>>>,
    sessions: Mutex<HashMap<String, SessionInfo>>,
    cancelled_refs: Mutex<Vec<String>>,
    completed_refs: Mutex<Vec<String>>,
    /// Builds whose Solve failed, with the error.
    failed_refs: Mutex<Vec<(String, String)>>,
    bytes_uploaded: AtomicU64,
    bytes_exported: AtomicU64,
    cancels: AtomicU64,
    no_such_job: AtomicU64,
    no_active_session: AtomicU64,
    no_buildid: AtomicU64,
    connections: AtomicU64,
    /// Bumped on every change that tests may wait for.
    changed: watch::Sender<u64>,
}

impl Counters {
    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn call(&self, method: &str, build_ref: Option<&str>) {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(method.to_string())
            .or_default() += 1;
        if let Some(r) = build_ref.filter(|r| !r.is_empty()) {
            self.by_ref
                .lock()
                .unwrap()
                .entry(r.to_string())
                .or_default()
                .push(method.to_string());
        }
        self.bump();
    }

    fn session_mut<T>(&self, id: &str, f: impl FnOnce(&mut SessionInfo) -> T) -> T {
        let r = f(self
            .sessions
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default());
        self.bump();
        r
    }

    /// Calls of `method` (`"Solve"`, `"Status"`, `"Session"`, `"ListWorkers"`, `"Info"`,
    /// `"DiskUsage"`, `"Prune"`, `"ListenBuildHistory"`, `"UpdateBuildHistory"`,
    /// `"LLBBridge/Ping"`, `"LLBBridge/Solve"`, `"LLBBridge/Return"`, ...).
    pub fn calls(&self, method: &str) -> u64 {
        self.calls.lock().unwrap().get(method).copied().unwrap_or(0)
    }

    /// All calls by method.
    pub fn all_calls(&self) -> HashMap<String, u64> {
        self.calls.lock().unwrap().clone()
    }

    /// The methods that reached this daemon for build `build_ref`, in arrival order (Solve,
    /// Status, LLBBridge/*, history calls naming the ref).
    pub fn methods_for(&self, build_ref: &str) -> Vec<String> {
        self.by_ref
            .lock()
            .unwrap()
            .get(build_ref)
            .cloned()
            .unwrap_or_default()
    }

    /// Every build ref seen by any call.
    pub fn refs(&self) -> HashSet<String> {
        self.by_ref.lock().unwrap().keys().cloned().collect()
    }

    /// Whether a `Control/Session` with this uuid reached this daemon.
    pub fn saw_session(&self, id: &str) -> bool {
        self.sessions.lock().unwrap().contains_key(id)
    }

    /// What happened on session `id`, if it reached this daemon.
    pub fn session(&self, id: &str) -> Option<SessionInfo> {
        self.sessions.lock().unwrap().get(id).cloned()
    }

    /// Session ids seen.
    pub fn sessions(&self) -> HashSet<String> {
        self.sessions.lock().unwrap().keys().cloned().collect()
    }

    /// Bytes received through FileSync (context uploads) on all sessions.
    pub fn bytes_uploaded(&self) -> u64 {
        self.bytes_uploaded.load(Ordering::SeqCst)
    }

    /// Bytes sent through FileSend (exports).
    pub fn bytes_exported(&self) -> u64 {
        self.bytes_exported.load(Ordering::SeqCst)
    }

    /// Solves cancelled by their client (RST_STREAM) while running.
    pub fn cancels(&self) -> u64 {
        self.cancels.load(Ordering::SeqCst)
    }

    /// Whether any call of build `build_ref` reached this daemon. A history lookup by ref
    /// (`ListenBuildHistory{Ref}`, which the router sends every daemon to find an old build) is
    /// not part of the build.
    pub fn served_build(&self, build_ref: &str) -> bool {
        self.methods_for(build_ref)
            .iter()
            .any(|m| m != "ListenBuildHistory")
    }

    /// Refs of the cancelled Solves.
    pub fn cancelled_refs(&self) -> Vec<String> {
        self.cancelled_refs.lock().unwrap().clone()
    }

    /// Refs of Solves that completed successfully.
    /// Builds whose Solve failed (not cancelled), with the error message.
    pub fn failed_refs(&self) -> Vec<(String, String)> {
        self.failed_refs.lock().unwrap().clone()
    }

    pub fn completed_refs(&self) -> Vec<String> {
        self.completed_refs.lock().unwrap().clone()
    }

    /// `no such job` errors sent (Status and LLBBridge).
    pub fn no_such_job(&self) -> u64 {
        self.no_such_job.load(Ordering::SeqCst)
    }

    /// `no active session` errors sent.
    pub fn no_active_session(&self) -> u64 {
        self.no_active_session.load(Ordering::SeqCst)
    }

    /// `no buildid found in context` errors sent.
    pub fn no_buildid(&self) -> u64 {
        self.no_buildid.load(Ordering::SeqCst)
    }

    /// Routing errors of all kinds: `no such job` + `no active session` + `no buildid`.
    pub fn routing_errors(&self) -> u64 {
        self.no_such_job() + self.no_active_session() + self.no_buildid()
    }

    /// Accepted connections.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Phase of a job, observed by Status streams.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Running(u32),
    Done,
    Failed(String),
    Cancelled,
}

impl Phase {
    fn terminal(&self) -> bool {
        !matches!(self, Phase::Running(_))
    }
}

struct Job {
    frontend_attrs: HashMap<String, String>,
    phase: watch::Sender<Phase>,
    returned: watch::Sender<bool>,
}

impl Job {
    fn step(&self) {
        self.phase.send_modify(|p| {
            if let Phase::Running(n) = p {
                *n += 1;
            }
        });
    }
}

struct SessionEntry {
    channel: Channel,
}

struct State {
    name: String,
    opts: DaemonOpts,
    counters: Arc<Counters>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Whether a build was ever recorded: BuildKit creates its history bucket with the first
    /// record, and answers history updates differently before that.
    history_bucket: std::sync::atomic::AtomicBool,
    sessions: Mutex<HashMap<String, SessionEntry>>,
    disk: Mutex<Vec<pb::UsageRecord>>,
    held: AtomicU64,
    released: watch::Sender<bool>,
    history: tokio::sync::broadcast::Sender<BuildHistoryEvent>,
    kill: CancellationToken,
    /// A graceful stop began ([`FakeDaemon::shutdown`]).
    graceful: CancellationToken,
    /// Freezes every socket, as SIGSTOP does ([`FakeDaemon::freeze`]).
    gate: Arc<Gate>,
}

impl State {
    fn bump(&self) {
        self.counters.bump();
    }

    /// Waits until `f` yields something, or `dur` passes.
    async fn wait_for<T>(&self, dur: Duration, f: impl Fn(&State) -> Option<T>) -> Option<T> {
        let mut rx = self.counters.changed.subscribe();
        let fut = async {
            loop {
                rx.borrow_and_update();
                if let Some(v) = f(self) {
                    return v;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(dur, fut).await.ok()
    }

    async fn wait_job(&self, build_ref: &str, dur: Duration) -> Result<Arc<Job>, Status> {
        match self
            .wait_for(dur, |s| s.jobs.lock().unwrap().get(build_ref).cloned())
            .await
        {
            Some(j) => Ok(j),
            None => {
                self.counters.no_such_job.fetch_add(1, Ordering::SeqCst);
                Err(Status::not_found(format!("no such job {build_ref}")))
            }
        }
    }

    async fn wait_session(&self, id: &str) -> Result<Channel, Status> {
        match self
            .wait_for(self.opts.timers.session_wait, |s| {
                s.sessions
                    .lock()
                    .unwrap()
                    .get(id)
                    .map(|e| e.channel.clone())
            })
            .await
        {
            Some(c) => Ok(c),
            None => {
                self.counters
                    .no_active_session
                    .fetch_add(1, Ordering::SeqCst);
                Err(Status::unknown(format!(
                    "no active session for {id}: context deadline exceeded"
                )))
            }
        }
    }

    fn now_header(&self) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
        rfc3339_now().parse().expect("ascii")
    }
}

/// The current time as RFC 3339 with nanoseconds (`2026-11-23T22:31:32.548699869Z`), as
/// buildkitd's `buildkit-current-timestamp` header carries it.
fn rfc3339_now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = t.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.subsec_nanos()
    )
}

/// Increments `cancels` when a Solve's future is dropped before it finished: that is what
/// hyper does when the client resets the stream (RST_STREAM CANCEL).
struct CancelGuard {
    state: Arc<State>,
    job: Arc<Job>,
    build_ref: String,
    armed: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            if !self.state.kill.is_cancelled() {
                self.state.counters.cancels.fetch_add(1, Ordering::SeqCst);
                self.state
                    .counters
                    .cancelled_refs
                    .lock()
                    .unwrap()
                    .push(self.build_ref.clone());
            }
            self.job.phase.send_replace(Phase::Cancelled);
            let _ = self.state.history.send(history_event(
                BuildHistoryEventType::Complete,
                &self.build_ref,
            ));
        }
    }
}

/// Returns once a graceful stop began and no build runs.
async fn stopping_and_idle(state: &State) {
    state.graceful.cancelled().await;
    let mut events = state.history.subscribe();
    loop {
        let running = state
            .jobs
            .lock()
            .unwrap()
            .values()
            .any(|j| !j.phase.borrow().terminal());
        if !running {
            return;
        }
        if let Err(tokio::sync::broadcast::error::RecvError::Closed) = events.recv().await {
            return;
        }
    }
}

fn history_event(t: BuildHistoryEventType, build_ref: &str) -> BuildHistoryEvent {
    BuildHistoryEvent {
        r#type: t as i32,
        record: Some(BuildHistoryRecord {
            r#ref: build_ref.to_string(),
            frontend: "gateway.v0".into(),
            frontend_attrs: HashMap::new(),
        }),
    }
}

/// A running fake daemon. Dropping it kills it.
pub struct FakeDaemon {
    state: Arc<State>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl FakeDaemon {
    /// A daemon with default options that holds every build after its context upload
    /// ([`DaemonOpts::hold_builds`]).
    pub async fn start_holding(name: &str) -> FakeDaemon {
        let opts = DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        };
        FakeDaemon::start(name, opts).await
    }

    /// Starts a daemon named `name` on 127.0.0.1:0.
    pub async fn start(name: &str, opts: DaemonOpts) -> FakeDaemon {
        let listener = TcpListener::bind(
            opts.listen
                .unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal")),
        )
        .await
        .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let disk = vec![
            pb::UsageRecord {
                id: format!("{name}-rec1"),
                mutable: false,
                in_use: false,
                size: 4096,
            },
            pb::UsageRecord {
                id: format!("{name}-rec2"),
                mutable: true,
                in_use: false,
                size: 8192,
            },
        ];
        let state = Arc::new(State {
            name: name.to_string(),
            released: watch::channel(!opts.hold_builds).0,
            opts,
            counters: Arc::new(Counters::default()),
            jobs: Mutex::new(HashMap::new()),
            history_bucket: Default::default(),
            sessions: Mutex::new(HashMap::new()),
            disk: Mutex::new(disk),
            held: AtomicU64::new(0),
            history: tokio::sync::broadcast::channel(1024).0,
            kill: CancellationToken::new(),
            graceful: CancellationToken::new(),
            gate: Gate::new(),
        });
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, state.clone(), shutdown.clone()));
        FakeDaemon {
            state,
            addr,
            shutdown,
            server: Some(server),
        }
    }

    /// `n` daemons named `bk0`, `bk1`... with the same options.
    pub async fn start_pool(n: usize, opts: DaemonOpts) -> Vec<FakeDaemon> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(FakeDaemon::start(&format!("bk{i}"), opts.clone()).await);
        }
        out
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `tcp://127.0.0.1:port`, as a `--backend` flag wants it.
    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.state.counters.clone()
    }

    /// Number of builds currently held (see [`DaemonOpts::hold_builds`]).
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` builds are held mid-build (after their context upload).
    pub async fn wait_held(&self, n: u64) {
        self.state
            .wait_for(Duration::MAX, |s| {
                (s.held.load(Ordering::SeqCst) >= n).then_some(())
            })
            .await;
    }

    /// Waits until no build is held any more (released, or cancelled by its client).
    pub async fn wait_none_held(&self) {
        self.state
            .wait_for(Duration::MAX, |s| {
                (s.held.load(Ordering::SeqCst) == 0).then_some(())
            })
            .await;
    }

    /// Waits until a session with this id is registered (its tunnel is up).
    pub async fn wait_session(&self, id: &str) {
        self.state
            .wait_for(Duration::MAX, |s| {
                s.sessions.lock().unwrap().contains_key(id).then_some(())
            })
            .await;
    }

    /// Waits until the daemon has health-checked session `id` successfully `n` times through
    /// its tunnel.
    pub async fn wait_health_checks(&self, id: &str, n: u64) {
        self.state
            .wait_for(Duration::MAX, |s| {
                s.counters
                    .session(id)
                    .is_some_and(|x| x.health_checks_ok >= n)
                    .then_some(())
            })
            .await;
    }

    /// Waits until `f(counters)` holds (re-checked whenever a counter of a session, job or hold
    /// changes; cheap counters like calls are also re-checked then).
    pub async fn wait_until(&self, f: impl Fn(&Counters) -> bool) {
        self.state
            .wait_for(Duration::MAX, |s| f(&s.counters).then_some(()))
            .await;
    }

    /// Releases every held build, and lets later builds run without holding.
    pub fn release_builds(&self) {
        self.state.released.send_replace(true);
    }

    /// Graceful stop: stop accepting, GOAWAY on every connection, wait for in-flight calls.
    pub async fn shutdown(mut self) {
        self.state.graceful.cancel();
        self.shutdown.cancel();
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }

    /// Freezes the daemon as SIGSTOP would: it stops reading, writing and accepting on every
    /// socket (the kernel still completes new TCP handshakes into the backlog). Its own timers
    /// keep running, unlike a stopped process's.
    pub fn freeze(&self) {
        self.state.gate.freeze();
    }

    /// Resumes a frozen daemon (SIGCONT): every socket carries on where it stopped.
    pub fn thaw(&self) {
        self.state.gate.thaw();
    }

    /// HTTP/2 PING frames (not ACKs) peers sent to this daemon. buildkitd (grpc-go's default
    /// keepalive policy) answers more than two pings within 5 minutes, or any ping without an
    /// active stream within 2 hours, with GOAWAY ENHANCE_YOUR_CALM.
    pub fn pings_received(&self) -> u64 {
        self.state.gate.pings()
    }

    /// Abrupt stop, like a pod dying: every connection dropped (TCP RST), no GOAWAY, every
    /// in-flight call and session aborted.
    pub fn kill(&mut self) {
        self.state.kill.cancel();
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    let acceptor = state.opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // A frozen daemon accepts nothing (the kernel's backlog does).
            accepted = async { state.gate.opened().await; listener.accept().await } => {
                let Ok((tcp, _)) = accepted else { continue };
                state.counters.connections.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.set_nodelay(true);
                // Dropping the socket on kill resets it (RST), like a vanished pod's kernel.
                let _ = tcp.set_zero_linger();
                let tcp = GatedIo::new(tcp, state.gate.clone(), acceptor.is_none());
                let state = state.clone();
                let shutdown = shutdown.clone();
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    match acceptor {
                        None => serve_conn(tcp, state, shutdown).await,
                        Some(acc) => {
                            if let Ok(tls) = acc.accept(tcp).await {
                                serve_conn(tls, state, shutdown).await;
                            }
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    // Graceful: connections saw the shutdown token and send GOAWAY; wait for them.
    while conns.join_next().await.is_some() {}
}

async fn serve_conn<IO>(io: IO, state: Arc<State>, shutdown: CancellationToken)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let routes = tonic::service::Routes::new(
        ControlServer::from_arc(Arc::new(ControlSvc(state.clone())))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
    .add_service(
        LlbBridgeServer::new(BridgeSvc(state.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
    .add_service(tonic_health::server::health_reporter().1)
    .prepare();
    let svc = TowerToHyperService::new(routes);
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(1000)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = state.kill.cancelled() => {}
            }
        }
        _ = state.kill.cancelled() => {}
    }
}

fn header<'a>(md: &'a MetadataMap, name: &str) -> Option<&'a str> {
    md.get(name).and_then(|v| v.to_str().ok())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Runs `fut` unless the daemon is killed first. A killed daemon never answers (a SIGKILLed
/// buildkitd can't): the call just stops, and the client sees only its connection die.
async fn or_killed<T>(
    state: &State,
    fut: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::select! {
        r = fut => r,
        _ = state.kill.cancelled() => std::future::pending().await,
    }
}

struct ControlSvc(Arc<State>);

#[tonic::async_trait]
impl Control for ControlSvc {
    async fn disk_usage(
        &self,
        _request: Request<pb::DiskUsageRequest>,
    ) -> Result<Response<pb::DiskUsageResponse>, Status> {
        self.0.counters.call("DiskUsage", None);
        Ok(Response::new(pb::DiskUsageResponse {
            record: self.0.disk.lock().unwrap().clone(),
        }))
    }

    type PruneStream = BoxStream<pb::UsageRecord>;

    async fn prune(
        &self,
        _request: Request<pb::PruneRequest>,
    ) -> Result<Response<Self::PruneStream>, Status> {
        self.0.counters.call("Prune", None);
        let pruned: Vec<_> = std::mem::take(&mut *self.0.disk.lock().unwrap());
        Ok(Response::new(Box::pin(futures_util::stream::iter(
            pruned.into_iter().map(Ok),
        ))))
    }

    async fn solve(
        &self,
        request: Request<pb::SolveRequest>,
    ) -> Result<Response<pb::SolveResponse>, Status> {
        let state = self.0.clone();
        let req = request.into_inner();
        let build_ref = req.r#ref.clone();
        state.counters.call("Solve", Some(&build_ref));
        if build_ref.is_empty() {
            return Err(Status::invalid_argument("invalid empty ref"));
        }
        let job = Arc::new(Job {
            frontend_attrs: req.frontend_attrs.clone(),
            phase: watch::channel(Phase::Running(0)).0,
            returned: watch::channel(false).0,
        });
        {
            let mut jobs = state.jobs.lock().unwrap();
            if jobs
                .get(&build_ref)
                .is_some_and(|j| !j.phase.borrow().terminal())
            {
                return Err(Status::already_exists(format!("job ID {build_ref} exists")));
            }
            jobs.insert(build_ref.clone(), job.clone());
            state.history_bucket.store(true, Ordering::SeqCst);
        }
        state.bump();
        let _ = state
            .history
            .send(history_event(BuildHistoryEventType::Started, &build_ref));
        let mut guard = CancelGuard {
            state: state.clone(),
            job: job.clone(),
            build_ref: build_ref.clone(),
            armed: true,
        };
        let result = or_killed(&state, run_solve(&state, &job, &req)).await;
        if result.is_err() {
            // grpc-go's reader goroutine cancels a handler's context the moment it reads the
            // stream's RST_STREAM, before it reads any later frame. hyper only notices a reset
            // when the handler's future is pending: give a reset that arrived before whatever
            // failed the build (e.g. the session's end) its precedence, as buildkitd would.
            tokio::task::yield_now().await;
        }
        guard.armed = false;
        match &result {
            Ok(_) => {
                job.phase.send_replace(Phase::Done);
                state
                    .counters
                    .completed_refs
                    .lock()
                    .unwrap()
                    .push(build_ref.clone());
            }
            Err(e) => {
                job.phase
                    .send_replace(Phase::Failed(e.message().to_string()));
                state
                    .counters
                    .failed_refs
                    .lock()
                    .unwrap()
                    .push((build_ref.clone(), e.message().to_string()));
            }
        }
        let _ = state
            .history
            .send(history_event(BuildHistoryEventType::Complete, &build_ref));
        result.map(Response::new)
    }

    type StatusStream = BoxStream<pb::StatusResponse>;

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        let state = self.0.clone();
        let build_ref = request.into_inner().r#ref;
        state.counters.call("Status", Some(&build_ref));
        // Status and ListenBuildHistory open BuildKit's history bucket (`Queue::init`).
        state.history_bucket.store(true, Ordering::SeqCst);
        let job = or_killed(
            &state,
            state.wait_job(&build_ref, state.opts.timers.status_wait),
        )
        .await?;
        let (tx, rx) = mpsc::channel(16);
        let kill = state.kill.clone();
        let mut phase = job.phase.subscribe();
        tokio::spawn(async move {
            let mut step = 0u32;
            loop {
                let p = phase.borrow_and_update().clone();
                let (name, err) = match &p {
                    Phase::Running(n) => {
                        step = *n;
                        (format!("[{}/4] fake step", n + 1), String::new())
                    }
                    Phase::Done => ("exporting".to_string(), String::new()),
                    Phase::Failed(e) => ("failed".to_string(), e.clone()),
                    Phase::Cancelled => ("cancelled".to_string(), "context canceled".into()),
                };
                let msg = pb::StatusResponse {
                    vertexes: vec![pb::Vertex {
                        digest: format!("sha256:{:064x}", step),
                        inputs: vec![],
                        name,
                        cached: false,
                        error: err,
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                if tx.send(Ok(msg)).await.is_err() || p.terminal() {
                    break;
                }
                tokio::select! {
                    r = phase.changed() => if r.is_err() { break },
                    _ = tx.closed() => break,
                    _ = kill.cancelled() => break,
                }
            }
        });
        let mut resp = Response::new(Box::pin(ReceiverStream::new(rx)) as Self::StatusStream);
        resp.metadata_mut()
            .insert("buildkit-current-timestamp", state.now_header());
        Ok(resp)
    }

    type SessionStream = BoxStream<BytesMessage>;

    async fn session(
        &self,
        request: Request<Streaming<BytesMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let state = self.0.clone();
        state.counters.call("Session", None);
        let md = request.metadata();
        let Some(id) = header(md, "x-docker-expose-session-uuid").map(str::to_string) else {
            return Err(Status::invalid_argument("no session id"));
        };
        let shared_key = header(md, "x-docker-expose-session-sharedkey")
            .unwrap_or_default()
            .to_string();
        let methods: Vec<String> = md
            .get_all("x-docker-expose-session-grpc-method")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        state.counters.session_mut(&id, |s| {
            s.shared_key = shared_key;
            s.methods = methods;
        });
        if state.opts.stall_sessions {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel::<Result<BytesMessage, Status>>(1);
            tokio::spawn(async move {
                // Swallow the client's bytes; answer nothing until the client goes away.
                while let Ok(Some(_)) = inbound.message().await {}
                drop(tx);
            });
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let inbound = request
            .into_inner()
            .take_while(|m| std::future::ready(m.is_ok()))
            .map(|m| Bytes::from(m.map(|m| m.data).unwrap_or_default()));
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
        // As buildkitd's Session handler, the outer stream ends (trailers) only once the
        // session is unregistered: `run_session` holds a sender until then, even when the inner
        // connection closed first.
        let outer_open = out_tx.clone();
        let (io, mut pump) = tunnel::pump(Box::pin(inbound), out_tx);
        let inbound_done = pump.inbound_done.take().expect("fresh pump");
        tokio::spawn(run_session(state, id, io, (pump, outer_open), inbound_done));
        let out = ReceiverStream::new(out_rx).map(|b| Ok(BytesMessage { data: b.to_vec() }));
        Ok(Response::new(Box::pin(out)))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.0.counters.call("ListWorkers", None);
        let platforms = self
            .0
            .opts
            .platforms
            .iter()
            .map(|p| {
                let mut parts = p.split('/');
                pb::Platform {
                    os: parts.next().unwrap_or_default().to_string(),
                    architecture: parts.next().unwrap_or_default().to_string(),
                    variant: parts.next().unwrap_or_default().to_string(),
                }
            })
            .collect();
        let labels = HashMap::from([
            (
                "org.mobyproject.buildkit.worker.executor".to_string(),
                "oci".to_string(),
            ),
            (
                "org.mobyproject.buildkit.worker.hostname".to_string(),
                self.0.name.clone(),
            ),
            (
                "org.mobyproject.buildkit.worker.snapshotter".to_string(),
                "overlayfs".to_string(),
            ),
        ]);
        Ok(Response::new(pb::ListWorkersResponse {
            record: vec![pb::WorkerRecord {
                id: format!("{}-worker", self.0.name),
                labels,
                platforms,
            }],
        }))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        self.0.counters.call("Info", None);
        Ok(Response::new(pb::InfoResponse {
            buildkit_version: Some(pb::BuildkitVersion {
                package: "github.com/moby/buildkit".into(),
                version: "v0.32.2".into(),
                revision: format!("fake-{}", self.0.name),
            }),
        }))
    }

    type ListenBuildHistoryStream = BoxStream<BuildHistoryEvent>;

    async fn listen_build_history(
        &self,
        request: Request<pb::BuildHistoryRequest>,
    ) -> Result<Response<Self::ListenBuildHistoryStream>, Status> {
        let state = self.0.clone();
        let req = request.into_inner();
        state.counters.call("ListenBuildHistory", Some(&req.r#ref));
        state.history_bucket.store(true, Ordering::SeqCst);
        // Subscribe before the snapshot so no event falls in between.
        let mut live = state.history.subscribe();
        let mut known: Vec<BuildHistoryEvent> = state
            .jobs
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| req.r#ref.is_empty() || **r == req.r#ref)
            .filter_map(|(r, j)| {
                let active = !j.phase.borrow().terminal();
                if req.active_only && !active {
                    return None;
                }
                let t = if active {
                    BuildHistoryEventType::Started
                } else {
                    BuildHistoryEventType::Complete
                };
                let mut e = history_event(t, r);
                if let Some(rec) = e.record.as_mut() {
                    rec.frontend_attrs = j.frontend_attrs.clone();
                }
                Some(e)
            })
            .collect();
        known.sort_by(|a, b| {
            a.record
                .as_ref()
                .map(|r| &r.r#ref)
                .cmp(&b.record.as_ref().map(|r| &r.r#ref))
        });
        if req.limit > 0 {
            known.truncate(req.limit as usize);
        }
        let head = futures_util::stream::iter(known.into_iter().map(Ok));
        let stream: Self::ListenBuildHistoryStream = if req.early_exit {
            Box::pin(head)
        } else {
            let want = req.r#ref.clone();
            let (tx, rx) = mpsc::channel(16);
            let kill = state.kill.clone();
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        // BuildKit closes its history pubsub once a graceful stop finds no
                        // build running (history.Queue: GracefulStop, then ps.Close), which
                        // ends every listener so that grpc-go's GracefulStop can complete.
                        _ = stopping_and_idle(&state) => break,
                        ev = live.recv() => match ev {
                            Ok(ev) => {
                                let r = ev.record.as_ref().map(|r| r.r#ref.clone()).unwrap_or_default();
                                // ActiveOnly only filters the snapshot: live events of
                                // every type follow, as BuildKit's history Queue.Listen does.
                                if !want.is_empty() && r != want {
                                    continue;
                                }
                                if tx.send(Ok(ev)).await.is_err() { break }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(_) => break,
                        },
                        _ = tx.closed() => break,
                        _ = kill.cancelled() => break,
                    }
                }
            });
            Box::pin(head.chain(ReceiverStream::new(rx)))
        };
        let mut resp = Response::new(stream);
        resp.metadata_mut()
            .insert("buildkit-current-timestamp", state.now_header());
        Ok(resp)
    }

    async fn update_build_history(
        &self,
        request: Request<pb::UpdateBuildHistoryRequest>,
    ) -> Result<Response<pb::UpdateBuildHistoryResponse>, Status> {
        let req = request.into_inner();
        self.0.counters.call("UpdateBuildHistory", Some(&req.r#ref));
        let mut jobs = self.0.jobs.lock().unwrap();
        // BuildKit's history queue (solver/llbsolver/history): bolt errors wrapping
        // os.ErrNotExist, which reach the client as UNKNOWN.
        if !self.0.history_bucket.load(Ordering::SeqCst) {
            return Err(Status::unknown(
                "failed to retrieve bucket _records: file does not exist",
            ));
        }
        if !jobs.contains_key(&req.r#ref) {
            return Err(Status::unknown(if req.delete {
                // The record is gone already; deleting its lease fails.
                format!("lease \"ref_{}\": not found", req.r#ref)
            } else {
                format!("failed to retrieve ref {}: file does not exist", req.r#ref)
            }));
        }
        if req.delete {
            jobs.remove(&req.r#ref);
            let _ = self
                .0
                .history
                .send(history_event(BuildHistoryEventType::Deleted, &req.r#ref));
        }
        Ok(Response::new(pb::UpdateBuildHistoryResponse {}))
    }
}

/// The daemon's side of one Session: run the inner HTTP/2 client, register the session,
/// health-check the client through it, unregister when the stream ends.
async fn run_session(
    state: Arc<State>,
    id: String,
    io: tokio::io::DuplexStream,
    pump: (tunnel::Pump, mpsc::Sender<Bytes>),
    inbound_done: tokio::sync::oneshot::Receiver<()>,
) {
    let kill = state.kill.clone();
    let body = async {
        let Ok(channel) = tunnel::client_channel(io).await else {
            return;
        };
        state.sessions.lock().unwrap().insert(
            id.clone(),
            SessionEntry {
                channel: channel.clone(),
            },
        );
        state.bump();
        let timers = state.opts.timers.clone();
        let health = async {
            let mut failures = 0;
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + timers.health_interval,
                timers.health_interval,
            );
            loop {
                tick.tick().await;
                let ok = tokio::time::timeout(
                    timers.health_timeout,
                    HealthClient::new(channel.clone()).check(HealthCheckRequest {
                        service: String::new(),
                    }),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                state.counters.session_mut(&id, |s| {
                    s.tunnel_calls.push("/grpc.health.v1.Health/Check".into());
                    if ok {
                        s.health_checks_ok += 1;
                    } else {
                        s.health_checks_failed += 1;
                    }
                });
                failures = if ok { 0 } else { failures + 1 };
                if failures >= timers.health_failures {
                    return;
                }
            }
        };
        tokio::select! {
            _ = inbound_done => {}
            _ = health => {}
        }
    };
    tokio::select! {
        _ = body => {}
        _ = kill.cancelled() => {}
    }
    state.sessions.lock().unwrap().remove(&id);
    state.counters.session_mut(&id, |s| s.ended = true);
    state.bump();
    // Dropping the channel, the pump and the held sender closes the inner connection and ends
    // the outer stream with OK trailers.
    drop(pump);
}

fn tunnel_err(what: &str, e: Status) -> Status {
    Status::unknown(format!("{what}: {}", e.message()))
}

/// Calls the client's Health/Check through the session's tunnel.
async fn check_health(state: &State, id: &str, channel: Channel) -> Result<(), Status> {
    state.counters.session_mut(id, |s| {
        s.tunnel_calls.push("/grpc.health.v1.Health/Check".into())
    });
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| tunnel_err("session health check failed", e))?;
    state.counters.session_mut(id, |s| s.health_checks_ok += 1);
    Ok(())
}

/// Reads a directory from the client through FileSync/DiffCopy (the receiving side of fsutil's
/// protocol: the client lists files with STAT packets, the daemon REQuests each, the client
/// sends DATA, the daemon ends with FIN). Returns the bytes received.
async fn file_sync(
    state: &State,
    id: &str,
    channel: Channel,
    dir_name: &str,
    follow_paths: &[&str],
) -> Result<u64, Status> {
    state.counters.session_mut(id, |s| {
        s.tunnel_calls
            .push("/moby.filesync.v1.FileSync/DiffCopy".into())
    });
    let (tx, rx) = mpsc::channel::<Packet>(16);
    let mut req = Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "dir-name",
        dir_name.parse().map_err(|_| Status::internal("dir-name"))?,
    );
    for p in follow_paths {
        req.metadata_mut().append(
            "followpaths",
            p.parse().map_err(|_| Status::internal("followpaths"))?,
        );
    }
    let mut client = FileSyncClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let mut resp = client
        .diff_copy(req)
        .await
        .map_err(|e| tunnel_err("failed to read from session", e))?
        .into_inner();
    let mut files = 0u32;
    let mut received = 0u64;
    // Listing.
    loop {
        let p = resp
            .message()
            .await
            .map_err(|e| tunnel_err("diffcopy listing", e))?
            .ok_or_else(|| Status::unknown("diffcopy: stream ended during listing"))?;
        match p.r#type {
            PACKET_STAT if p.stat.is_empty() => break,
            PACKET_STAT => files += 1,
            PACKET_ERR => {
                return Err(Status::unknown(
                    String::from_utf8_lossy(&p.data).to_string(),
                ))
            }
            t => return Err(Status::unknown(format!("diffcopy: unexpected packet {t}"))),
        }
    }
    for i in 0..files {
        tx.send(Packet {
            r#type: PACKET_REQ,
            id: i,
            ..Default::default()
        })
        .await
        .map_err(|_| Status::unknown("diffcopy: client went away"))?;
    }
    let mut finished = 0;
    // Index of the next DATA packet of the current file.
    let mut packet = 0u64;
    let abort_after = state
        .opts
        .abort_context_after
        .filter(|_| dir_name == "context" && follow_paths.is_empty());
    while finished < files {
        let p = resp
            .message()
            .await
            .map_err(|e| tunnel_err("diffcopy data", e))?
            .ok_or_else(|| Status::unknown("diffcopy: stream ended during data"))?;
        match p.r#type {
            PACKET_DATA if p.data.is_empty() => {
                finished += 1;
                packet = 0;
            }
            PACKET_DATA => {
                if dir_name == "dockerfile" {
                    // A real Dockerfile's text, not the pattern of generated data.
                    state
                        .counters
                        .session_mut(id, |s| s.dockerfile.extend_from_slice(&p.data));
                } else if !super::pattern_ok(packet, &p.data) {
                    state.counters.session_mut(id, |s| s.corrupt_packets += 1);
                }
                packet += 1;
                received += p.data.len() as u64;
                if let Some(limit) = abort_after {
                    if received >= limit {
                        // Dropping the call resets its inner stream (RST_STREAM CANCEL).
                        drop(resp);
                        drop(tx);
                        return Ok(received);
                    }
                }
                state
                    .counters
                    .bytes_uploaded
                    .fetch_add(p.data.len() as u64, Ordering::SeqCst);
                state
                    .counters
                    .session_mut(id, |s| s.bytes_uploaded += p.data.len() as u64);
            }
            t => return Err(Status::unknown(format!("diffcopy: unexpected packet {t}"))),
        }
    }
    let _ = tx
        .send(Packet {
            r#type: PACKET_FIN,
            ..Default::default()
        })
        .await;
    // The client answers FIN and ends the stream with OK.
    while let Some(p) = resp
        .message()
        .await
        .map_err(|e| tunnel_err("diffcopy fin", e))?
    {
        if p.r#type == PACKET_FIN {
            continue;
        }
    }
    Ok(received)
}

/// Sends an export to the client through FileSend/DiffCopy.
async fn file_send(state: &State, id: &str, channel: Channel, size: usize) -> Result<(), Status> {
    state.counters.session_mut(id, |s| {
        s.tunnel_calls
            .push("/moby.filesync.v1.FileSend/DiffCopy".into())
    });
    const CHUNK: usize = 32 * 1024;
    let chunks: Vec<Packet> = (0..size.div_ceil(CHUNK))
        .map(|i| Packet {
            r#type: PACKET_DATA,
            data: vec![super::pattern_byte(i as u64); CHUNK.min(size - i * CHUNK)],
            ..Default::default()
        })
        .collect();
    let mut client = FileSendClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let mut resp = client
        .diff_copy(futures_util::stream::iter(chunks))
        .await
        .map_err(|e| tunnel_err("failed to send export to session", e))?
        .into_inner();
    while resp
        .message()
        .await
        .map_err(|e| tunnel_err("export", e))?
        .is_some()
    {}
    state
        .counters
        .bytes_exported
        .fetch_add(size as u64, Ordering::SeqCst);
    Ok(())
}

/// The body of a Solve: what buildkitd's controller, the gateway forwarder and the solver do,
/// reduced to the calls a proxy can observe.
async fn run_solve(
    state: &Arc<State>,
    job: &Arc<Job>,
    req: &pb::SolveRequest,
) -> Result<pb::SolveResponse, Status> {
    let main = req.session.clone();
    // The probe build only needs its session to exist, then the client's Return.
    if req.internal {
        if !main.is_empty() {
            state.wait_session(&main).await?;
        }
        wait_returned(job).await;
        return Ok(pb::SolveResponse::default());
    }
    let main_ch = if main.is_empty() {
        None
    } else {
        let ch = state.wait_session(&main).await?;
        check_health(state, &main, ch.clone()).await?;
        Some(ch)
    };
    let local = |name: &str| {
        req.frontend_attrs
            .get(&format!("local-sessionid:{name}"))
            .cloned()
    };
    // The frontend reads the Dockerfile while the client's LLBBridge/Solve runs.
    let df_id = local("dockerfile").unwrap_or_else(|| main.clone());
    if !df_id.is_empty() {
        let ch = state.wait_session(&df_id).await?;
        file_sync(
            state,
            &df_id,
            ch,
            "dockerfile",
            &["Dockerfile", "Dockerfile.dockerignore", "dockerfile"],
        )
        .await?;
        let ch = state
            .wait_session(local("context").as_deref().unwrap_or(&main))
            .await?;
        file_sync(
            state,
            local("context").as_deref().unwrap_or(&main),
            ch,
            "context",
            &[".dockerignore"],
        )
        .await?;
    }
    job.step();
    wait_returned(job).await;
    job.step();
    // The solver pulls the build context (the bulk of the bytes), and any other named local.
    let ctx_id = local("context").unwrap_or_else(|| main.clone());
    if !ctx_id.is_empty() {
        let ch = state.wait_session(&ctx_id).await?;
        file_sync(state, &ctx_id, ch, "context", &[]).await?;
    }
    let mut others: Vec<(&String, &String)> = req
        .frontend_attrs
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("local-sessionid:")?;
            (name != "context" && name != "dockerfile").then_some((k, v))
        })
        .collect();
    others.sort();
    for (k, sid) in others {
        let ch = state.wait_session(sid).await?;
        let name = k.trim_start_matches("local-sessionid:");
        file_sync(state, sid, ch, name, &[]).await?;
    }
    job.step();
    // Mid-build: hold here until released, then optionally take some time.
    if !*state.released.borrow() {
        // Counted while held, also when the build is cancelled meanwhile (the future dropped).
        struct Holding<'a>(&'a State);
        impl Drop for Holding<'_> {
            fn drop(&mut self) {
                self.0.held.fetch_sub(1, Ordering::SeqCst);
                self.0.bump();
            }
        }
        state.held.fetch_add(1, Ordering::SeqCst);
        state.bump();
        let _holding = Holding(state);
        let mut rx = state.released.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
    if let Some(d) = state.opts.build_duration {
        tokio::time::sleep(d).await;
    }
    job.step();
    // Exports that write to the client.
    let mut types: Vec<String> = req.exporters.iter().map(|e| e.r#type.clone()).collect();
    if types.is_empty() && !req.exporter_deprecated.is_empty() {
        types.push(req.exporter_deprecated.clone());
    }
    let mut response = HashMap::new();
    for t in &types {
        match t.as_str() {
            "local" | "oci" | "tar" | "docker" => {
                let ch = match &main_ch {
                    Some(c) => c.clone(),
                    None => state.wait_session(&main).await?,
                };
                file_send(state, &main, ch, state.opts.export_size).await?;
            }
            _ => {}
        }
        if t == "image" || t == "oci" || t == "docker" {
            response.insert(
                "containerimage.digest".to_string(),
                format!("sha256:{:064x}", rand::random::<u64>()),
            );
        }
    }
    Ok(pb::SolveResponse {
        exporter_response: response,
    })
}

async fn wait_returned(job: &Job) {
    let mut rx = job.returned.subscribe();
    let _ = rx.wait_for(|r| *r).await;
}

struct BridgeSvc(Arc<State>);

impl BridgeSvc {
    /// What every LLBBridge call does first: find the build id header, then wait (3 s) for the
    /// job. As BuildKit's GatewayForwarder, a failed lookup is wrapped as `forwarding <Method>:`.
    async fn job(&self, md: &MetadataMap, method: &str) -> Result<Arc<Job>, Status> {
        let state = &self.0;
        let forwarding = |s: Status| {
            let name = method.rsplit('/').next().unwrap_or(method);
            Status::new(s.code(), format!("forwarding {name}: {}", s.message()))
        };
        let Some(build_ref) = header(md, "buildkit-controlapi-buildid").map(str::to_string) else {
            state.counters.call(method, None);
            state.counters.no_buildid.fetch_add(1, Ordering::SeqCst);
            return Err(forwarding(Status::unknown("no buildid found in context")));
        };
        state.counters.call(method, Some(&build_ref));
        or_killed(
            state,
            state.wait_job(&build_ref, state.opts.timers.bridge_wait),
        )
        .await
        .map_err(forwarding)
    }
}

#[tonic::async_trait]
impl LlbBridge for BridgeSvc {
    async fn resolve_image_config(
        &self,
        request: Request<gw::ResolveImageConfigRequest>,
    ) -> Result<Response<gw::ResolveImageConfigResponse>, Status> {
        self.job(request.metadata(), "LLBBridge/ResolveImageConfig")
            .await?;
        let r = request.into_inner().r#ref;
        Ok(Response::new(gw::ResolveImageConfigResponse {
            digest: format!("sha256:{:064x}", 1),
            config: br#"{"architecture":"amd64","os":"linux"}"#.to_vec(),
            r#ref: r,
        }))
    }

    async fn solve(
        &self,
        request: Request<gw::SolveRequest>,
    ) -> Result<Response<gw::SolveResponse>, Status> {
        let job = self.job(request.metadata(), "LLBBridge/Solve").await?;
        job.step();
        Ok(Response::new(gw::SolveResponse {
            r#ref: String::new(),
            result: vec![0x0a, 0x00],
        }))
    }

    async fn read_file(
        &self,
        request: Request<gw::ReadFileRequest>,
    ) -> Result<Response<gw::ReadFileResponse>, Status> {
        self.job(request.metadata(), "LLBBridge/ReadFile").await?;
        Ok(Response::new(gw::ReadFileResponse {
            data: b"FROM busybox\n".to_vec(),
        }))
    }

    async fn ping(
        &self,
        request: Request<gw::PingRequest>,
    ) -> Result<Response<gw::PongResponse>, Status> {
        self.job(request.metadata(), "LLBBridge/Ping").await?;
        Ok(Response::new(gw::PongResponse {
            frontend_api_caps: vec![b"\n\x0bsolve.base".to_vec()],
            llb_caps: vec![b"\n\x0bsource.image".to_vec()],
            workers: vec![],
        }))
    }

    async fn r#return(
        &self,
        request: Request<gw::ReturnRequest>,
    ) -> Result<Response<gw::ReturnResponse>, Status> {
        let job = self.job(request.metadata(), "LLBBridge/Return").await?;
        job.returned.send_replace(true);
        Ok(Response::new(gw::ReturnResponse {}))
    }

    async fn evaluate(
        &self,
        request: Request<gw::EvaluateRequest>,
    ) -> Result<Response<gw::EvaluateResponse>, Status> {
        self.job(request.metadata(), "LLBBridge/Evaluate").await?;
        Ok(Response::new(gw::EvaluateResponse {}))
    }

    async fn warn(
        &self,
        request: Request<gw::WarnRequest>,
    ) -> Result<Response<gw::WarnResponse>, Status> {
        self.job(request.metadata(), "LLBBridge/Warn").await?;
        Ok(Response::new(gw::WarnResponse {}))
    }
}

/// Connects to `addr` over a fresh TCP connection (helper for raw tests).
pub async fn tcp(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect(addr).await
}
