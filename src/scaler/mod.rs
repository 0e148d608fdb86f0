//! KEDA's external scaler API (`externalscaler.ExternalScaler`, `proto/externalscaler.proto`),
//! served on its own port (`--scaler-listen`), so KEDA scales the buildkitd StatefulSet from the
//! router that holds the queue, with no Prometheus in the path and no polling interval before a
//! scale-up from zero.
//!
//! What KEDA reads (docs/autoscaling.md has the timeline):
//! - `StreamIsActive` (the `external-push` trigger): the current state at once, then every
//!   change. It turns `true` the moment a build is queued or starts (events from
//!   [`Admission::queued_changes`] and [`Pool::load_changes`], no polling), and `false` once no
//!   build has been queued or running for `--scale-to-zero-idle`.
//! - `IsActive`: the same state, asked.
//! - `GetMetricSpec` / `GetMetrics`: one metric, [`METRIC_NAME`] = builds running in the pool
//!   plus builds queued on every router replica; the target is `--target-builds-per-backend`, so
//!   KEDA's HPA asks for `ceil(metric / target)` daemons (the `desired_backends` gauge).
//!
//! Several replicas: KEDA talks to one of them through the Service, so each answers for the
//! pool. Running builds come from the daemons' own reports (`ListenBuildHistory{ActiveOnly}`),
//! which every replica reads; queued builds live only in the replica that holds them, so each
//! replica asks the others ([`peers`]) over this same API with `scope: replica`. See
//! [`peers`] for why, and what it costs.

mod api;
mod args;
mod peers;
mod service;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admission::Admission;
use crate::pool::Pool;
use crate::tls;

pub use api::{INSTANCE_HEADER, METRIC_NAME, SCOPE_KEY, SCOPE_REPLICA};
pub use args::{ScalerArgs, ScalerError};
pub use state::Scaler;

/// What the scaler needs besides its flags.
pub struct ScalerParts {
    pub pool: Arc<Pool>,
    /// `None` with `--queue off`: nothing is ever queued.
    pub admission: Option<Arc<Admission>>,
    /// `--target-builds-per-backend`.
    pub target_builds_per_backend: usize,
}

/// A started scaler API.
pub struct RunningScaler {
    pub addr: SocketAddr,
    pub scaler: Arc<Scaler>,
}

/// Starts the scaler API when `--scaler-listen` is given: binds it, and spawns the server, the
/// activity tracker and the peer watcher (their handles go to `tasks`).
pub async fn start(
    args: &ScalerArgs,
    parts: ScalerParts,
    shutdown: CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Option<RunningScaler>, ScalerError> {
    let Some(listen) = args.scaler_listen else {
        return Ok(None);
    };
    let server_tls = match (&args.scaler_tls_cert, &args.scaler_tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(
            cert,
            key,
            args.scaler_tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    let instance: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
    let peers = peers::Peers::new(args, server_tls.is_some(), instance.clone())?;
    let scaler = Arc::new(Scaler::new(
        parts.pool,
        parts.admission,
        parts.target_builds_per_backend,
        args.scale_to_zero_idle,
        instance,
        peers.clone(),
    ));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ScalerError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ScalerError::Bind {
        addr: listen,
        source,
    })?;
    tasks.push(tokio::spawn(scaler.clone().run(shutdown.clone())));
    tasks.push(tokio::spawn(peers.run(shutdown.clone())));
    tasks.push(tokio::spawn(service::serve(
        listener,
        server_tls,
        scaler.clone(),
        shutdown,
    )));
    info!(%addr, metric = METRIC_NAME, target = scaler.target(), idle = ?args.scale_to_zero_idle, peers = ?args.scaler_peers, "KEDA external scaler listening");
    Ok(Some(RunningScaler { addr, scaler }))
}
