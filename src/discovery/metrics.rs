//! Discovery counters. The lead registers them next to the router's own metrics.

use prometheus::{IntCounterVec, Opts, Registry};

/// `buildkit_router_discovery_updates_total{source,op}` and
/// `buildkit_router_discovery_errors_total{source}`.
///
/// `source` is `static`, `dns` or `kubernetes`; `op` is `reset`, `add`, `update` or `remove`
/// (one per change handed to the pool). Cheap to clone: the counters are shared.
#[derive(Clone, Debug)]
pub struct DiscoveryMetrics {
    pub updates: IntCounterVec,
    pub errors: IntCounterVec,
}

impl DiscoveryMetrics {
    pub fn new() -> Self {
        let updates = IntCounterVec::new(
            Opts::new(
                "buildkit_router_discovery_updates_total",
                "Changes to the backend set handed to the pool, by discovery source and operation.",
            ),
            &["source", "op"],
        )
        .expect("valid metric definition");
        let errors = IntCounterVec::new(
            Opts::new(
                "buildkit_router_discovery_errors_total",
                "Discovery errors (failed DNS lookups, failed or broken Kubernetes list/watch calls, unusable EndpointSlices), by source.",
            ),
            &["source"],
        )
        .expect("valid metric definition");
        Self { updates, errors }
    }

    /// Registers both counters.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.updates.clone()))?;
        registry.register(Box::new(self.errors.clone()))?;
        Ok(())
    }

    pub(crate) fn update(&self, source: &str, op: &str) {
        self.updates.with_label_values(&[source, op]).inc();
    }

    pub(crate) fn error(&self, source: &str) {
        self.errors.with_label_values(&[source]).inc();
    }

    /// Current value of `updates_total{source,op}` (for tests and `/status`).
    pub fn updates_count(&self, source: &str, op: &str) -> u64 {
        self.updates.with_label_values(&[source, op]).get()
    }

    /// Current value of `errors_total{source}`.
    pub fn errors_count(&self, source: &str) -> u64 {
        self.errors.with_label_values(&[source]).get()
    }
}

impl Default for DiscoveryMetrics {
    fn default() -> Self {
        Self::new()
    }
}
