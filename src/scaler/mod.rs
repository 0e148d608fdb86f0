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

mod peers;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admission::Admission;
use crate::discovery::DnsTarget;
use crate::duration::parse_duration;
use crate::pool::Pool;
use crate::tls::{self, BackendTlsFiles, TlsError};

pub use peers::SCOPE_KEY;

/// The one metric served to KEDA: builds running in the pool plus builds queued on every
/// replica. Stable: ScaledObjects and dashboards may name it.
pub const METRIC_NAME: &str = "buildkit_router_builds_demand";

/// Response header naming the replica that answered (a random id per process), so that a
/// replica that finds itself among its peers skips itself.
pub const INSTANCE_HEADER: &str = "x-buildkit-router-instance";

/// Scaler flags (flattened into the router's command line).
#[derive(Debug, Clone, clap::Args)]
pub struct ScalerArgs {
    /// Serve KEDA's external scaler gRPC API (externalscaler.ExternalScaler) on this address,
    /// e.g. 0.0.0.0:6000, for an `external-push` or `external` ScaledObject trigger. Off when
    /// not given.
    #[arg(long, value_name = "ADDR", env = "BUILDKIT_ROUTER_SCALER_LISTEN")]
    pub scaler_listen: Option<SocketAddr>,
    /// Serve the scaler API over TLS with this certificate chain (PEM).
    #[arg(
        long,
        requires = "scaler_tls_key",
        env = "BUILDKIT_ROUTER_SCALER_TLS_CERT"
    )]
    pub scaler_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --scaler-tls-cert.
    #[arg(
        long,
        requires = "scaler_tls_cert",
        env = "BUILDKIT_ROUTER_SCALER_TLS_KEY"
    )]
    pub scaler_tls_key: Option<PathBuf>,
    /// Require scaler clients (KEDA, peer replicas) to present certificates signed by this CA.
    #[arg(
        long,
        requires = "scaler_tls_cert",
        env = "BUILDKIT_ROUTER_SCALER_TLS_CLIENT_CA"
    )]
    pub scaler_tls_client_ca: Option<PathBuf>,
    /// After this long with no build queued or running anywhere in the pool, the scaler reports
    /// inactive (StreamIsActive pushes false) and KEDA may scale the pool to zero.
    #[arg(long, value_parser = parse_duration, default_value = "5m", env = "BUILDKIT_ROUTER_SCALE_TO_ZERO_IDLE")]
    pub scale_to_zero_idle: Duration,
    /// The other router replicas' scaler API, as NAME:PORT (comma-separated or repeated),
    /// re-resolved every 5 s: typically a headless Service over the router pods, e.g.
    /// buildkit-router-peers.buildkit.svc.cluster.local:6000. Each replica then counts every
    /// replica's queued builds (itself is recognised and skipped).
    #[arg(
        long,
        value_name = "NAME:PORT",
        value_delimiter = ',',
        env = "BUILDKIT_ROUTER_SCALER_PEERS"
    )]
    pub scaler_peers: Vec<String>,
    /// CA (PEM) that signs the peers' scaler certificates; needed with --scaler-tls-cert and
    /// --scaler-peers. With --scaler-tls-client-ca, peers are shown --scaler-tls-cert.
    #[arg(long, env = "BUILDKIT_ROUTER_SCALER_PEER_CA")]
    pub scaler_peer_ca: Option<PathBuf>,
    /// Server name verified on the peers' certificates (default: the NAME of --scaler-peers).
    #[arg(long, env = "BUILDKIT_ROUTER_SCALER_PEER_SERVER_NAME")]
    pub scaler_peer_server_name: Option<String>,
}

/// Why the scaler cannot start. Each names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error("--scaler-peers {value:?} is not NAME:PORT: {reason}")]
    InvalidPeer { value: String, reason: String },
    #[error("--scaler-peers with a TLS scaler (--scaler-tls-cert) needs --scaler-peer-ca, the CA that signs the peers' scaler certificates")]
    PeerCaMissing,
    #[error("--scaler-peers: {0}")]
    PeerResolver(#[from] crate::discovery::ResolverConfigError),
    #[error("scaler TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen for the scaler API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the scaler needs besides its flags.
pub struct ScalerParts {
    pub pool: Arc<Pool>,
    /// `None` with `--queue off`: nothing is ever queued.
    pub admission: Option<Arc<Admission>>,
    /// `--target-builds-per-backend`.
    pub target_builds_per_backend: usize,
}

/// The pool's demand and activity, as KEDA is told them.
pub struct Scaler {
    pool: Arc<Pool>,
    admission: Option<Arc<Admission>>,
    target: u64,
    idle: Duration,
    instance: Arc<str>,
    /// What KEDA sees: builds anywhere in the pool, or within `idle` of the last one.
    active: watch::Sender<bool>,
    /// This replica alone: builds it queued or started (what peers see, `scope: replica`).
    local_busy: watch::Sender<bool>,
    peers: Arc<peers::Peers>,
}

impl std::fmt::Debug for Scaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scaler")
            .field("instance", &self.instance)
            .field("active", &*self.active.borrow())
            .finish()
    }
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
    let scaler = Arc::new(Scaler {
        pool: parts.pool,
        admission: parts.admission,
        target: parts.target_builds_per_backend.max(1) as u64,
        idle: args.scale_to_zero_idle,
        instance,
        active: watch::Sender::new(false),
        local_busy: watch::Sender::new(false),
        peers: peers.clone(),
    });
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
    info!(%addr, metric = METRIC_NAME, target = scaler.target, idle = ?scaler.idle, peers = ?args.scaler_peers, "KEDA external scaler listening");
    Ok(Some(RunningScaler { addr, scaler }))
}

impl Scaler {
    /// This process's id in [`INSTANCE_HEADER`].
    pub fn instance(&self) -> &Arc<str> {
        &self.instance
    }

    /// Builds running in the pool: per daemon, the larger of what this replica started and
    /// what the daemon reports running (every replica's builds).
    pub fn pool_running(&self) -> u64 {
        self.pool
            .snapshot()
            .backends
            .iter()
            .map(|b| {
                let own = b.active_builds();
                b.reported_builds().map_or(own, |r| r.max(own)) as u64
            })
            .sum()
    }

    /// Builds waiting in this replica's queue.
    pub fn local_queued(&self) -> u64 {
        self.admission.as_ref().map_or(0, |a| a.queued() as u64)
    }

    /// Builds this replica queued or started.
    fn local_busy_now(&self) -> bool {
        self.local_queued() > 0
            || self
                .pool
                .snapshot()
                .backends
                .iter()
                .any(|b| b.active_builds() > 0)
    }

    /// Any build queued or running anywhere in the pool, as far as this replica knows now.
    fn busy_now(&self) -> bool {
        self.local_busy_now() || self.pool_running() > 0 || self.peers.any_busy()
    }

    /// What `IsActive` answers: busy now, or within `--scale-to-zero-idle` of the last build.
    /// When this replica knows of nothing, the peers are asked now (a peer whose state stream
    /// is not open yet, e.g. just after a restart, is not missed).
    pub async fn is_active(&self) -> bool {
        self.busy_now() || *self.active.borrow() || self.peers.queued().await > 0
    }

    /// The metric's value: builds running in the pool plus builds queued on every replica
    /// (peers asked now, each bounded by [`peers::ASK_TIMEOUT`]).
    pub async fn demand(&self) -> u64 {
        self.pool_running() + self.local_queued() + self.peers.queued().await
    }

    /// Peer replicas whose state this replica follows now (an open `StreamIsActive`).
    pub fn peers_following(&self) -> usize {
        self.peers.following()
    }

    /// `--target-builds-per-backend`.
    pub fn target(&self) -> u64 {
        self.target
    }

    /// Follows the activity state (what `StreamIsActive` pushes).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.active.subscribe()
    }

    /// Follows this replica's own activity (what peers are pushed).
    pub fn subscribe_local(&self) -> watch::Receiver<bool> {
        self.local_busy.subscribe()
    }

    /// Recomputes the activity state on every queue, load and peer change, and when the idle
    /// time runs out. Starts inactive: a restarted router must not wake a pool at zero.
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut load = self.pool.load_changes();
        let mut queued = self.admission.as_ref().map(|a| a.queued_changes());
        let mut peers = self.peers.changes();
        let mut last_busy: Option<Instant> = None;
        loop {
            load.borrow_and_update();
            peers.borrow_and_update();
            if let Some(q) = queued.as_mut() {
                q.borrow_and_update();
            }
            let local = self.local_busy_now();
            self.local_busy
                .send_if_modified(|v| std::mem::replace(v, local) != local);
            let busy = local || self.pool_running() > 0 || self.peers.any_busy();
            let now = Instant::now();
            if busy {
                last_busy = Some(now);
            }
            let idle_until = last_busy.map(|at| at + self.idle);
            let active = busy || idle_until.is_some_and(|until| now < until);
            if self
                .active
                .send_if_modified(|v| std::mem::replace(v, active) != active)
            {
                if active {
                    info!(
                        queued = self.local_queued(),
                        running = self.pool_running(),
                        "scaler: builds waiting or running; reporting active to KEDA"
                    );
                } else {
                    info!(idle = ?self.idle, "scaler: no build for --scale-to-zero-idle; reporting inactive to KEDA");
                }
            }
            let idle_timer = async {
                match idle_until {
                    Some(until) if active && !busy => tokio::time::sleep_until(until).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changed(&mut load) => {}
                _ = changed(&mut peers) => {}
                _ = async {
                    match queued.as_mut() {
                        Some(q) => changed(q).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = idle_timer => {}
            }
        }
    }
}

/// Waits for a change; never returns once the sender is gone (the loop then waits on the rest).
async fn changed<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The TLS files peers are reached with.
fn peer_tls_files(args: &ScalerArgs, host: &str) -> Result<BackendTlsFiles, ScalerError> {
    let ca = args
        .scaler_peer_ca
        .clone()
        .ok_or(ScalerError::PeerCaMissing)?;
    let (cert, key) = match args.scaler_tls_client_ca {
        Some(_) => (args.scaler_tls_cert.clone(), args.scaler_tls_key.clone()),
        None => (None, None),
    };
    Ok(BackendTlsFiles {
        ca: Some(ca),
        cert,
        key,
        server_name: Some(
            args.scaler_peer_server_name
                .clone()
                .unwrap_or_else(|| host.to_owned()),
        ),
    })
}

/// `--scaler-peers` entries.
fn parse_peers(args: &ScalerArgs) -> Result<Vec<DnsTarget>, ScalerError> {
    args.scaler_peers
        .iter()
        .map(|value| {
            value
                .parse::<DnsTarget>()
                .map_err(|reason| ScalerError::InvalidPeer {
                    value: value.clone(),
                    reason,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The scaler's flags alone (the router's command line flattens them the same way).
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        scaler: ScalerArgs,
    }

    fn args(extra: &[&str]) -> ScalerArgs {
        let mut all = vec!["buildkit-router"];
        all.extend_from_slice(extra);
        Flags::try_parse_from(all).expect("flags parse").scaler
    }

    #[test]
    fn defaults_leave_the_scaler_off_with_five_minutes_of_idle() {
        let a = args(&[]);
        assert!(a.scaler_listen.is_none());
        assert_eq!(a.scale_to_zero_idle, Duration::from_secs(300));
        assert!(a.scaler_peers.is_empty());
    }

    #[test]
    fn bad_peers_name_the_flag_and_the_reason() {
        let a = args(&["--scaler-peers", "buildkit-router-peers.buildkit.svc"]);
        let err = parse_peers(&a).unwrap_err().to_string();
        assert!(
            err.contains("--scaler-peers") && err.contains(":port"),
            "{err}"
        );
        let a = args(&["--scaler-peers", "a.svc:6000,10.0.0.7:6000"]);
        assert_eq!(parse_peers(&a).unwrap().len(), 2);
    }

    #[test]
    fn tls_peers_need_a_ca() {
        let a = args(&[
            "--scaler-tls-cert",
            "/c.pem",
            "--scaler-tls-key",
            "/k.pem",
            "--scaler-peers",
            "peers.svc:6000",
        ]);
        assert!(matches!(
            peer_tls_files(&a, "peers.svc"),
            Err(ScalerError::PeerCaMissing)
        ));
        let a = args(&[
            "--scaler-tls-cert",
            "/c.pem",
            "--scaler-tls-key",
            "/k.pem",
            "--scaler-tls-client-ca",
            "/ca.pem",
            "--scaler-peer-ca",
            "/ca.pem",
            "--scaler-peers",
            "peers.svc:6000",
        ]);
        let files = peer_tls_files(&a, "peers.svc").unwrap();
        assert_eq!(files.server_name.as_deref(), Some("peers.svc"));
        assert!(
            files.cert.is_some(),
            "with mTLS, peers present the scaler's certificate"
        );
    }
}
