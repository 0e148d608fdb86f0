//! Control/Status: the daemon's progress stream, or the router's waiting vertex while queued.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use tracing::info;

use super::base::{
    error, error_response_invalid, stream_context, unavailable_backend, ConnState, Router,
};
use super::refs::RefState;
use crate::admission::Progress;
use crate::body::{RequestBody, ResponseBody};
use crate::forward::{self, code, Head};
use crate::waiting;
use crate::wire;

impl Router {
    pub(super) async fn status(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let (parts, body, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let build_ref = match wire::decode_status_ref(peeked.message()) {
            Ok(r) => r.to_owned(),
            Err(error) => return error_response_invalid("Control/Status", &error),
        };
        tracing::Span::current().record("build_ref", &*build_ref);
        let backend = match self.resolve_or_locate(&build_ref, conn).await {
            RefState::Bound(backend) => Some(backend),
            RefState::Queued(progress) => {
                let placed = match &*progress.borrow() {
                    Progress::Placed(backend) => Some(backend.clone()),
                    _ => None,
                };
                match placed {
                    Some(backend) => Some(backend),
                    // The client sees the wait as a vertex, then the daemon's own stream.
                    None => {
                        return waiting::status_while_queued(
                            Arc::from(build_ref.as_str()),
                            progress,
                            Head::from_parts(&parts),
                            peeked.buffered,
                            body,
                        )
                    }
                }
            }
            // buildctl reports the Solve's own error; an ended progress stream adds nothing.
            RefState::Refused(refused) => {
                info!(build_ref = %build_ref, code = refused.code, "the router refused this build's Solve; ending its Status");
                return forward::ok_response(None, Bytes::new());
            }
            RefState::Unknown => None,
        };
        if let Some(backend) = backend {
            return self
                .forward_to(
                    conn,
                    &backend,
                    Some(&build_ref),
                    parts,
                    RequestBody::prefixed(peeked.buffered, body).holding(peeked.share),
                )
                .await;
        }
        // Not a build this router placed (another replica's, or one that ended long ago): ask
        // every backend and relay the one that knows it.
        info!(build_ref = %build_ref, "unknown build ref; asking every backend");
        let head = Head::from_parts(&parts);
        self.first_answer(&head, peeked.buffered, Some(&build_ref))
            .await
    }

    /// Sends a copy of the call to every live backend and relays the first that answers with a
    /// stream rather than an error; if every backend errs, relays the first error.
    pub(super) async fn first_answer(
        &self,
        head: &Head,
        request: Bytes,
        build_ref: Option<&str>,
    ) -> Response<ResponseBody> {
        let backends = self.live_backends();
        if backends.is_empty() {
            return error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            );
        }
        let mut pending: FuturesUnordered<_> = backends
            .iter()
            .map(|backend| {
                let request = request.clone();
                async move { (backend, forward::send_copy(backend, head, request).await) }
            })
            .collect();
        let mut first_error: Option<Response<ResponseBody>> = None;
        while let Some((backend, result)) = pending.next().await {
            let context = stream_context(backend, build_ref);
            match result {
                Ok(response)
                    if crate::grpc::grpc_status_of(response.headers()).is_none()
                        || pending.is_empty() =>
                {
                    tracing::Span::current().record("backend", &**backend.identity());
                    if crate::grpc::grpc_status_of(response.headers()).is_some() {
                        if let Some(first) = first_error {
                            return first;
                        }
                    }
                    return forward::relay(response, context);
                }
                Ok(response) => {
                    first_error.get_or_insert_with(|| forward::relay(response, context));
                }
                Err(error) => {
                    if pending.is_empty() {
                        return first_error
                            .unwrap_or_else(|| unavailable_backend(backend, build_ref, error));
                    }
                }
            }
        }
        first_error.unwrap_or_else(|| {
            error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend answered",
            )
        })
    }
}
