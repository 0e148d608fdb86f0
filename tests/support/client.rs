//! A test client that behaves like buildctl and buildx on the wire: one HTTP/2 connection for
//! everything, the concurrent calls of a build (Session, Status, Solve, LLBBridge Ping/Solve/
//! Return), the HTTP/2 *server* side of the Session tunnel (Health, FileSync, FileSend), the buildx
//! probe build, bake's shared sessions, cancellation, and the housekeeping calls.
//!
//! ```ignore
//! let c = Client::connect(router_addr).await?;
//! let r = c.build(BuildOpts::buildctl()).await;
//! assert!(r.ok(), "{r:#?}");
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Response, Status, Streaming};

use buildkit_router::proto::control::control_client::ControlClient;
use buildkit_router::proto::control::{self as pb, BytesMessage};
use buildkit_router::proto::filesync::file_send_server::{FileSend, FileSendServer};
use buildkit_router::proto::filesync::file_sync_server::{FileSync, FileSyncServer};
use buildkit_router::proto::filesync::{Packet, Stat};
use buildkit_router::proto::gateway as gw;
use buildkit_router::proto::gateway::llb_bridge_client::LlbBridgeClient;

use super::fake_daemon::{PACKET_DATA, PACKET_FIN, PACKET_REQ, PACKET_STAT};
use super::{new_id, new_node_id, tunnel, MAX_MESSAGE};

/// Methods a session can expose (`x-docker-expose-session-grpc-method`).
pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
pub const FILESYNC_DIFFCOPY: &str = "/moby.filesync.v1.FileSync/DiffCopy";
pub const FILESEND_DIFFCOPY: &str = "/moby.filesync.v1.FileSend/DiffCopy";

/// The outcome of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallResult {
    pub method: String,
    pub code: Code,
    pub message: String,
}

impl CallResult {
    fn ok(method: &str) -> Self {
        CallResult {
            method: method.into(),
            code: Code::Ok,
            message: String::new(),
        }
    }

    fn from_status(method: &str, s: &Status) -> Self {
        CallResult {
            method: method.into(),
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    fn from_result<T>(method: &str, r: &Result<T, Status>) -> Self {
        match r {
            Ok(_) => Self::ok(method),
            Err(s) => Self::from_status(method, s),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }
}

/// When the client cancels its build (drops the Solve: RST_STREAM CANCEL, then END_STREAM on
/// its Session), as buildctl does on SIGINT.
#[derive(Clone)]
pub enum CancelAt {
    /// Once the daemon has finished pulling the build context (observed client-side).
    AfterUpload,
    /// When the test calls `notify_one()` on this.
    Signal(Arc<Notify>),
}

/// What a build sends. Start from [`BuildOpts::buildctl`], [`BuildOpts::buildx`] or
/// [`BuildOpts::probe`] and change fields.
#[derive(Clone)]
pub struct BuildOpts {
    /// SolveRequest.Ref (and the `buildkit-controlapi-buildid` header).
    pub build_ref: String,
    /// Session uuid, SolveRequest.Session.
    pub session_id: String,
    /// `x-docker-expose-session-sharedkey`: empty for buildctl, `app:<node id>` for buildx.
    pub shared_key: String,
    /// Methods the session exposes (one header value each); also decides which services the
    /// client serves in the tunnel.
    pub session_methods: Vec<String>,
    /// Open the Session at all (false: the Solve names a session that never opens).
    pub open_session: bool,
    /// Bytes served as the build context through FileSync.
    pub context_size: usize,
    pub frontend_attrs: HashMap<String, String>,
    /// Exporter (type, attrs); both the deprecated fields and `Exporters` are filled.
    pub exporter: Option<(String, HashMap<String, String>)>,
    /// SolveRequest.Cache present (buildx sends an empty one).
    pub cache: Option<pb::CacheOptions>,
    /// SolveRequest.Internal: the buildx probe build.
    pub internal: bool,
    /// Call LLBBridge/Solve (the frontend's request) between Ping and Return.
    pub bridge_solve: bool,
    /// End the Session with RST_STREAM CANCEL instead of a half-close (the probe does).
    pub session_rst: bool,
    pub cancel: Option<CancelAt>,
    /// The client gives up on a session whose daemon preface has not arrived by then. 10 s.
    pub preface_timeout: Duration,
    /// grpc-timeout of LLBBridge/Ping. 15 s.
    pub ping_timeout: Duration,
    /// Safety net: how long to wait for Status/Session to end after the Solve ended.
    pub drain_timeout: Duration,
    /// Open the Session, then start the build's other calls (Status, Solve, LLBBridge) only
    /// this long after (the session is held that long before any Solve names it). A sleep in
    /// the simulated client, never a synchronisation.
    pub calls_after: Option<Duration>,
    /// Notified (once per cut) when a FileSync answer is cut mid-file, as it happens.
    pub filesync_cut: Option<Arc<Notify>>,
    /// Refuse an export once this many bytes arrived: the FileSend handler answers
    /// RESOURCE_EXHAUSTED ("no space left on device") while the daemon is still sending.
    pub reject_export_after: Option<u64>,
    /// The text of the `Dockerfile` the `dockerfile` local serves. `None`: 64 bytes of the
    /// transfer pattern, as any other generated file.
    pub dockerfile: Option<String>,
    /// How the client answers the first FileSync read of its `dockerfile` local (the router's
    /// content key read comes before the daemon's); later reads are served.
    pub first_dockerfile_read: FirstRead,
    /// Test knob, not client behaviour: half-close the Session when the test calls
    /// `notify_one()` on this, while the Solve goes on.
    pub end_session: Option<Arc<Notify>>,
}

/// How a client answers the first read of its `dockerfile` local.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FirstRead {
    #[default]
    Serve,
    /// Refused with PERMISSION_DENIED.
    Refuse,
    /// Never answered (the reader must give up on its own).
    Stall,
}

impl BuildOpts {
    /// `buildctl build --frontend dockerfile.v0 --local context=. --local dockerfile=.
    /// --opt build-arg:FOO=bar --opt platform=linux/amd64 --output type=image,name=...`.
    pub fn buildctl() -> Self {
        BuildOpts {
            build_ref: new_id(),
            session_id: new_id(),
            shared_key: String::new(),
            session_methods: vec![
                HEALTH_CHECK.into(),
                FILESYNC_DIFFCOPY.into(),
                FILESEND_DIFFCOPY.into(),
            ],
            open_session: true,
            context_size: 2 << 20,
            frontend_attrs: HashMap::from([
                ("platform".to_string(), "linux/amd64".to_string()),
                ("build-arg:FOO".to_string(), "bar".to_string()),
            ]),
            exporter: Some((
                "image".into(),
                HashMap::from([
                    (
                        "name".to_string(),
                        "registry.example/team/app:1".to_string(),
                    ),
                    ("push".to_string(), "false".to_string()),
                ]),
            )),
            cache: None,
            internal: false,
            bridge_solve: true,
            session_rst: false,
            cancel: None,
            preface_timeout: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(30),
            calls_after: None,
            filesync_cut: None,
            reject_export_after: None,
            dockerfile: None,
            first_dockerfile_read: FirstRead::Serve,
            end_session: None,
        }
    }

    /// `docker buildx build` from a git checkout, OCI output written back to the client.
    pub fn buildx() -> Self {
        let mut o = Self::buildctl();
        o.shared_key = format!("app:{}", new_node_id());
        o.frontend_attrs.extend([
            (
                "vcs:source".to_string(),
                "https://git.example.com/team/app.git".to_string(),
            ),
            ("vcs:revision".to_string(), format!("{:040x}", 7u64)),
            ("filename".to_string(), "Dockerfile".to_string()),
        ]);
        o.exporter = Some((
            "oci".into(),
            HashMap::from([(
                "name".to_string(),
                "registry.example/team/app:1".to_string(),
            )]),
        ));
        o.cache = Some(pb::CacheOptions::default());
        o
    }

    /// buildx's probe build: Internal, no attrs, no exporter, a session exposing only health,
    /// ended with RST_STREAM CANCEL.
    pub fn probe() -> Self {
        let mut o = Self::buildctl();
        o.session_methods = vec![HEALTH_CHECK.into()];
        o.frontend_attrs.clear();
        o.exporter = None;
        o.internal = true;
        o.bridge_solve = false;
        o.session_rst = true;
        o.context_size = 0;
        o
    }

    fn solve_request(&self) -> pb::SolveRequest {
        let (exp_type, exp_attrs, exporters) = match &self.exporter {
            Some((t, a)) => (
                t.clone(),
                a.clone(),
                vec![pb::Exporter {
                    r#type: t.clone(),
                    attrs: a.clone(),
                }],
            ),
            None => (String::new(), HashMap::new(), vec![]),
        };
        pb::SolveRequest {
            r#ref: self.build_ref.clone(),
            exporter_deprecated: exp_type,
            exporter_attrs_deprecated: exp_attrs,
            session: self.session_id.clone(),
            frontend_attrs: self.frontend_attrs.clone(),
            cache: self.cache.clone(),
            internal: self.internal,
            exporters,
            ..Default::default()
        }
    }
}

/// What happened during one build.
#[derive(Clone, Debug)]
pub struct BuildResult {
    pub build_ref: String,
    pub session_id: String,
    pub solve: CallResult,
    pub status: CallResult,
    /// Status messages received.
    pub status_messages: usize,
    /// The names of the vertexes the Status stream showed, in order of first sight.
    pub status_vertexes: Vec<String>,
    /// `None` when the build opened no session.
    pub session: Option<CallResult>,
    pub ping: CallResult,
    pub bridge_solve: Option<CallResult>,
    pub bridge_return: Option<CallResult>,
    pub exporter_response: HashMap<String, String>,
    /// The client cancelled the Solve.
    pub cancelled: bool,
    /// What the daemon did in this build's own session tunnel.
    pub tunnel: TunnelStats,
}

impl BuildResult {
    /// Every call of the build succeeded (a cancelled build is never ok).
    pub fn ok(&self) -> bool {
        !self.cancelled && self.calls().iter().all(|c| c.is_ok())
    }

    /// Every call's outcome.
    pub fn calls(&self) -> Vec<&CallResult> {
        let mut v = vec![&self.solve, &self.status, &self.ping];
        v.extend(self.session.iter());
        v.extend(self.bridge_solve.iter());
        v.extend(self.bridge_return.iter());
        v
    }

    /// The calls that failed.
    pub fn errors(&self) -> Vec<&CallResult> {
        self.calls().into_iter().filter(|c| !c.is_ok()).collect()
    }
}

/// What the daemon did inside one session's tunnel, counted by the client (the tunnel's server).
#[derive(Clone, Debug, Default)]
pub struct TunnelStats {
    pub filesync_calls: u64,
    /// FileSync calls for the `dockerfile` local (the daemon's, and the router's own).
    pub dockerfile_reads: u64,
    pub filesend_calls: u64,
    /// Bytes of file data the client sent through FileSync.
    pub bytes_uploaded: u64,
    /// Bytes the client received through FileSend.
    pub bytes_exported: u64,
    /// The inner preface from the daemon arrived.
    pub preface_received: bool,
    /// FileSend DATA packets whose bytes were not what the daemon sent (`support::pattern_ok`).
    pub corrupt_packets: u64,
    /// FileSync answers cut mid-file: the daemon reset the call (RST_STREAM), or the tunnel
    /// closed under it.
    pub filesync_resets: u64,
}

#[derive(Default)]
struct SessionStats {
    filesync_calls: AtomicU64,
    dockerfile_reads: AtomicU64,
    filesend_calls: AtomicU64,
    bytes_uploaded: AtomicU64,
    bytes_exported: AtomicU64,
    preface: AtomicU64,
    context_done: Notify,
    context_done_flag: AtomicU64,
    corrupt_packets: AtomicU64,
    filesync_resets: AtomicU64,
}

impl SessionStats {
    fn snapshot(&self) -> TunnelStats {
        TunnelStats {
            filesync_calls: self.filesync_calls.load(Ordering::SeqCst),
            dockerfile_reads: self.dockerfile_reads.load(Ordering::SeqCst),
            filesend_calls: self.filesend_calls.load(Ordering::SeqCst),
            bytes_uploaded: self.bytes_uploaded.load(Ordering::SeqCst),
            bytes_exported: self.bytes_exported.load(Ordering::SeqCst),
            preface_received: self.preface.load(Ordering::SeqCst) > 0,
            corrupt_packets: self.corrupt_packets.load(Ordering::SeqCst),
            filesync_resets: self.filesync_resets.load(Ordering::SeqCst),
        }
    }
}

/// Bake's result: the shared session and each target's build.
#[derive(Clone, Debug)]
pub struct BakeResult {
    pub shared_session_id: String,
    pub shared_session: CallResult,
    pub shared_tunnel: TunnelStats,
    pub targets: Vec<BuildResult>,
}

impl BakeResult {
    pub fn ok(&self) -> bool {
        self.shared_session.is_ok() && self.targets.iter().all(|t| t.ok())
    }
}

/// What `docker buildx build` does: ListWorkers, the probe build, ListWorkers again, the build,
/// and the history feature probe.
#[derive(Clone, Debug)]
pub struct BuildxResult {
    pub list_workers: Vec<CallResult>,
    pub probe: BuildResult,
    pub build: BuildResult,
    pub history_probe: CallResult,
}

impl BuildxResult {
    pub fn ok(&self) -> bool {
        self.list_workers.iter().all(|c| c.is_ok())
            && self.probe.ok()
            && self.build.ok()
            && self.history_probe.is_ok()
    }
}

/// The client: one HTTP/2 connection (a tonic [`Channel`] holds exactly one) for every call.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
}

/// A TLS connector for tonic (the scheme stays `http`: tonic without its TLS feature refuses
/// `https` with a custom connector; `:scheme` is not something BuildKit looks at).
#[derive(Clone)]
struct TlsConnector {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(this.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(this.config)
                .connect(this.server_name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
}

fn bridge_request<T>(msg: T, build_ref: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(r) = build_ref {
        req.metadata_mut().insert(
            "buildkit-controlapi-buildid",
            r.parse().expect("ascii build ref"),
        );
    }
    req
}

/// A runtime of their own for clients that must be able to vanish: shutting it down
/// (`shutdown_background`) drops all their TCP connections at once without any HTTP/2 goodbye,
/// as the kernel does when client processes die (a CI job killed mid-build). Aborting the
/// callers would not: a tonic channel's connection task outlives an aborted caller.
pub fn vanishing_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime")
}

/// Starts a client on `runtime` that connects to `addr` and runs one build with `opts`.
pub fn spawn_build(runtime: &tokio::runtime::Runtime, addr: SocketAddr, opts: BuildOpts) {
    runtime.spawn(async move {
        let client = Client::connect(addr).await.expect("connect");
        client.build(opts).await
    });
}

impl Client {
    /// h2c (HTTP/2 with prior knowledge) to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<Client, tonic::transport::Error> {
        let channel = endpoint(addr).connect().await?;
        Ok(Client { channel })
    }

    /// TLS to `addr`, verifying `server_name`. ALPN and client certificate are whatever
    /// `config` says (see `support::tls::TestPki::client_config`).
    pub async fn connect_tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Client, tonic::transport::Error> {
        let connector = TlsConnector {
            addr,
            config,
            server_name: ServerName::try_from(server_name.to_string()).expect("server name"),
        };
        let channel = endpoint(addr).connect_with_connector(connector).await?;
        Ok(Client { channel })
    }

    /// The underlying channel (one HTTP/2 connection), for raw calls.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn bridge(&self) -> LlbBridgeClient<Channel> {
        LlbBridgeClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// One build, as buildctl does it: Session, Status, Solve and LLBBridge/Ping at the same
    /// instant, then LLBBridge/Solve and Return; the daemon pulls the context and pushes exports
    /// through the session; Solve returns, Status ends, the session is half-closed.
    pub async fn build(&self, opts: BuildOpts) -> BuildResult {
        let stats = Arc::new(SessionStats::default());
        let (close_tx, close_rx) = oneshot::channel();
        let session_task = opts.open_session.then(|| {
            tokio::spawn(run_session(
                self.control(),
                SessionCfg {
                    id: opts.session_id.clone(),
                    shared_key: opts.shared_key.clone(),
                    methods: opts.session_methods.clone(),
                    context_size: opts.context_size,
                    preface_timeout: opts.preface_timeout,
                    rst: opts.session_rst,
                    filesync_cut: opts.filesync_cut.clone(),
                    reject_export_after: opts.reject_export_after,
                    dockerfile: opts.dockerfile.clone(),
                    first_dockerfile_read: opts.first_dockerfile_read,
                },
                stats.clone(),
                close_rx,
            ))
        });
        if let Some(delay) = opts.calls_after {
            tokio::time::sleep(delay).await;
        }
        let status_task = tokio::spawn(status_call(self.control(), opts.build_ref.clone()));
        let mut solve_task = {
            let mut c = self.control();
            let req = opts.solve_request();
            tokio::spawn(async move { c.solve(req).await.map(Response::into_inner) })
        };
        let frontend_task = {
            let mut b = self.bridge();
            let opts = opts.clone();
            tokio::spawn(async move {
                let r = Some(opts.build_ref.as_str());
                let mut ping_req = bridge_request(gw::PingRequest {}, r);
                ping_req.set_timeout(opts.ping_timeout);
                let ping = b.ping(ping_req).await;
                let ping = CallResult::from_result("LLBBridge/Ping", &ping);
                if !ping.is_ok() {
                    return (ping, None, None);
                }
                let mut bridge_solve = None;
                let mut result = vec![];
                if opts.bridge_solve {
                    let req = gw::SolveRequest {
                        definition: vec![],
                        frontend: "dockerfile.v0".into(),
                        frontend_opt: opts.frontend_attrs.clone(),
                    };
                    let s = b.solve(bridge_request(req, r)).await;
                    let c = CallResult::from_result("LLBBridge/Solve", &s);
                    let failed = !c.is_ok();
                    bridge_solve = Some(c);
                    if failed {
                        return (ping, bridge_solve, None);
                    }
                    result = s.map(|s| s.into_inner().result).unwrap_or_default();
                }
                let ret = b
                    .r#return(bridge_request(
                        gw::ReturnRequest {
                            result,
                            error: vec![],
                        },
                        r,
                    ))
                    .await;
                (
                    ping,
                    bridge_solve,
                    Some(CallResult::from_result("LLBBridge/Return", &ret)),
                )
            })
        };

        let cancel_trigger = async {
            match &opts.cancel {
                None => std::future::pending::<()>().await,
                Some(CancelAt::Signal(n)) => n.notified().await,
                Some(CancelAt::AfterUpload) => loop {
                    let notified = stats.context_done.notified();
                    if stats.context_done_flag.load(Ordering::SeqCst) > 0 {
                        break;
                    }
                    notified.await;
                },
            }
        };
        let mut frontend = Some(frontend_task);
        let mut frontend_result = None;
        let mut cancelled = false;
        let mut close_tx = Some(close_tx);
        let end_session = async {
            match &opts.end_session {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(end_session);
        // The Solve, racing the frontend (whose failure aborts the build) and a cancel.
        let solve: Result<pb::SolveResponse, Status> = {
            tokio::pin!(cancel_trigger);
            loop {
                tokio::select! {
                    r = &mut solve_task => {
                        break r.unwrap_or_else(|e| Err(Status::cancelled(e.to_string())));
                    }
                    f = async { frontend.as_mut().expect("frontend").await }, if frontend.is_some() => {
                        frontend = None;
                        let f = f.expect("frontend task");
                        let failed = !f.0.is_ok()
                            || f.1.as_ref().is_some_and(|c| !c.is_ok())
                            || f.2.as_ref().is_some_and(|c| !c.is_ok());
                        frontend_result = Some(f);
                        if failed {
                            // As buildctl (client/solve.go): a failed frontend waits up to 5 s
                            // for the Solve to end by itself, then cancels it.
                            match tokio::time::timeout(Duration::from_secs(5), &mut solve_task).await {
                                Ok(r) => break r.unwrap_or_else(|e| Err(Status::cancelled(e.to_string()))),
                                Err(_) => {
                                    solve_task.abort();
                                    break Err(Status::cancelled("cancelled by the client: frontend failed"));
                                }
                            }
                        }
                    }
                    _ = &mut end_session, if close_tx.is_some() => {
                        if let Some(close) = close_tx.take() {
                            let _ = close.send(());
                        }
                    }
                    _ = &mut cancel_trigger => {
                        solve_task.abort();
                        // As buildctl: grpc-go queues the Solve's RST_STREAM CANCEL before
                        // Invoke returns, and the Solve's goroutine then closes the session (a
                        // half-close, its deferred `s.Close()`): both leave at once, the RST
                        // first. (The aborted call's drop queues its RST.)
                        let _ = (&mut solve_task).await;
                        if let Some(close) = close_tx.take() {
                            let _ = close.send(());
                        }
                        cancelled = true;
                        break Err(Status::cancelled("context canceled"));
                    }
                }
            }
        };
        let (ping, bridge_solve, bridge_return) = match (frontend_result, frontend) {
            (Some(f), _) => f,
            (None, Some(task)) => match tokio::time::timeout(opts.drain_timeout, task).await {
                Ok(Ok(f)) => f,
                _ => (
                    CallResult {
                        method: "LLBBridge/Ping".into(),
                        code: Code::DeadlineExceeded,
                        message: "client gave up waiting for the frontend calls".into(),
                    },
                    None,
                    None,
                ),
            },
            (None, None) => unreachable!("frontend result taken"),
        };
        if let Some(close) = close_tx.take() {
            let _ = close.send(());
        }
        let session = match session_task {
            Some(t) => Some(match tokio::time::timeout(opts.drain_timeout, t).await {
                Ok(Ok(r)) => r,
                _ => CallResult {
                    method: "Session".into(),
                    code: Code::DeadlineExceeded,
                    message: "client gave up waiting for the session to end".into(),
                },
            }),
            None => None,
        };
        let (status, status_messages, status_vertexes) =
            match tokio::time::timeout(opts.drain_timeout, status_task).await {
                Ok(Ok(r)) => r,
                _ => (
                    CallResult {
                        method: "Status".into(),
                        code: Code::DeadlineExceeded,
                        message: "client gave up waiting for the status stream".into(),
                    },
                    0,
                    Vec::new(),
                ),
            };
        let solve_call = CallResult::from_result("Solve", &solve);
        BuildResult {
            build_ref: opts.build_ref,
            session_id: opts.session_id,
            solve: solve_call,
            status,
            status_messages,
            status_vertexes,
            session,
            ping,
            bridge_solve,
            bridge_return,
            exporter_response: solve.map(|s| s.exporter_response).unwrap_or_default(),
            cancelled,
            tunnel: stats.snapshot(),
        }
    }

    /// `docker buildx build`: ListWorkers (buildx calls it on bootstrap), the probe build, then
    /// ListWorkers twice at once, the build itself, and the history API feature probe.
    pub async fn buildx_build(&self, opts: BuildOpts) -> BuildxResult {
        let mut list_workers = vec![];
        list_workers.push(CallResult::from_result(
            "ListWorkers",
            &self.list_workers().await,
        ));
        let probe = self.build(BuildOpts::probe()).await;
        let (a, b) = tokio::join!(self.list_workers(), self.list_workers());
        list_workers.push(CallResult::from_result("ListWorkers", &a));
        list_workers.push(CallResult::from_result("ListWorkers", &b));
        let build = self.build(opts).await;
        let history = self
            .listen_build_history(pb::BuildHistoryRequest {
                r#ref: "buildx-test-history-api-feature".into(),
                early_exit: true,
                ..Default::default()
            })
            .await;
        BuildxResult {
            list_workers,
            probe,
            build,
            history_probe: CallResult::from_result("ListenBuildHistory", &history),
        }
    }

    /// `docker buildx bake` of `targets` targets sharing one local context: a shared Session
    /// (shared key `bake:<node id>`, FileSync) opened first, then every target at once, each
    /// with its own Session (health + FileSend for its `local` export) and naming the shared
    /// session only via `FrontendAttrs["local-sessionid:context"]` and `[..:dockerfile]`. The
    /// shared session is closed last.
    pub async fn bake(&self, targets: usize, context_size: usize) -> BakeResult {
        let shared_id = new_id();
        let stats = Arc::new(SessionStats::default());
        let (close_tx, close_rx) = oneshot::channel();
        let shared = tokio::spawn(run_session(
            self.control(),
            SessionCfg {
                id: shared_id.clone(),
                shared_key: format!("bake:{}", new_node_id()),
                methods: vec![HEALTH_CHECK.into(), FILESYNC_DIFFCOPY.into()],
                context_size,
                preface_timeout: Duration::from_secs(10),
                rst: false,
                filesync_cut: None,
                reject_export_after: None,
                dockerfile: None,
                first_dockerfile_read: FirstRead::Serve,
            },
            stats.clone(),
            close_rx,
        ));
        let node = new_node_id();
        let builds = (0..targets).map(|i| {
            let mut o = BuildOpts::buildx();
            o.shared_key = format!("target{i}:{node}");
            o.session_methods = vec![HEALTH_CHECK.into(), FILESEND_DIFFCOPY.into()];
            o.context_size = 0;
            o.frontend_attrs
                .insert("local-sessionid:context".into(), shared_id.clone());
            o.frontend_attrs
                .insert("local-sessionid:dockerfile".into(), shared_id.clone());
            o.frontend_attrs
                .insert("target".into(), format!("target{i}"));
            o.exporter = Some(("local".into(), HashMap::new()));
            self.build(o)
        });
        let targets = futures_util::future::join_all(builds).await;
        let _ = close_tx.send(());
        let shared_session = match tokio::time::timeout(Duration::from_secs(30), shared).await {
            Ok(Ok(r)) => r,
            _ => CallResult {
                method: "Session".into(),
                code: Code::DeadlineExceeded,
                message: "client gave up waiting for the shared session to end".into(),
            },
        };
        BakeResult {
            shared_session_id: shared_id,
            shared_session,
            shared_tunnel: stats.snapshot(),
            targets,
        }
    }

    pub async fn list_workers(&self) -> Result<pb::ListWorkersResponse, Status> {
        self.control()
            .list_workers(pb::ListWorkersRequest::default())
            .await
            .map(Response::into_inner)
    }

    pub async fn info(&self) -> Result<pb::InfoResponse, Status> {
        self.control()
            .info(pb::InfoRequest {})
            .await
            .map(Response::into_inner)
    }

    pub async fn disk_usage(&self) -> Result<pb::DiskUsageResponse, Status> {
        self.control()
            .disk_usage(pb::DiskUsageRequest::default())
            .await
            .map(Response::into_inner)
    }

    /// Prune: every streamed record.
    pub async fn prune(&self) -> Result<Vec<pb::UsageRecord>, Status> {
        let s = self
            .control()
            .prune(pb::PruneRequest::default())
            .await?
            .into_inner();
        collect(s).await
    }

    /// ListenBuildHistory: every event until the stream ends (use `early_exit: true`, or a
    /// timeout around it).
    pub async fn listen_build_history(
        &self,
        req: pb::BuildHistoryRequest,
    ) -> Result<Vec<pb::BuildHistoryEvent>, Status> {
        let s = self.control().listen_build_history(req).await?.into_inner();
        collect(s).await
    }

    pub async fn update_build_history(
        &self,
        req: pb::UpdateBuildHistoryRequest,
    ) -> Result<(), Status> {
        self.control().update_build_history(req).await.map(|_| ())
    }

    /// Status of `build_ref` alone: the number of messages until the stream ended.
    pub async fn status(&self, build_ref: &str) -> Result<usize, Status> {
        let (c, n, _) = status_call(self.control(), build_ref.to_string()).await;
        if c.is_ok() {
            Ok(n)
        } else {
            Err(Status::new(c.code, c.message))
        }
    }

    /// LLBBridge/Ping with `buildkit-controlapi-buildid: build_ref`, or without the header when
    /// `None`.
    pub async fn bridge_ping(&self, build_ref: Option<&str>) -> Result<gw::PongResponse, Status> {
        self.bridge()
            .ping(bridge_request(gw::PingRequest {}, build_ref))
            .await
            .map(Response::into_inner)
    }

    /// A bare Solve, for tests that build requests by hand.
    pub async fn solve(&self, req: pb::SolveRequest) -> Result<pb::SolveResponse, Status> {
        self.control().solve(req).await.map(Response::into_inner)
    }
}

async fn collect<T>(mut s: Streaming<T>) -> Result<Vec<T>, Status> {
    let mut v = vec![];
    while let Some(m) = s.message().await? {
        v.push(m);
    }
    Ok(v)
}

async fn status_call(
    mut c: ControlClient<Channel>,
    build_ref: String,
) -> (CallResult, usize, Vec<String>) {
    let mut n = 0;
    let mut names: Vec<String> = Vec::new();
    let r: Result<(), Status> = async {
        let mut s = c
            .status(pb::StatusRequest { r#ref: build_ref })
            .await?
            .into_inner();
        while let Some(m) = s.message().await? {
            n += 1;
            for v in m.vertexes {
                if !names.contains(&v.name) {
                    names.push(v.name);
                }
            }
        }
        Ok(())
    }
    .await;
    (CallResult::from_result("Status", &r), n, names)
}

struct SessionCfg {
    id: String,
    shared_key: String,
    methods: Vec<String>,
    context_size: usize,
    preface_timeout: Duration,
    rst: bool,
    filesync_cut: Option<Arc<Notify>>,
    reject_export_after: Option<u64>,
    dockerfile: Option<String>,
    first_dockerfile_read: FirstRead,
}

/// The client's side of one Session: serves Health/FileSync/FileSend as the HTTP/2 server of the
/// inner connection, waits for the daemon's preface (10 s), and on `close` half-closes (or
/// resets) and waits for the daemon to end the stream.
async fn run_session(
    mut control: ControlClient<Channel>,
    cfg: SessionCfg,
    stats: Arc<SessionStats>,
    close: oneshot::Receiver<()>,
) -> CallResult {
    const M: &str = "Session";
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
    let (half_close_tx, half_close_rx) = oneshot::channel::<()>();
    // Outbound: the inner connection's bytes, until the half-close.
    let outbound = ReceiverStream::new(out_rx)
        .map(|b| BytesMessage { data: b.to_vec() })
        .take_until(half_close_rx);
    let mut req = Request::new(outbound);
    {
        let md: &mut MetadataMap = req.metadata_mut();
        md.insert(
            "x-docker-expose-session-uuid",
            cfg.id.parse().expect("ascii id"),
        );
        md.insert(
            "x-docker-expose-session-name",
            "app".parse().expect("ascii"),
        );
        md.insert(
            "x-docker-expose-session-sharedkey",
            cfg.shared_key.parse().expect("ascii key"),
        );
        for m in &cfg.methods {
            md.append(
                "x-docker-expose-session-grpc-method",
                m.parse().expect("ascii method"),
            );
        }
    }
    // Inbound bytes are fed to the pump through this channel once the response arrives.
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(16);
    let (io, pump) = tunnel::pump(ReceiverStream::new(in_rx), out_tx);
    // Serve the client's services in the tunnel right away: our SETTINGS go out immediately.
    let mut routes = tonic::service::Routes::new(tonic_health::server::health_reporter().1);
    let svc = ClientSessionSvc {
        context_size: cfg.context_size,
        filesync_cut: cfg.filesync_cut.clone(),
        reject_export_after: cfg.reject_export_after,
        dockerfile: cfg.dockerfile.clone().map(Bytes::from),
        first_dockerfile_read: cfg.first_dockerfile_read,
        stats: stats.clone(),
    };
    if cfg.methods.iter().any(|m| m == FILESYNC_DIFFCOPY) {
        routes = routes
            .add_service(FileSyncServer::new(svc.clone()).max_decoding_message_size(MAX_MESSAGE));
    }
    if cfg.methods.iter().any(|m| m == FILESEND_DIFFCOPY) {
        routes = routes
            .add_service(FileSendServer::new(svc.clone()).max_decoding_message_size(MAX_MESSAGE));
    }
    let server = tokio::spawn(tunnel::serve_routes(io, routes));
    let _guards = (AbortOnDrop(server), pump);

    let mut close = close.fuse();
    let mut half_close_tx = Some(half_close_tx);
    // The daemon's preface must arrive within the timeout of the stream opening. As grpc-go's
    // client stream, the half-close does not wait for the answer's headers: a session closed
    // before its daemon answered (its Solve was refused) leaves at once.
    let opened = tokio::time::timeout(cfg.preface_timeout, async {
        let call = control.session(req);
        tokio::pin!(call);
        let response = tokio::select! {
            response = &mut call => response,
            _ = &mut close => {
                if cfg.rst {
                    // Dropping the call resets the outer stream (RST_STREAM CANCEL).
                    return Ok(None);
                }
                if let Some(tx) = half_close_tx.take() {
                    let _ = tx.send(());
                }
                call.await
            }
        };
        let mut inbound = response?.into_inner();
        let first = inbound.message().await?;
        Ok::<_, Status>(Some((inbound, first)))
    })
    .await;
    let (mut inbound, first) = match opened {
        Err(_) => {
            return CallResult {
                method: M.into(),
                code: Code::DeadlineExceeded,
                message: format!(
                    "session {}: no HTTP/2 preface from the daemon within {:?}",
                    cfg.id, cfg.preface_timeout
                ),
            }
        }
        Ok(Err(s)) => return CallResult::from_status(M, &s),
        Ok(Ok(None)) => return CallResult::ok(M),
        // Closed by the client before any daemon answered: it ended as asked.
        Ok(Ok(Some((_, None)))) if half_close_tx.is_none() => return CallResult::ok(M),
        Ok(Ok(Some((_, None)))) => {
            return CallResult {
                method: M.into(),
                code: Code::Unavailable,
                message: format!("session {}: ended before the daemon's preface", cfg.id),
            }
        }
        Ok(Ok(Some((inbound, Some(first))))) => (inbound, first),
    };
    stats.preface.fetch_add(1, Ordering::SeqCst);
    if in_tx.send(Bytes::from(first.data)).await.is_err() {
        return CallResult {
            method: M.into(),
            code: Code::Internal,
            message: "tunnel server gone".into(),
        };
    }
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    if in_tx.send(Bytes::from(m.data)).await.is_err() {
                        // Our tunnel server ended; keep draining until the daemon ends.
                        continue;
                    }
                }
                Ok(None) => return CallResult::ok(M),
                Err(s) => return CallResult::from_status(M, &s),
            },
            _ = &mut close, if half_close_tx.is_some() => {
                if cfg.rst {
                    // Dropping the response stream resets the outer stream (RST_STREAM CANCEL).
                    drop(inbound);
                    return CallResult::ok(M);
                }
                if let Some(tx) = half_close_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The services the client serves inside its session tunnel.
#[derive(Clone)]
struct ClientSessionSvc {
    context_size: usize,
    filesync_cut: Option<Arc<Notify>>,
    reject_export_after: Option<u64>,
    dockerfile: Option<Bytes>,
    first_dockerfile_read: FirstRead,
    stats: Arc<SessionStats>,
}

type PacketStream = Pin<Box<dyn futures_util::Stream<Item = Result<Packet, Status>> + Send>>;

fn header_values(md: &MetadataMap, name: &str) -> Vec<String> {
    md.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect()
}

#[tonic::async_trait]
impl FileSync for ClientSessionSvc {
    type DiffCopyStream = PacketStream;

    /// The sending side of fsutil's protocol: list files (STAT, then an empty STAT), send the
    /// DATA of each file the daemon REQuests (ending each with empty DATA), answer FIN with FIN.
    async fn diff_copy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::DiffCopyStream>, Status> {
        self.stats.filesync_calls.fetch_add(1, Ordering::SeqCst);
        let dir = header_values(request.metadata(), "dir-name")
            .pop()
            .unwrap_or_default();
        let follow = header_values(request.metadata(), "followpaths");
        // The files this directory holds for this request: generated data (the transfer
        // pattern, `size` bytes) or a given text.
        let pattern = |name: &str, size: usize| (name.to_string(), size, None);
        let files: Vec<(String, usize, Option<Bytes>)> = match dir.as_str() {
            "dockerfile" => match &self.dockerfile {
                Some(text) => vec![("Dockerfile".into(), text.len(), Some(text.clone()))],
                None => vec![pattern("Dockerfile", 64)],
            },
            _ if follow == [".dockerignore"] => vec![],
            "context" => vec![pattern("context.bin", self.context_size)],
            other => vec![pattern(&format!("{other}.bin"), 1024)],
        };
        let is_context = dir == "context" && follow.is_empty();
        let first_dockerfile_read =
            dir == "dockerfile" && self.stats.dockerfile_reads.fetch_add(1, Ordering::SeqCst) == 0;
        let stats = self.stats.clone();
        let cut = self.filesync_cut.clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<Packet, Status>>(16);
        match self.first_dockerfile_read {
            FirstRead::Refuse if first_dockerfile_read => {
                return Err(Status::permission_denied(
                    "test client: this read of the dockerfile local is refused",
                ));
            }
            FirstRead::Stall if first_dockerfile_read => {
                // Nothing is ever sent; the answer ends when the reader resets the call.
                tokio::spawn(async move {
                    while let Ok(Some(_)) = inbound.message().await {}
                    drop(tx);
                });
                return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
            }
            _ => {}
        }
        tokio::spawn(async move {
            for (name, size, _) in &files {
                // fsutil's Stat of a regular file (Go FileMode 0644, no type bits).
                let stat = Stat {
                    path: name.clone(),
                    mode: 0o644,
                    size: *size as i64,
                    ..Default::default()
                };
                let p = Packet {
                    r#type: PACKET_STAT,
                    stat: prost::Message::encode_to_vec(&stat),
                    ..Default::default()
                };
                if tx.send(Ok(p)).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(Ok(Packet {
                    r#type: PACKET_STAT,
                    ..Default::default()
                }))
                .await;
            const CHUNK: usize = 32 * 1024;
            loop {
                let p = match inbound.message().await {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(_) => break,
                };
                match p.r#type {
                    PACKET_REQ => {
                        let size = files.get(p.id as usize).map(|f| f.1).unwrap_or(0);
                        let text = files.get(p.id as usize).and_then(|f| f.2.clone());
                        let mut off = 0;
                        let mut index = 0u64;
                        while off < size {
                            let n = CHUNK.min(size - off);
                            let data = match &text {
                                Some(text) => text[off..off + n].to_vec(),
                                None => vec![super::pattern_byte(index); n],
                            };
                            index += 1;
                            let d = Packet {
                                r#type: PACKET_DATA,
                                id: p.id,
                                data,
                                ..Default::default()
                            };
                            if tx.send(Ok(d)).await.is_err() {
                                // Our answer is gone mid-file: the daemon reset the call (or
                                // the tunnel closed).
                                stats.filesync_resets.fetch_add(1, Ordering::SeqCst);
                                if let Some(cut) = &cut {
                                    cut.notify_one();
                                }
                                return;
                            }
                            stats.bytes_uploaded.fetch_add(n as u64, Ordering::SeqCst);
                            off += n;
                        }
                        let end = Packet {
                            r#type: PACKET_DATA,
                            id: p.id,
                            ..Default::default()
                        };
                        if tx.send(Ok(end)).await.is_err() {
                            return;
                        }
                    }
                    PACKET_FIN => {
                        let _ = tx
                            .send(Ok(Packet {
                                r#type: PACKET_FIN,
                                ..Default::default()
                            }))
                            .await;
                        break;
                    }
                    _ => {}
                }
            }
            if is_context {
                stats.context_done_flag.fetch_add(1, Ordering::SeqCst);
                stats.context_done.notify_waiters();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl FileSend for ClientSessionSvc {
    type DiffCopyStream = PacketStream;

    /// Receives an export: counts the DATA bytes until the daemon ends its stream, then ends
    /// with OK and no messages.
    async fn diff_copy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::DiffCopyStream>, Status> {
        self.stats.filesend_calls.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let mut index = 0u64;
        let mut received = 0u64;
        while let Some(p) = inbound.message().await? {
            if !super::pattern_ok(index, &p.data) {
                self.stats.corrupt_packets.fetch_add(1, Ordering::SeqCst);
            }
            index += 1;
            received += p.data.len() as u64;
            self.stats
                .bytes_exported
                .fetch_add(p.data.len() as u64, Ordering::SeqCst);
            if self
                .reject_export_after
                .is_some_and(|limit| received >= limit)
            {
                // Answered while the daemon is still sending: the status goes out, then
                // RST_STREAM(NO_ERROR) tells the daemon to stop.
                return Err(Status::resource_exhausted("no space left on device"));
            }
        }
        Ok(Response::new(Box::pin(futures_util::stream::empty())))
    }
}

/// Writes raw bytes on a fresh TCP connection (for tests of garbage input).
pub async fn raw_write(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await
}

/// Records the order calls finished in (optional helper for tests that care).
#[derive(Default, Clone)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}
