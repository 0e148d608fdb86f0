//! The `externalscaler.ExternalScaler` gRPC service and its listener (HTTP/2, h2c or TLS).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::codegen::Service as _;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::api::{INSTANCE_HEADER, METRIC_NAME, SCOPE_KEY, SCOPE_REPLICA};
use super::state::Scaler;
use crate::proto::externalscaler::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use crate::proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct ScalerService {
    scaler: Arc<Scaler>,
    shutdown: CancellationToken,
}

/// Whether a request asks for this replica's own figures (a peer), not the pool's (KEDA).
fn replica_scope(object: Option<&ScaledObjectRef>) -> bool {
    object
        .and_then(|o| o.scaler_metadata.get(SCOPE_KEY))
        .is_some_and(|v| v == SCOPE_REPLICA)
}

impl ScalerService {
    fn answer<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if let Ok(value) = self.scaler.instance.parse() {
            response.metadata_mut().insert(INSTANCE_HEADER, value);
        }
        response
    }
}

type StateStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for ScalerService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let result = if replica_scope(Some(request.get_ref())) {
            self.scaler.local_busy_now()
        } else {
            self.scaler.is_active().await
        };
        Ok(self.answer(IsActiveResponse { result }))
    }

    type StreamIsActiveStream = StateStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<StateStream>, Status> {
        let object = request.get_ref();
        let rx = if replica_scope(Some(object)) {
            self.scaler.subscribe_local()
        } else {
            debug!(scaled_object = %object.name, namespace = %object.namespace, "KEDA opened StreamIsActive");
            self.scaler.subscribe()
        };
        Ok(self.answer(state_stream(rx, self.shutdown.clone())))
    }

    async fn get_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let target = self.scaler.target();
        Ok(self.answer(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: METRIC_NAME.to_owned(),
                target_size: target as i64,
                target_size_float: target as f64,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let request = request.into_inner();
        if !request.metric_name.is_empty() && request.metric_name != METRIC_NAME {
            return Err(Status::not_found(format!(
                "buildkit-router serves one metric, {METRIC_NAME:?}, not {:?} (GetMetricSpec names it)",
                request.metric_name
            )));
        }
        let value = if replica_scope(request.scaled_object_ref.as_ref()) {
            self.scaler.local_queued()
        } else {
            self.scaler.demand().await
        };
        Ok(self.answer(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: METRIC_NAME.to_owned(),
                metric_value: value as i64,
                metric_value_float: value as f64,
            }],
        }))
    }
}

/// The current state at once, then each change (equal consecutive states are sent once), until
/// shutdown.
fn state_stream(rx: watch::Receiver<bool>, shutdown: CancellationToken) -> StateStream {
    Box::pin(futures_util::stream::unfold(
        (rx, None::<bool>, shutdown),
        |(mut rx, last, shutdown)| async move {
            loop {
                if last.is_some() {
                    tokio::select! {
                        changed = rx.changed() => changed.ok()?,
                        _ = shutdown.cancelled() => return None,
                    }
                }
                let state = *rx.borrow_and_update();
                if last != Some(state) {
                    return Some((
                        Ok(IsActiveResponse { result: state }),
                        (rx, Some(state), shutdown),
                    ));
                }
            }
        },
    ))
}

/// Serves the scaler API on `listener` (TLS when `tls` is set) until `shutdown`.
pub(super) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    scaler: Arc<Scaler>,
    shutdown: CancellationToken,
) {
    let service = ExternalScalerServer::new(ScalerService {
        scaler,
        shutdown: shutdown.clone(),
    });
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    warn!(%error, "scaler accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve_connection(stream, service, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => serve_connection(tls, service, shutdown).await,
                        Ok(Err(error)) => {
                            warn!(%peer, %error, "scaler TLS handshake failed")
                        }
                        Err(_) => warn!(%peer, "scaler TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    service: ExternalScalerServer<ScalerService>,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let hyper_service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let mut service = service.clone();
        async move { Ok::<_, Infallible>(service.call(request).await.unwrap_or_else(|e| match e {})) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), hyper_service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%error, "scaler connection ended with an error");
    }
}
