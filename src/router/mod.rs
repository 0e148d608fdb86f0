//! One request's way: classify it, find its backend (registry, else placement), and hand it to
//! forwarding or the session relay. The only module that knows every other module's role.
//!
//! A dispatcher: each call kind has a room of its own (`solve`, `session`, `status`, `bridge`,
//! `history`, `fan_out`, `workers`), built on `base` (the router's state and shared answers)
//! and `refs` (where a build's calls go).

mod base;
mod bridge;
mod fan_out;
mod history;
mod refs;
mod session;
mod solve;
mod status;
mod workers;

use self::base::error;
pub use self::base::{ConnState, Router, RouterSettings, BUILD_ID_HEADER};

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tracing::{field, Instrument};

use crate::body::{CallEnd, EndHook, ResponseBody};
use crate::classify::{classify, Route};
use crate::forward::{self, code};
use crate::metrics::Metrics;
use crate::wire;

/// Counts a call whose handler was dropped unanswered (the client cancelled it).
struct Unanswered<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.record_call(self.method, None);
        }
    }
}

impl Router {
    /// Handles one request from a client connection.
    pub async fn handle(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let call = classify(request.uri().path());
        // Calls that belong to a build get a span carrying its ref and backend, so one build can
        // be followed through the logs; pool-wide calls (ListWorkers, DiskUsage, health...) skip
        // the span's cost, which is measurable at this rate (docs/performance.md).
        let span = if call.route.belongs_to_build() {
            tracing::info_span!(
                "call",
                method = call.method,
                build_ref = field::Empty,
                backend = field::Empty
            )
        } else {
            tracing::Span::none()
        };
        // A call the client cancels before any answer (a Solve runs the whole build before its
        // answer's headers) is counted when its future is dropped.
        let mut unanswered = Unanswered {
            metrics: &self.metrics,
            method: call.method,
            armed: true,
        };
        let response = self.route(call.route, conn, request).instrument(span).await;
        unanswered.armed = false;
        let metrics = self.metrics.clone();
        let method = call.method;
        response.map(|body| {
            body.with_hook(EndHook::new(move |end| {
                metrics.record_call(
                    method,
                    match end {
                        CallEnd::Status(code) => Some(code),
                        CallEnd::Cancelled => None,
                    },
                )
            }))
        })
    }

    async fn route(
        self: &Arc<Self>,
        route: Route,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        // Each route's future is boxed: inline, the largest (Solve's) would make every call's
        // future kilobytes big, copied whole into hyper's per-stream task at every call.
        match route {
            Route::Solve => Box::pin(self.solve(conn, request)).await,
            Route::Session => Box::pin(self.session(conn, request)).await,
            Route::Status => Box::pin(self.status(conn, request)).await,
            Route::Bridge => Box::pin(self.bridge(conn, request)).await,
            Route::ListenHistory => Box::pin(self.history(conn, request, true)).await,
            Route::UpdateHistory => Box::pin(self.history(conn, request, false)).await,
            Route::FanOutUnary => Box::pin(self.fan_out_unary(request)).await,
            Route::FanOutStream => Box::pin(self.fan_out_stream(request)).await,
            Route::AnyReady => Box::pin(self.any_ready(conn, request)).await,
            Route::Sticky => Box::pin(self.sticky(conn, request)).await,
            Route::Health => self.health(request),
        }
    }

    /// grpc.health.v1: the router answers for itself. SERVING once it can route builds.
    fn health(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        match request.uri().path() {
            "/grpc.health.v1.Health/Check" => {
                // With the queue on, an empty pool still takes builds (they wait for a daemon).
                let serving = self.pool.is_synced()
                    && (self.admission.is_some() || self.pool.snapshot().any_ready().is_some());
                // HealthCheckResponse { status = 1 SERVING | 2 NOT_SERVING }
                let message = wire::encode_frame(&[0x08, if serving { 1 } else { 2 }]);
                forward::ok_response(None, message)
            }
            _ => error(
                code::UNIMPLEMENTED,
                "buildkit-router: only grpc.health.v1.Health/Check is served",
            ),
        }
    }
}
