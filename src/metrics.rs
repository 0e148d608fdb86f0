//! The Prometheus registry, and the admin HTTP endpoints: `/metrics`, `/healthz`, `/readyz`,
//! `/status`.
//!
//! Figures that describe the pool (builds active, backends by state, capacity, desired backends)
//! are read from the pool at scrape time, so a removed backend's series disappear with it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry as PromRegistry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::discovery::DiscoveryMetrics;
use crate::placement::PlacementMetrics;
use crate::pool::{BackendState, Pool};
use crate::registry::Registry;

const PREFIX: &str = "buildkit_router";

/// Every metric the router itself records (placement and discovery register their own).
pub struct Metrics {
    pub registry: PromRegistry,
    pub requests_total: IntCounterVec,
    pub builds_total: IntCounterVec,
    pub build_duration_seconds: Histogram,
    pub session_bind_seconds: HistogramVec,
    /// Control/Session streams open, by phase: `held` (answered by the router, no backend
    /// yet) or `relayed` (tunnel relayed to a backend).
    pub sessions: IntGaugeVec,
    pub builds_queued: IntGauge,
    pub queue_wait_seconds: Histogram,
    pub connections_active: IntGauge,
    pub connections_total: IntCounterVec,
    pub placement: PlacementMetrics,
    pub discovery: DiscoveryMetrics,
}

impl Metrics {
    pub fn new(
        pool: Arc<Pool>,
        target_builds_per_backend: usize,
    ) -> Result<Arc<Self>, prometheus::Error> {
        // Every metric carries its full `buildkit_router_` name; the registry adds no prefix.
        let registry = PromRegistry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "gRPC calls handled, by method and final grpc-status code name",
            )
            .namespace(PREFIX),
            &["method", "code"],
        )?;
        let builds_total = IntCounterVec::new(
            Opts::new(
                "builds_total",
                "Builds (Control/Solve calls) finished, by backend and outcome",
            )
            .namespace(PREFIX),
            &["backend", "outcome"],
        )?;
        let build_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "build_duration_seconds",
                "Duration of builds, from Solve to its answer",
            )
            .namespace(PREFIX)
            .buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0,
            ]),
        )?;
        let session_bind_seconds = HistogramVec::new(
            HistogramOpts::new(
                "session_bind_seconds",
                "Time a Control/Session waited before it was bound to a backend, by how it was bound",
            )
            .namespace(PREFIX)
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0]),
            &["how"],
        )?;
        let sessions = IntGaugeVec::new(
            Opts::new(
                "sessions",
                "Control/Session streams open, by phase (held: no backend yet; relayed)",
            )
            .namespace(PREFIX),
            &["phase"],
        )?;
        for phase in ["held", "relayed"] {
            sessions.with_label_values(&[phase]);
        }
        let builds_queued = IntGauge::with_opts(
            Opts::new("builds_queued", "Builds waiting for a backend slot").namespace(PREFIX),
        )?;
        let queue_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "queue_wait_seconds",
                "Time builds waited in the queue for a backend slot",
            )
            .namespace(PREFIX)
            .buckets(vec![
                0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
        )?;
        let connections_active = IntGauge::with_opts(
            Opts::new("connections_active", "Client connections open").namespace(PREFIX),
        )?;
        let connections_total = IntCounterVec::new(
            Opts::new(
                "connections_total",
                "Client connections accepted, by transport",
            )
            .namespace(PREFIX),
            &["transport"],
        )?;
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(builds_total.clone()))?;
        registry.register(Box::new(build_duration_seconds.clone()))?;
        registry.register(Box::new(session_bind_seconds.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(builds_queued.clone()))?;
        registry.register(Box::new(queue_wait_seconds.clone()))?;
        registry.register(Box::new(connections_active.clone()))?;
        registry.register(Box::new(connections_total.clone()))?;
        registry.register(Box::new(PoolCollector::new(
            pool,
            builds_queued.clone(),
            target_builds_per_backend,
        )?))?;
        let placement = PlacementMetrics::new();
        placement.register(&registry)?;
        let discovery = DiscoveryMetrics::new();
        // Zero series for every source, so alerts on discovery errors have something to read.
        for source in ["static", "dns", "kubernetes"] {
            discovery.errors.with_label_values(&[source]);
        }
        discovery.register(&registry)?;
        Ok(Arc::new(Self {
            registry,
            requests_total,
            builds_total,
            build_duration_seconds,
            session_bind_seconds,
            sessions,
            builds_queued,
            queue_wait_seconds,
            connections_active,
            connections_total,
            placement,
            discovery,
        }))
    }

    /// Records one finished call.
    pub fn record_call(&self, method: &'static str, code: Option<u32>) {
        let code = code.map_or("CANCELLED_BY_PEER", code_name);
        self.requests_total.with_label_values(&[method, code]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

/// The canonical name of a gRPC status code.
pub fn code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// Reads the pool at scrape time.
struct PoolCollector {
    pool: Arc<Pool>,
    queued: IntGauge,
    target: usize,
    descs: Vec<Desc>,
}

impl PoolCollector {
    fn new(pool: Arc<Pool>, queued: IntGauge, target: usize) -> Result<Self, prometheus::Error> {
        let descs = vec![
            Desc::new(format!("{PREFIX}_builds_active"), "Builds running, by backend".into(), vec!["backend".into()], Default::default())?,
            Desc::new(format!("{PREFIX}_backends"), "Backends, by state".into(), vec!["state".into()], Default::default())?,
            Desc::new(
                format!("{PREFIX}_backend_capacity"),
                "Hard build capacity of each backend (absent when unlimited)".into(),
                vec!["backend".into()],
                Default::default(),
            )?,
            Desc::new(
                format!("{PREFIX}_desired_backends"),
                "Backends needed for the running and queued builds: ceil((active + queued) / target builds per backend)"
                    .into(),
                vec![],
                Default::default(),
            )?,
        ];
        Ok(Self {
            pool,
            queued,
            target: target.max(1),
            descs,
        })
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self.pool.snapshot();
        let gauge_vec = |name: &str, help: &str, label: &str| {
            IntGaugeVec::new(Opts::new(format!("{PREFIX}_{name}"), help), &[label])
                .expect("valid metric")
        };
        let active = gauge_vec("builds_active", "Builds running, by backend", "backend");
        let capacity = gauge_vec(
            "backend_capacity",
            "Hard build capacity of each backend (absent when unlimited)",
            "backend",
        );
        let states = gauge_vec("backends", "Backends, by state", "state");
        let mut total_active = 0usize;
        for backend in &snapshot.backends {
            let n = backend.active_builds();
            total_active += n;
            active
                .with_label_values(&[backend.identity()])
                .set(n as i64);
            if let Some(cap) = backend.capacity() {
                capacity
                    .with_label_values(&[backend.identity()])
                    .set(cap as i64);
            }
        }
        for state in BackendState::ALL {
            let n = snapshot
                .backends
                .iter()
                .filter(|b| b.state() == state)
                .count();
            states.with_label_values(&[state.as_str()]).set(n as i64);
        }
        let queued = self.queued.get().max(0) as usize;
        let desired = IntGauge::new(
            format!("{PREFIX}_desired_backends"),
            "Backends needed for the running and queued builds: ceil((active + queued) / target builds per backend)",
        )
        .expect("valid metric");
        desired.set((total_active + queued).div_ceil(self.target) as i64);
        let mut families = active.collect();
        families.extend(states.collect());
        families.extend(capacity.collect());
        families.extend(desired.collect());
        families
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub registry: Arc<Registry>,
}

#[derive(serde::Serialize)]
struct StatusBackend {
    identity: String,
    address: String,
    state: BackendState,
    active_builds: usize,
    capacity: Option<usize>,
    platforms: Vec<String>,
    zone: Option<String>,
    node: Option<String>,
}

#[derive(serde::Serialize)]
struct StatusBuild {
    build_ref: String,
    age_seconds: f64,
    #[serde(flatten)]
    record: crate::registry::BuildRecord,
}

/// The `/status` document.
#[derive(serde::Serialize)]
struct StatusDoc {
    synced: bool,
    backends: Vec<StatusBackend>,
    builds: Vec<StatusBuild>,
    builds_queued: i64,
}

impl AdminState {
    /// The `/status` JSON document.
    pub fn status_json(&self) -> String {
        let snapshot = self.pool.snapshot();
        let backends = snapshot
            .backends
            .iter()
            .map(|b| StatusBackend {
                identity: b.identity().to_string(),
                address: b.address().to_string(),
                state: b.state(),
                active_builds: b.active_builds(),
                capacity: b.capacity(),
                platforms: b.platforms().as_ref().clone(),
                zone: b.zone().map(str::to_owned),
                node: b.node().map(str::to_owned),
            })
            .collect();
        let builds = self
            .registry
            .running_builds()
            .into_iter()
            .map(|(build_ref, record)| StatusBuild {
                build_ref: build_ref.to_string(),
                age_seconds: record.started.elapsed().as_secs_f64(),
                record,
            })
            .collect();
        let doc = StatusDoc {
            synced: self.pool.is_synced(),
            backends,
            builds,
            builds_queued: self.metrics.builds_queued.get(),
        };
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Ready: the first discovery list arrived and a backend takes builds.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.pool.is_synced() {
            return Err("waiting for the first list of backends from discovery");
        }
        if self.pool.snapshot().any_ready().is_none() {
            return Err("no buildkitd backend is ready");
        }
        Ok(())
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String, content_type: &'static str| {
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts")
        };
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET\n".into(),
                "text/plain",
            );
        }
        match request.uri().path() {
            "/metrics" => match self.metrics.render() {
                Ok(body) => Response::builder()
                    .header(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(body)))
                    .expect("static response parts"),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {e}\n"),
                    "text/plain",
                ),
            },
            "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
            "/readyz" => match self.ready() {
                Ok(()) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                    "text/plain",
                ),
            },
            "/status" => text(StatusCode::OK, self.status_json(), "application/json"),
            _ => text(
                StatusCode::NOT_FOUND,
                "try /metrics, /healthz, /readyz or /status\n".into(),
                "text/plain",
            ),
        }
    }
}

/// Serves the admin endpoints until `shutdown` is cancelled.
pub async fn serve_admin(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = state.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        });
    }
}

/// Binds the admin listener.
pub async fn bind_admin(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
