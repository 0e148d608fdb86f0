//! The Prometheus registry: every metric the router exports (`/metrics` is served by
//! [`crate::admin`]).
//!
//! Figures that describe the pool (builds active, backends by state, capacity, desired backends)
//! are read from the pool at scrape time, so a removed backend's series disappear with it.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry as PromRegistry, TextEncoder,
};

use crate::content::ContentMetrics;
use crate::discovery::DiscoveryMetrics;
use crate::placement::PlacementMetrics;
use crate::pool::{BackendState, Pool};

const PREFIX: &str = "buildkit_router";

/// Every metric the router itself records (placement and discovery register their own).
pub struct Metrics {
    pub registry: PromRegistry,
    pub requests_total: IntCounterVec,
    pub builds_total: IntCounterVec,
    /// Builds whose Solve the router answered itself, by grpc-status code name (never counted
    /// in `builds_total`: no daemon saw them).
    pub builds_refused_total: IntCounterVec,
    pub build_duration_seconds: Histogram,
    pub session_bind_seconds: HistogramVec,
    /// Control/Session streams open, by phase: `placing` (within the pass-through window,
    /// nothing answered yet), `held` (answered by the router, no backend
    /// yet), `relayed` (held, then its tunnel relayed to a backend) or `passed_through`
    /// (placed within `--session-passthrough-window`: forwarded as it came).
    pub sessions: IntGaugeVec,
    /// Sessions placed on a backend, by how they crossed the router: `passed_through` or
    /// `relayed` (held first).
    pub sessions_placed_total: IntCounterVec,
    /// Builds waiting, by tenant (at most `queue::DEFAULT_TENANT_LABELS` tenants named, the rest
    /// as `other`; `default` always present).
    pub builds_queued: IntGaugeVec,
    /// Their sum (not exported as such: `desired_backends` and `/status` read it).
    pub queued_total: IntGauge,
    pub queue_wait_seconds: Histogram,
    pub queue_timeouts_total: prometheus::IntCounter,
    /// Bytes of first messages being read to route calls (`crate::routing_buffer`).
    pub routing_buffer_bytes: IntGauge,
    /// Messages refused because the routing buffer had no room within its wait.
    pub routing_buffer_refusals_total: prometheus::IntCounter,
    pub connections_active: IntGauge,
    pub connections_total: IntCounterVec,
    pub placement: PlacementMetrics,
    pub discovery: DiscoveryMetrics,
    pub content: ContentMetrics,
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
        let builds_refused_total = IntCounterVec::new(
            Opts::new(
                "builds_refused_total",
                "Builds (Control/Solve calls) the router refused before any daemon saw them, by grpc-status code name",
            )
            .namespace(PREFIX),
            &["code"],
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
                "Control/Session streams open, by phase (placing: in the pass-through window; held: answered by the router, no backend yet; relayed after being held; passed_through: placed at once, forwarded as it came)",
            )
            .namespace(PREFIX),
            &["phase"],
        )?;
        for phase in ["placing", "held", "relayed", "passed_through"] {
            sessions.with_label_values(&[phase]);
        }
        let sessions_placed_total = IntCounterVec::new(
            Opts::new(
                "sessions_placed_total",
                "Control/Session streams placed on a backend, by path (passed_through: placed within --session-passthrough-window and forwarded as it came; relayed: held by the router first)",
            )
            .namespace(PREFIX),
            &["path"],
        )?;
        for path in ["passed_through", "relayed"] {
            sessions_placed_total.with_label_values(&[path]);
        }
        let builds_queued = IntGaugeVec::new(
            Opts::new(
                "builds_queued",
                "Builds waiting in the router's queue for a backend slot, by tenant",
            )
            .namespace(PREFIX),
            &["tenant"],
        )?;
        builds_queued.with_label_values(&[crate::queue::DEFAULT_TENANT]);
        let queued_total = IntGauge::new("queued_total", "sum of builds_queued")?;
        let queue_timeouts_total = prometheus::IntCounter::with_opts(
            Opts::new(
                "queue_timeouts_total",
                "Builds that waited --queue-timeout and were refused with RESOURCE_EXHAUSTED",
            )
            .namespace(PREFIX),
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
        let routing_buffer_bytes = IntGauge::with_opts(
            Opts::new(
                "routing_buffer_bytes",
                "Bytes of first messages larger than 64 KiB being read to route calls (bounded by --routing-buffer)",
            )
            .namespace(PREFIX),
        )?;
        let routing_buffer_refusals_total = prometheus::IntCounter::with_opts(
            Opts::new(
                "routing_buffer_refusals_total",
                "Calls refused with RESOURCE_EXHAUSTED because --routing-buffer had no room within --routing-buffer-wait",
            )
            .namespace(PREFIX),
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
        registry.register(Box::new(builds_refused_total.clone()))?;
        // Zero series for the codes refusals carry, so the metric exists before the first one.
        for code in [
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
            "INVALID_ARGUMENT",
            "FAILED_PRECONDITION",
        ] {
            builds_refused_total.with_label_values(&[code]);
        }
        registry.register(Box::new(build_duration_seconds.clone()))?;
        registry.register(Box::new(session_bind_seconds.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(sessions_placed_total.clone()))?;
        registry.register(Box::new(builds_queued.clone()))?;
        registry.register(Box::new(queue_wait_seconds.clone()))?;
        registry.register(Box::new(queue_timeouts_total.clone()))?;
        registry.register(Box::new(routing_buffer_bytes.clone()))?;
        registry.register(Box::new(routing_buffer_refusals_total.clone()))?;
        registry.register(Box::new(connections_active.clone()))?;
        registry.register(Box::new(connections_total.clone()))?;
        registry.register(Box::new(PoolCollector::new(
            pool,
            queued_total.clone(),
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
        let content = ContentMetrics::new();
        content.register(&registry)?;
        Ok(Arc::new(Self {
            registry,
            requests_total,
            builds_total,
            builds_refused_total,
            build_duration_seconds,
            session_bind_seconds,
            sessions,
            sessions_placed_total,
            builds_queued,
            queued_total,
            queue_wait_seconds,
            queue_timeouts_total,
            routing_buffer_bytes,
            routing_buffer_refusals_total,
            connections_active,
            connections_total,
            placement,
            discovery,
            content,
        }))
    }

    /// Sets the queue gauges from the queue's per-tenant counts.
    pub fn set_queued(&self, by_tenant: &[(Arc<str>, usize)]) {
        self.builds_queued.reset();
        self.builds_queued
            .with_label_values(&[crate::queue::DEFAULT_TENANT])
            .set(0);
        let mut total = 0;
        for (tenant, n) in by_tenant {
            self.builds_queued
                .with_label_values(&[tenant])
                .set(*n as i64);
            total += n;
        }
        self.queued_total.set(total as i64);
    }

    /// Records one finished call.
    pub fn record_call(&self, method: &'static str, code: Option<u32>) {
        // No status: the client cancelled the call (RST_STREAM CANCEL) before it ended.
        let code = code.map_or("CANCELLED", code_name);
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
            // Scaling reads the pool's whole load: the builds every replica started, as the
            // daemon reports them, when that is more than this replica's own.
            total_active += backend.reported_builds().map_or(n, |r| r.max(n));
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
