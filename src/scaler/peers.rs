//! The other router replicas, asked over this same scaler API with `scope: replica`.
//!
//! Why this way: KEDA reaches one replica through the Service, and a queued build exists only in
//! the replica that holds it. The choices were (a) each replica reads the others, or (b) one
//! replica, elected through a Kubernetes Lease, serves the scaler while the others report to it.
//! (b) still needs every replica's queue at the leader, adds RBAC on leases, and a leader change
//! leaves KEDA's stream on a replica that no longer knows. So (a), over the API that already
//! exists: each replica keeps one `StreamIsActive{scope: replica}` open to every peer (a peer's
//! first queued build reaches KEDA's stream on any replica within milliseconds: push, not
//! scrape), and `GetMetrics` asks every peer's queued count when KEDA asks (at its polling
//! interval, usually 30 s). Running builds need no peers: every replica reads them from the
//! daemons themselves.
//!
//! Cost: with R replicas, R x (R - 1) idle HTTP/2 streams, and R - 1 small unary calls per KEDA
//! metrics query, each bounded by [`ASK_TIMEOUT`]; peers are found by DNS (a headless Service)
//! every [`RESOLVE_INTERVAL`], so a new replica counts within 5 s. A peer that does not answer
//! counts as 0 queued and not busy (its queued builds died with it, or it is unreachable; the
//! log says which), so the metric can only undercount while a replica is unreachable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use super::api::{INSTANCE_HEADER, METRIC_NAME, SCOPE_KEY, SCOPE_REPLICA};
use super::args::{parse_peers, peer_tls_files, ScalerArgs, ScalerError};
use crate::discovery::{DnsTarget, Resolver, SystemResolver};
use crate::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use crate::proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};

/// How often `--scaler-peers` is re-resolved.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long one peer may take to answer `GetMetrics` (KEDA's own call has a deadline).
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect timeout to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait before a lost peer stream is reopened (doubling from 200 ms).
const MAX_RETRY: Duration = Duration::from_secs(5);

struct Peer {
    channel: Channel,
    /// The peer's last pushed state.
    busy: bool,
    /// Its state stream is open.
    following: bool,
    /// It answered with our own instance id: it is this replica.
    is_self: bool,
    stream: tokio::task::AbortHandle,
}

/// The peers and what they last said.
pub(super) struct Peers {
    targets: Vec<DnsTarget>,
    resolver: Option<Arc<dyn Resolver>>,
    /// TLS client settings per target host, when the scaler speaks TLS.
    tls: Option<HashMap<String, crate::pool::BackendTls>>,
    instance: Arc<str>,
    peers: Mutex<HashMap<SocketAddr, Peer>>,
    changes: watch::Sender<u64>,
}

impl Peers {
    pub(super) fn new(
        args: &ScalerArgs,
        tls: bool,
        instance: Arc<str>,
    ) -> Result<Arc<Self>, ScalerError> {
        let targets = parse_peers(args)?;
        let resolver: Option<Arc<dyn Resolver>> = if targets.is_empty() {
            None
        } else {
            Some(Arc::new(SystemResolver::from_system()?))
        };
        let tls = if tls && !targets.is_empty() {
            let mut by_host = HashMap::new();
            for target in &targets {
                let files = peer_tls_files(args, &target.host)?;
                by_host.insert(target.host.clone(), files.for_host(&target.host)?);
            }
            Some(by_host)
        } else {
            None
        };
        Ok(Arc::new(Self {
            targets,
            resolver,
            tls,
            instance,
            peers: Mutex::new(HashMap::new()),
            changes: watch::Sender::new(0),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumped whenever a peer's state changes or a peer comes or goes.
    pub(super) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether any peer has builds queued or running that it started.
    pub(super) fn any_busy(&self) -> bool {
        self.lock().values().any(|p| p.busy && !p.is_self)
    }

    /// The sum of every peer's queued builds, asked now.
    pub(super) async fn queued(&self) -> u64 {
        let asks: Vec<(SocketAddr, Channel)> = self
            .lock()
            .iter()
            .filter(|(_, p)| !p.is_self)
            .map(|(addr, p)| (*addr, p.channel.clone()))
            .collect();
        let answers = join_all(asks.into_iter().map(|(addr, channel)| async move {
            (
                addr,
                tokio::time::timeout(ASK_TIMEOUT, ask_queued(channel)).await,
            )
        }))
        .await;
        let mut total = 0;
        for (addr, answer) in answers {
            match answer {
                Ok(Ok((instance, _))) if *instance == *self.instance => self.mark_self(addr),
                Ok(Ok((_, n))) => total += n,
                Ok(Err(status)) => {
                    warn!(peer = %addr, code = ?status.code(), message = status.message(), "scaler peer did not give its queued builds; counting 0")
                }
                Err(_) => {
                    warn!(peer = %addr, timeout = ?ASK_TIMEOUT, "scaler peer did not answer in time; counting 0 of its queued builds")
                }
            }
        }
        total
    }

    fn mark_self(&self, addr: SocketAddr) {
        if let Some(peer) = self.lock().get_mut(&addr) {
            if !peer.is_self {
                debug!(peer = %addr, "scaler peer is this replica; skipped");
                peer.is_self = true;
                peer.busy = false;
                peer.stream.abort();
            }
        }
        self.bump();
    }

    /// Re-resolves the peers every [`RESOLVE_INTERVAL`] and keeps one state stream open to each.
    pub(super) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(resolver) = self.resolver.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(RESOLVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut found: HashMap<SocketAddr, &DnsTarget> = HashMap::new();
            let mut failed = false;
            for target in &self.targets {
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    resolver.lookup(&target.host, target.port),
                )
                .await
                {
                    Ok(Ok(addrs)) => {
                        for addr in addrs {
                            found.insert(
                                SocketAddr::new(addr.ip().to_canonical(), addr.port()),
                                target,
                            );
                        }
                    }
                    Ok(Err(error)) => {
                        warn!(peers = %target.host, %error, "cannot resolve scaler peers; keeping the last set");
                        failed = true;
                    }
                    Err(_) => {
                        warn!(peers = %target.host, "resolving scaler peers timed out; keeping the last set");
                        failed = true;
                    }
                }
            }
            if !failed {
                self.update(found);
            }
        }
        for peer in self.lock().values() {
            peer.stream.abort();
        }
    }

    fn update(self: &Arc<Self>, found: HashMap<SocketAddr, &DnsTarget>) {
        let mut changed = false;
        {
            let mut peers = self.lock();
            peers.retain(|addr, peer| {
                let keep = found.contains_key(addr);
                if !keep {
                    info!(peer = %addr, "scaler peer gone");
                    peer.stream.abort();
                    changed = true;
                }
                keep
            });
            for (addr, target) in found {
                if peers.contains_key(&addr) {
                    continue;
                }
                let channel = match self.channel(addr, target) {
                    Ok(channel) => channel,
                    Err(error) => {
                        warn!(peer = %addr, %error, "cannot set up a connection to a scaler peer");
                        continue;
                    }
                };
                let stream = tokio::spawn(self.clone().follow(addr, channel.clone()));
                info!(peer = %addr, "scaler peer found");
                peers.insert(
                    addr,
                    Peer {
                        channel,
                        busy: false,
                        following: false,
                        is_self: false,
                        stream: stream.abort_handle(),
                    },
                );
                changed = true;
            }
        }
        if changed {
            self.bump();
        }
    }

    fn channel(
        &self,
        addr: SocketAddr,
        target: &DnsTarget,
    ) -> Result<Channel, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let tls = self.tls.as_ref().and_then(|t| t.get(&target.host)).cloned();
        Ok(match tls {
            None => endpoint.connect_lazy(),
            Some(tls) => endpoint.connect_with_connector_lazy(TlsConnector { addr, tls }),
        })
    }

    /// Keeps a `StreamIsActive{scope: replica}` open to one peer, reopening it when it ends.
    async fn follow(self: Arc<Self>, addr: SocketAddr, channel: Channel) {
        let mut retry = Duration::from_millis(200);
        loop {
            let mut client = ExternalScalerClient::new(channel.clone());
            match client.stream_is_active(replica_scope()).await {
                Ok(response) => {
                    if instance_of(response.metadata()).as_deref() == Some(&*self.instance) {
                        self.mark_self(addr);
                        return;
                    }
                    retry = Duration::from_millis(200);
                    self.set_following(addr, true);
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(state)) => self.set_busy(addr, state.result),
                            Ok(None) => break,
                            Err(status) => {
                                debug!(peer = %addr, %status, "scaler peer stream ended");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    debug!(peer = %addr, code = ?status.code(), message = status.message(), "cannot open a state stream to a scaler peer")
                }
            }
            // Its queued builds died with its stream, or cannot be known: not busy.
            self.set_following(addr, false);
            self.set_busy(addr, false);
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    }

    /// Peers (not this replica) whose state stream is open.
    pub(super) fn following(&self) -> usize {
        self.lock()
            .values()
            .filter(|p| p.following && !p.is_self)
            .count()
    }

    fn set_following(&self, addr: SocketAddr, following: bool) {
        if let Some(peer) = self.lock().get_mut(&addr) {
            peer.following = following;
        }
    }

    fn set_busy(&self, addr: SocketAddr, busy: bool) {
        let changed = match self.lock().get_mut(&addr) {
            Some(peer) if peer.busy != busy => {
                peer.busy = busy;
                true
            }
            _ => false,
        };
        if changed {
            debug!(peer = %addr, busy, "scaler peer state");
            self.bump();
        }
    }
}

/// A `ScaledObjectRef` asking for one replica's own figures.
fn replica_scope() -> ScaledObjectRef {
    ScaledObjectRef {
        name: String::new(),
        namespace: String::new(),
        scaler_metadata: [(SCOPE_KEY.to_owned(), SCOPE_REPLICA.to_owned())].into(),
    }
}

fn instance_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// One peer's queued builds and its instance id.
async fn ask_queued(channel: Channel) -> Result<(String, u64), tonic::Status> {
    let response = ExternalScalerClient::new(channel)
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(replica_scope()),
            metric_name: METRIC_NAME.to_owned(),
        })
        .await?;
    let instance = instance_of(response.metadata()).unwrap_or_default();
    let value = response
        .into_inner()
        .metric_values
        .first()
        .map_or(0, |m| m.metric_value.max(0) as u64);
    Ok((instance, value))
}

/// Connects to a peer over TLS (rustls; tonic's own TLS is not compiled in).
#[derive(Clone)]
struct TlsConnector {
    addr: SocketAddr,
    tls: crate::pool::BackendTls,
}

type TlsIo = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tonic::codegen::Service<http::Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TlsIo>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addr = self.addr;
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls.client_config)
                .connect(tls.server_name, tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}
