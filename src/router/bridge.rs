//! LLBBridge (the gateway API a frontend calls during its build), and its Ping for queued
//! builds.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tracing::warn;

use super::base::{error, unavailable_backend, ConnState, Router, BUILD_ID_HEADER};
use super::refs::RefState;
use crate::body::{RequestBody, ResponseBody};
use crate::forward::{self, code};
use crate::pool::Backend;
use crate::waiting;

/// `LLBBridge/Ping`: answered by the router for queued builds.
pub(super) const PING_PATH: &str = crate::workers::PING;

impl Router {
    /// Forwards an `LLBBridge/Ping` and keeps its Pong (small), to answer queued builds' Pings.
    pub(super) async fn forward_ping(
        &self,
        conn: &ConnState,
        backend: &Arc<Backend>,
        build_ref: &str,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        tracing::Span::current().record("backend", &**backend.identity());
        conn.used(backend);
        let (parts, body) = request.into_parts();
        let response = match forward::send(backend, parts, RequestBody::incoming(body)).await {
            Ok(response) => response,
            Err(error) => return unavailable_backend(backend, Some(build_ref), error),
        };
        let collected = match forward::collect(response, self.settings.max_message_size).await {
            Ok(collected) => collected,
            Err(error) => return unavailable_backend(backend, Some(build_ref), error),
        };
        if collected.status != code::OK {
            return error(collected.status, collected.message);
        }
        self.offline.remember(PING_PATH, &collected.body);
        forward::ok_response(Some(&collected.headers), collected.body)
    }

    pub(super) async fn bridge(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let build_ref = request
            .headers()
            .get(BUILD_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|r| !r.is_empty())
            .map(str::to_owned);
        let Some(build_ref) = build_ref else {
            // buildkitd answers "no buildid found in context" itself.
            return self.sticky(conn, request).await;
        };
        tracing::Span::current().record("build_ref", &*build_ref);
        let is_ping = request.uri().path() == PING_PATH;
        let found = match self.resolve_ref(&build_ref, conn).await {
            RefState::Bound(backend) => Some(backend),
            // The gateway client gives Ping 15 s: a queued build's Ping is answered here.
            RefState::Queued(progress) if is_ping => {
                if let Some(pong) = self.offline.known(PING_PATH) {
                    return waiting::pong(pong);
                }
                // No daemon's Pong known yet: wait for the placement within the Ping's own
                // deadline, then ask the daemon; else answer with the pinned release's Pong.
                let budget = crate::grpc::grpc_timeout_of(request.headers())
                    .unwrap_or(Duration::from_secs(15))
                    .saturating_sub(Duration::from_secs(2));
                match tokio::time::timeout(budget, self.placed(&build_ref, progress)).await {
                    Ok(Ok(backend)) => {
                        return self.forward_ping(conn, &backend, &build_ref, request).await
                    }
                    Ok(Err(answer)) => return answer,
                    Err(_) => {
                        let pong = self.offline.answer(PING_PATH).unwrap_or_default();
                        return waiting::pong(pong);
                    }
                }
            }
            RefState::Queued(progress) => match self.placed(&build_ref, progress).await {
                Ok(backend) => Some(backend),
                Err(answer) => return answer,
            },
            // The Solve's own refusal (it names the build and why).
            RefState::Refused(refused) => return error(refused.code, &*refused.message),
            RefState::Unknown => None,
        };
        if let (Some(backend), true) = (&found, is_ping) {
            return self.forward_ping(conn, backend, &build_ref, request).await;
        }
        let backend = match found {
            Some(backend) => backend,
            None => {
                // The daemon answers `no such job` with its own wait; send it where the
                // connection's builds go.
                warn!(build_ref = %build_ref, "LLBBridge call for a build ref no Solve named; forwarding to this connection's backend");
                match self.connection_backend(conn) {
                    Some(backend) => backend,
                    None => {
                        return error(
                            code::UNAVAILABLE,
                            "buildkit-router: no buildkitd backend is ready",
                        )
                    }
                }
            }
        };
        let (parts, body) = request.into_parts();
        self.forward_to(
            conn,
            &backend,
            Some(&build_ref),
            parts,
            RequestBody::incoming(body),
        )
        .await
    }
}
