//! The admin HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/status`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::metrics::Metrics;
use crate::pool::{BackendState, Pool};
use crate::registry::Registry;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub registry: Arc<Registry>,
    /// The admission queue, when queueing is on.
    pub admission: Option<Arc<Admission>>,
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

/// A build waiting in the queue.
#[derive(serde::Serialize)]
struct StatusQueued {
    build_ref: String,
    /// Builds served before it.
    position: usize,
    tenant: String,
    key_source: &'static str,
    key_hash: Option<String>,
    age_seconds: f64,
}

/// The `/status` document.
#[derive(serde::Serialize)]
struct StatusDoc {
    synced: bool,
    backends: Vec<StatusBackend>,
    builds: Vec<StatusBuild>,
    builds_queued: i64,
    queued: Vec<StatusQueued>,
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
            builds_queued: self.metrics.queued_total.get(),
            queued: self
                .admission
                .iter()
                .flat_map(|a| a.waiting())
                .map(|(build_ref, w)| StatusQueued {
                    build_ref: build_ref.to_string(),
                    position: w.position,
                    tenant: w.tenant.to_string(),
                    key_source: w.key_source.as_str(),
                    key_hash: w.key_hash.map(|h| format!("{h:016x}")),
                    age_seconds: w.age.as_secs_f64(),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Ready: the first discovery list arrived, and a backend takes builds or builds can wait
    /// for one (queueing on: a pool scaled to zero must still receive the builds that make the
    /// autoscaler grow it).
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.pool.is_synced() {
            return Err("waiting for the first list of backends from discovery");
        }
        if self.admission.is_none() && self.pool.snapshot().any_ready().is_none() {
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
