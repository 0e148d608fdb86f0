//! TCP and TLS listeners, HTTP/2 server connections, limits, and graceful shutdown.
//!
//! The client port speaks only HTTP/2: h2c with prior knowledge, or TLS where ALPN `h2` is
//! selected when offered and HTTP/2 is still spoken to clients that offer no ALPN (buildx's
//! remote driver). `:authority` is never looked at, and a malformed one is repaired before the
//! HTTP/2 library can reject it ([`authority`]).

pub mod authority;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use dashmap::DashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::io::BufferedIo;
use crate::metrics::Metrics;
use crate::router::{ConnState, Router};
use crate::runtime::Workers;

/// HTTP/2 server limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// How long a client gets for its TLS handshake, for its HTTP/2 preface and first frame,
    /// and to finish a header block it began (slowloris).
    pub tls_handshake_timeout: Duration,
    /// Most connections served at once from one IP address; 0: no limit.
    pub max_connections_per_ip: usize,
    /// Streams a client may reset before the server accepted them, at once (CVE-2023-44487,
    /// rapid reset); past it the connection gets GOAWAY ENHANCE_YOUR_CALM.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset because of the client's errors before it closes the
    /// connection with GOAWAY ENHANCE_YOUR_CALM.
    pub max_local_error_reset_streams: usize,
    /// Pings on idle client connections find clients that vanished without a FIN.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_concurrent_streams: 1024,
            max_header_list_size: 64 * 1024,
            stream_window: crate::routing_buffer::DEFAULT_CLIENT_STREAM_WINDOW,
            connection_window: 8 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections_per_ip: 0,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// The client-facing listener.
pub struct Server {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    limits: Limits,
    /// Worker threads that serve the connections (thread per core); `None`: this runtime.
    workers: Option<Arc<Workers>>,
}

impl Server {
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        limits: Limits,
        workers: Option<Arc<Workers>>,
    ) -> Self {
        Self {
            listener,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            router,
            metrics,
            limits,
            workers,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, asks every connection to
    /// finish (GOAWAY) and waits up to `grace` for in-flight calls.
    pub async fn serve(self, shutdown: CancellationToken, grace: Duration) {
        let graceful = GracefulShutdown::new();
        let permits = Arc::new(Semaphore::new(self.limits.max_connections));
        let per_ip: Arc<DashMap<IpAddr, usize>> = Arc::default();
        let limits = Arc::new(self.limits);
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // EMFILE and friends: keep serving the connections we have.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let Some(per_ip) = PerIp::enter(&per_ip, peer.ip(), limits.max_connections_per_ip)
            else {
                warn!(%peer, limit = limits.max_connections_per_ip, "too many connections from this address; closing the new one");
                self.metrics
                    .connections_total
                    .with_label_values(&["refused_per_ip"])
                    .inc();
                continue;
            };
            let router = self.router.clone();
            let metrics = self.metrics.clone();
            let limits = limits.clone();
            let tls = self.tls.clone();
            let watcher = graceful.watcher();
            let serve = move |stream: TcpStream| {
                async move {
                    let stream = BufferedIo::new(stream);
                    let _permit = (permit, per_ip);
                    metrics.connections_active.inc();
                    match tls {
                        None => {
                            metrics.connections_total.with_label_values(&["h2c"]).inc();
                            serve_connection(stream, None, router, &limits, watcher).await;
                        }
                        Some(acceptor) => match accept_tls(acceptor, stream, peer, &limits).await {
                            Some(tls_stream) => {
                                metrics.connections_total.with_label_values(&["tls"]).inc();
                                let identity = client_identity(&tls_stream);
                                serve_connection(tls_stream, identity, router, &limits, watcher)
                                    .await;
                            }
                            None => metrics
                                .connections_total
                                .with_label_values(&["tls_failed"])
                                .inc(),
                        },
                    }
                    metrics.connections_active.dec();
                }
                .instrument(tracing::debug_span!("conn", %peer))
            };
            match &self.workers {
                Some(workers) => workers.spawn_connection(stream, serve),
                None => {
                    tokio::spawn(serve(stream));
                }
            }
        }
        drop(self.listener);
        info!(grace = ?grace, "stopped accepting; waiting for in-flight calls");
        match tokio::time::timeout(grace, graceful.shutdown()).await {
            Ok(()) => info!("every connection finished"),
            Err(_) => {
                warn!(grace = ?grace, "shutdown grace period over; closing the remaining connections")
            }
        }
    }
}

/// One connection counted against its address's `--max-connections-per-ip` while alive.
struct PerIp {
    counts: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl PerIp {
    /// Counts a new connection from `ip`, or `None` when the address already has `limit`
    /// (0: no limit, nothing counted).
    fn enter(
        counts: &Arc<DashMap<IpAddr, usize>>,
        ip: IpAddr,
        limit: usize,
    ) -> Option<Option<Self>> {
        if limit == 0 {
            return Some(None);
        }
        let mut count = counts.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Some(Self {
            counts: counts.clone(),
            ip,
        }))
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        self.counts.remove_if_mut(&self.ip, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// The client certificate's identity (mTLS): its subject's common name, else the whole
/// subject; `None` without a certificate.
fn client_identity(tls: &tokio_rustls::server::TlsStream<BufferedIo>) -> Option<Arc<str>> {
    let der = tls.get_ref().1.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| subject.to_string());
    (!name.is_empty()).then(|| Arc::from(name))
}

async fn accept_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    mut stream: BufferedIo,
    peer: std::net::SocketAddr,
    limits: &Limits,
) -> Option<tokio_rustls::server::TlsStream<BufferedIo>> {
    stream.set_defer_flush(false);
    match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(mut tls)) => {
            tls.get_mut().0.set_defer_flush(true);
            let alpn = tls
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            debug!(
                alpn = alpn.as_deref().unwrap_or("none"),
                "TLS handshake done"
            );
            Some(tls)
        }
        Ok(Err(error)) => {
            warn!(%peer, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            warn!(%peer, timeout = ?limits.tls_handshake_timeout, "TLS handshake timed out");
            None
        }
    }
}

async fn serve_connection<S>(
    stream: S,
    identity: Option<Arc<str>>,
    router: Arc<Router>,
    limits: &Limits,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_state = Arc::new(ConnState::with_identity(identity));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let router = router.clone();
        let conn_state = conn_state.clone();
        async move { Ok::<_, Infallible>(router.handle(&conn_state, request).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.max_local_error_reset_streams)
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .max_frame_size(limits.max_frame_size)
        .max_send_buf_size(1024 * 1024)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .auto_date_header(false);
    let stream =
        authority::AuthorityFix::with_handshake_timeout(stream, limits.tls_handshake_timeout);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(error) = watcher.watch(connection).await {
        if is_timeout(&error) {
            warn!(%error, "closed a client connection that did not complete its handshake");
        } else {
            debug!(%error, "client connection ended with an error");
        }
    }
}

/// Whether a connection error is the handshake deadline of [`authority::AuthorityFix`].
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::body::error_source::<std::io::Error>(error)
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
}
