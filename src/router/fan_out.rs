//! Calls about the whole pool (DiskUsage, Prune, history lists): every live backend is asked,
//! and the answers are merged.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use tracing::{warn, Instrument};

use super::base::{error, Router};
use crate::body::ResponseBody;
use crate::forward::{self, code, Head};
use crate::grpc::status_trailers;
use crate::pool::Backend;

impl Router {
    /// Unary call to every backend; relays the first OK answer, else the first error.
    /// Sends a copy of a unary call to every live backend and reads each whole answer.
    pub(super) async fn collect_from_all(
        &self,
        head: &Head,
        request: &Bytes,
    ) -> (Vec<Arc<Backend>>, Vec<Result<forward::Collected, String>>) {
        let backends = self.live_backends();
        let max = self.settings.max_message_size;
        let answers = futures_util::future::join_all(backends.iter().map(|backend| async move {
            let response = forward::send_copy(backend, head, request.clone())
                .await
                .map_err(|e| e.to_string())?;
            forward::collect(response, max)
                .await
                .map_err(|e| e.to_string())
        }))
        .await;
        (backends, answers)
    }

    pub(super) async fn first_ok(
        &self,
        head: &Head,
        request: Bytes,
        build_ref: Option<&str>,
    ) -> Response<ResponseBody> {
        let (backends, answers) = self.collect_from_all(head, &request).await;
        let mut first_error = None;
        for (backend, answer) in backends.iter().zip(answers) {
            match answer {
                Ok(collected) if collected.status == code::OK => {
                    return forward::ok_response(Some(&collected.headers), collected.body)
                }
                Ok(collected) => {
                    first_error.get_or_insert((collected.status, collected.message));
                }
                Err(e) => {
                    first_error.get_or_insert((
                        code::UNAVAILABLE,
                        format!(
                            "buildkit-router: buildkitd backend {}: {e}",
                            backend.identity()
                        ),
                    ));
                }
            }
        }
        match first_error {
            Some((code, message)) => error(code, message),
            None => error(
                code::UNAVAILABLE,
                match build_ref {
                    Some(r) => {
                        format!("buildkit-router: no buildkitd backend is ready for build {r}")
                    }
                    None => "buildkit-router: no buildkitd backend is ready".into(),
                },
            ),
        }
    }

    pub(super) async fn fan_out_unary(
        self: &Arc<Self>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let (parts, _rest, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let head = Head::from_parts(&parts);
        let (backends, answers) = self.collect_from_all(&head, &peeked.buffered).await;
        if backends.is_empty() {
            return error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            );
        }
        let max = self.settings.max_message_size;
        let mut merged = Vec::new();
        let mut first_error = None;
        let mut headers = None;
        for (backend, answer) in backends.iter().zip(answers) {
            match answer {
                Ok(collected) if collected.status == code::OK => {
                    headers.get_or_insert(collected.headers);
                    merged.push(collected.body);
                }
                Ok(collected) => {
                    warn!(backend = %backend.identity(), code = collected.status, message = %collected.message, "fan-out call failed on one backend");
                    first_error.get_or_insert((collected.status, collected.message));
                }
                Err(e) => {
                    warn!(backend = %backend.identity(), error = %e, "fan-out call failed on one backend");
                    first_error.get_or_insert((
                        code::UNAVAILABLE,
                        format!(
                            "buildkit-router: buildkitd backend {}: {e}",
                            backend.identity()
                        ),
                    ));
                }
            }
        }
        if merged.is_empty() {
            let (code, message) = first_error.unwrap_or((
                code::UNAVAILABLE,
                "buildkit-router: no backend answered".into(),
            ));
            return error(code, message);
        }
        match forward::merge_unary_payloads(merged.iter(), max) {
            Ok(message) => forward::ok_response(headers.as_ref(), message),
            Err(e) => error(
                code::INTERNAL,
                format!("buildkit-router: cannot merge answers: {e}"),
            ),
        }
    }

    pub(super) async fn fan_out_stream(
        self: &Arc<Self>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let (parts, _rest, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        self.merge_streams(Head::from_parts(&parts), peeked.buffered)
    }

    /// Streams every backend's answer to the client, message by message, and ends with OK if
    /// any backend ended OK, else with the first error.
    pub(super) fn merge_streams(&self, head: Head, request: Bytes) -> Response<ResponseBody> {
        let backends = self.live_backends();
        if backends.is_empty() {
            return error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            );
        }
        let (tx, rx) = mpsc::channel::<Frame<Bytes>>(16);
        let max = self.settings.max_message_size;
        tokio::spawn(
            async move {
                let results = futures_util::future::join_all(backends.iter().map(|backend| {
                    let (head, request, tx) = (&head, request.clone(), &tx);
                    async move {
                        let response = forward::send_copy(backend, head, request).await.map_err(|e| e.to_string())?;
                        forward::pump_messages(response, tx, max).await
                    }
                }))
                .await;
                let mut first_error = None;
                let mut any_ok = false;
                for (backend, result) in backends.iter().zip(results) {
                    match result {
                        Ok((code::OK, _)) => any_ok = true,
                        Ok((code, message)) => {
                            first_error.get_or_insert((code, message));
                        }
                        Err(e) => {
                            warn!(backend = %backend.identity(), error = %e, "merged stream failed on one backend");
                            first_error.get_or_insert((code::UNAVAILABLE, format!("buildkit-router: buildkitd backend {}: {e}", backend.identity())));
                        }
                    }
                }
                let trailers = match (any_ok, first_error) {
                    (true, _) | (false, None) => status_trailers(code::OK, ""),
                    (false, Some((code, message))) => status_trailers(code, &message),
                };
                let _ = tx.send(Frame::trailers(trailers)).await;
            }
            .in_current_span(),
        );
        let mut response = Response::new(ResponseBody::channel(rx));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        response
    }
}
