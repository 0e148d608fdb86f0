//! Wiring: builds every part from the configuration and starts the tasks. Used by `main` and by
//! the tests, which run the real router in-process.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::AdminState;
use crate::admission::Admission;
use crate::config::RunConfig;
use crate::listener::{Limits, Server};
use crate::metrics::Metrics;
use crate::placement::Placement;
use crate::pool::{Pool, PoolSettings};
use crate::registry::{Registry, RegistrySettings};
use crate::router::{Router, RouterSettings};
use crate::routing_buffer::RoutingBuffer;
use crate::runtime::Workers;
use crate::tls::{self, BackendTlsFiles};

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    #[error(transparent)]
    Scaler(#[from] crate::scaler::ScalerError),
}

/// A running router.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The KEDA external scaler API, with `--scaler-listen`.
    pub scaler: Option<crate::scaler::RunningScaler>,
    pub pool: Arc<Pool>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Cancel to drain and stop.
    pub shutdown: CancellationToken,
    server: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits until the listener has drained after `shutdown`, then stops background tasks.
    pub async fn finished(self) {
        let _ = self.server.await;
        for task in self.background {
            task.abort();
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Starts the router: listeners, pool, discovery, health checks, admin endpoints. Everything
/// runs on the caller's runtime.
pub async fn start(cfg: RunConfig) -> Result<Running, StartError> {
    start_on(cfg, None).await
}

/// [`start`], with client connections served by `workers` (thread per core), each worker
/// keeping its own connection to every backend.
pub async fn start_on(
    cfg: RunConfig,
    workers: Option<Arc<Workers>>,
) -> Result<Running, StartError> {
    let backend_tls = BackendTlsFiles {
        ca: cfg.backend_tls_ca.clone(),
        cert: cfg.backend_tls_cert.clone(),
        key: cfg.backend_tls_key.clone(),
        server_name: cfg.backend_tls_server_name.clone(),
    };
    let static_backends = cfg
        .backends
        .iter()
        .map(|url| tls::parse_backend_url(url, &backend_tls))
        .collect::<Result<Vec<_>, _>>()?;
    let server_tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            Some(tls::server_config(cert, key, cfg.tls_client_ca.as_deref())?)
        }
        _ => None,
    };

    let mut placement_config = cfg.placement.to_config();
    // With the queue on, capacity is a real cap with a default (queue::DEFAULT_MAX_BUILDS_PER_BACKEND).
    placement_config.max_builds_per_backend = cfg
        .queue
        .max_builds_per_backend(placement_config.max_builds_per_backend);
    let placement = Placement::new(placement_config.clone());
    let pool = Pool::new(PoolSettings {
        connect_timeout: cfg.connect_timeout,
        health_interval: cfg.health_interval,
        health_timeout: cfg.health_timeout,
        health_failures: cfg.health_failures,
        max_builds_per_backend: placement_config.max_builds_per_backend,
        shards: workers.as_ref().map_or(1, |w| w.len()),
        ..PoolSettings::default()
    });
    let registry = Registry::new(RegistrySettings {
        linger: cfg.build_linger,
        ttl: cfg.registry_ttl,
        unbound_expiry: (cfg.ref_wait + cfg.session_bind_window) * 4,
        arriving_wait: cfg.routing_buffer_wait,
    });
    // A backend never runs more than its cap, so a larger target would ask the autoscaler for
    // too few daemons while builds wait.
    let target_builds_per_backend = match placement_config.max_builds_per_backend {
        Some(cap) if cap < cfg.target_builds_per_backend => {
            tracing::warn!(
                target = cfg.target_builds_per_backend,
                cap,
                "--target-builds-per-backend is above --max-builds-per-backend; desired_backends uses the cap"
            );
            cap
        }
        _ => cfg.target_builds_per_backend,
    };
    let metrics = Metrics::new(pool.clone(), target_builds_per_backend)?;
    let admission = cfg.queue.enabled.then(|| {
        Admission::new(
            cfg.queue.to_config(),
            placement.clone(),
            pool.clone(),
            metrics.clone(),
        )
    });
    let limits = Limits {
        max_connections: cfg.max_connections,
        max_concurrent_streams: cfg.max_concurrent_streams,
        max_header_list_size: cfg.max_header_list_size,
        max_connections_per_ip: cfg.max_connections_per_ip,
        tls_handshake_timeout: cfg.handshake_timeout,
        ..Limits::default()
    };
    let router = Router::new(
        pool.clone(),
        registry.clone(),
        placement,
        metrics.clone(),
        RouterSettings {
            session_bind_window: cfg.session_bind_window,
            session_passthrough_window: cfg.session_passthrough_window,
            ref_wait: cfg.ref_wait,
            max_message_size: cfg.max_message_size,
            tenant_from: cfg.queue.tenant_from,
            state_dir: cfg.state_dir.clone(),
            default_platforms: cfg.default_platforms.clone(),
            content: cfg.content.to_settings(),
            routing_buffer: RoutingBuffer::new(
                cfg.routing_buffer,
                cfg.routing_buffer_wait,
                // What a waiting message may hold, read and unread.
                RoutingBuffer::held_per_waiter(limits.stream_window, limits.max_frame_size),
                metrics.routing_buffer_bytes.clone(),
                metrics.routing_buffer_refusals_total.clone(),
            ),
            ..RouterSettings::default()
        },
        admission.clone(),
    );

    let shutdown = CancellationToken::new();
    let mut background = Vec::new();
    if let Some(admission) = &admission {
        background.push(tokio::spawn(admission.clone().run(shutdown.clone())));
    }
    let (updates_tx, updates_rx) = mpsc::channel(64);
    background.push(tokio::spawn(pool.clone().run_updates(updates_rx)));
    // Discovered endpoints use the backend TLS settings when --discovered-backend-tls is set.
    let discovered_tls = match &backend_tls.ca {
        Some(_) => {
            Some(backend_tls.for_host(backend_tls.server_name.as_deref().unwrap_or("buildkitd"))?)
        }
        None => None,
    };
    crate::discovery::run(
        &cfg.discovery,
        static_backends,
        discovered_tls,
        updates_tx,
        metrics.discovery.clone(),
    )
    .await?;
    background.push(tokio::spawn(pool.clone().run_health_checks()));
    background.push(tokio::spawn(
        registry
            .clone()
            .run_sweeper(std::time::Duration::from_secs(15)),
    ));

    if cfg.scaler.scaler_listen.is_some() && admission.is_none() {
        tracing::warn!(
            "--scaler-listen with --queue off: builds sent to an empty pool fail at once instead of waiting, so KEDA can never scale it up from zero"
        );
    }
    let scaler = crate::scaler::start(
        &cfg.scaler,
        crate::scaler::ScalerParts {
            pool: pool.clone(),
            admission: admission.clone(),
            target_builds_per_backend,
        },
        shutdown.clone(),
        &mut background,
    )
    .await?;

    let admin = bind(cfg.admin_listen).await?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.admin_listen,
        source,
    })?;
    let admin_state = AdminState {
        metrics: metrics.clone(),
        pool: pool.clone(),
        registry: registry.clone(),
        admission: admission.clone(),
    };
    background.push(tokio::spawn(crate::admin::serve_admin(
        admin,
        admin_state,
        shutdown.clone(),
    )));

    let listener = bind(cfg.listen).await?;
    let server = Server::new(
        listener,
        server_tls.clone(),
        router,
        metrics.clone(),
        limits,
        workers,
    );
    let addr = server.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    info!(%addr, %admin_addr, tls = server_tls.is_some(), mtls = cfg.tls_client_ca.is_some(), "buildkit-router listening");
    let server = tokio::spawn(server.serve(shutdown.clone(), cfg.shutdown_grace));
    Ok(Running {
        addr,
        admin_addr,
        scaler,
        pool,
        registry,
        metrics,
        shutdown,
        server,
        background,
    })
}
