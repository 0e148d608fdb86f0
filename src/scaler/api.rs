//! The names on the wire: the metric, the header and the metadata key every replica and KEDA
//! agree on.

/// The one metric served to KEDA: builds running in the pool plus builds queued on every
/// replica. Stable: ScaledObjects and dashboards may name it.
pub const METRIC_NAME: &str = "buildkit_router_builds_demand";

/// Response header naming the replica that answered (a random id per process), so that a
/// replica that finds itself among its peers skips itself.
pub const INSTANCE_HEADER: &str = "x-buildkit-router-instance";

/// `scalerMetadata` key a replica sets when asking a peer for its own figures only
/// (value [`SCOPE_REPLICA`]); KEDA never sets it, so KEDA always gets the whole pool.
pub const SCOPE_KEY: &str = "buildkit-router/scope";
/// The value of [`SCOPE_KEY`] for one replica's own figures.
pub const SCOPE_REPLICA: &str = "replica";
