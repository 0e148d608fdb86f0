//! Placement's Prometheus counters. The lead registers them with the router's registry.

use prometheus::{IntCounterVec, Opts, Registry};

use super::{BuildTraits, Choice, KeySource, Reason};

/// `buildkit_router_placement_total{reason}` and `buildkit_router_affinity_key_source_total{source}`.
#[derive(Debug, Clone)]
pub struct PlacementMetrics {
    pub placement_total: IntCounterVec,
    pub affinity_key_source_total: IntCounterVec,
}

impl Default for PlacementMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PlacementMetrics {
    pub fn new() -> Self {
        let placement_total = IntCounterVec::new(
            Opts::new(
                "placement_total",
                "Builds placed on a backend, by why that backend was chosen.",
            )
            .namespace("buildkit_router"),
            &["reason"],
        )
        .expect("valid metric definition");
        let affinity_key_source_total = IntCounterVec::new(
            Opts::new(
                "affinity_key_source_total",
                "Builds placed, by where their cache-affinity key came from (none = load only).",
            )
            .namespace("buildkit_router"),
            &["source"],
        )
        .expect("valid metric definition");
        // Every label value exists from the start, so rates work before the first event.
        for r in Reason::ALL {
            placement_total.with_label_values(&[r.as_str()]);
        }
        for s in KeySource::ALL {
            affinity_key_source_total.with_label_values(&[s.as_str()]);
        }
        Self {
            placement_total,
            affinity_key_source_total,
        }
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.placement_total.clone()))?;
        registry.register(Box::new(self.affinity_key_source_total.clone()))
    }

    /// Counts one placement decision.
    pub fn observe(&self, choice: &Choice, build: &BuildTraits) {
        self.placement_total
            .with_label_values(&[choice.reason.as_str()])
            .inc();
        // Pinned sessions and internal probes did not use the key: counting them would
        // overstate affinity.
        if choice.reason != Reason::PinnedSession && !build.internal {
            self.affinity_key_source_total
                .with_label_values(&[build.key_source().as_str()])
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn exposition_has_prefixed_names_and_all_labels() {
        let m = PlacementMetrics::new();
        let reg = Registry::new();
        m.register(&reg).unwrap();
        m.observe(
            &Choice {
                index: 0,
                reason: Reason::Spill,
                rank: 1,
            },
            &BuildTraits::default(),
        );
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&reg.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("buildkit_router_placement_total{reason=\"spill\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("buildkit_router_placement_total{reason=\"overflow\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("buildkit_router_affinity_key_source_total{source=\"none\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("buildkit_router_affinity_key_source_total{source=\"vcs\"} 0"),
            "{text}"
        );
    }
}
