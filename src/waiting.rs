//! What the client of a queued build sees while it waits: a vertex of the router's own in its
//! `Control/Status` stream, and an `LLBBridge/Ping` answered by the router.
//!
//! The Status stream is the client's own (its request is kept): the router answers it at once,
//! writes `[buildkit-router] waiting for a builder: ...` as a running vertex (with a log line
//! each time the position changes), completes the vertex when the build is placed, and from
//! then on splices the daemon's own Status stream into the same answer. Clients show the wait
//! like any build step (`#0 [buildkit-router] waiting for a builder ... 95.2s`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body_util::BodyExt;
use hyper::body::Frame;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::{debug, Instrument};

use crate::admission::Progress;
use crate::body::ResponseBody;
use crate::forward::{self, Head};
use crate::grpc::{code, status_trailers};
use crate::pool::Backend;
use crate::proto::control as pb;
use crate::wire;

/// The vertex name prefix (BuildKit's convention for internal steps: `[name] what`).
pub const VERTEX_PREFIX: &str = "[buildkit-router] waiting for a builder";

fn timestamp(at: SystemTime) -> pb::Timestamp {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    pb::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A digest for the router's vertex of `build_ref`: stable for one build, unlike any LLB digest.
fn vertex_digest(build_ref: &str) -> String {
    let h = crate::placement::hash::hash_str(build_ref);
    let g = crate::placement::hash::fmix64(h ^ 0x6275_696c_646b_6974);
    format!("sha256:{h:016x}{g:016x}{:016x}{:016x}", !h, !g)
}

/// The text of a waiting build's vertex.
pub fn describe(progress: &Progress) -> String {
    match progress {
        Progress::Waiting { ahead, pool, .. } => {
            let ahead = match ahead {
                0 => "next in line".to_owned(),
                1 => "1 build ahead".to_owned(),
                n => format!("{n} builds ahead"),
            };
            format!("{VERTEX_PREFIX}: {ahead}, {pool}")
        }
        Progress::Placed(backend) => format!("{VERTEX_PREFIX}: placed on {}", backend.identity()),
        Progress::Ended { message, .. } => format!("{VERTEX_PREFIX}: {message}"),
    }
}

/// One StatusResponse with the router's vertex (and a log line, if any), as a gRPC frame.
fn status_frame(
    digest: &str,
    name: &str,
    started: SystemTime,
    completed: Option<SystemTime>,
    error: Option<&str>,
    log: Option<&str>,
) -> Bytes {
    let now = SystemTime::now();
    let response = pb::StatusResponse {
        vertexes: vec![pb::Vertex {
            digest: digest.to_owned(),
            name: name.to_owned(),
            started: Some(timestamp(started)),
            completed: completed.map(timestamp),
            error: error.unwrap_or_default().to_owned(),
            ..Default::default()
        }],
        logs: log
            .map(|line| pb::VertexLog {
                vertex: digest.to_owned(),
                timestamp: Some(timestamp(now)),
                stream: 1,
                msg: format!("{line}\n").into_bytes(),
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    wire::encode_frame(&response.encode_to_vec())
}

/// RFC 3339 (UTC), as buildkitd's `buildkit-current-timestamp` header.
fn rfc3339(at: SystemTime) -> String {
    jiff::Timestamp::try_from(at)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Answers the Status call of a queued build: the waiting vertex until it is placed, then the
/// daemon's own Status stream (the request `head` + `request` is sent there).
pub fn status_while_queued(
    build_ref: Arc<str>,
    mut progress: watch::Receiver<Progress>,
    head: Head,
    request: Bytes,
    request_rest: hyper::body::Incoming,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(16);
    let task = async move {
        // Held to the end: dropping a request body the client has not finished sending would
        // reset the client's stream.
        let _request_rest = request_rest;
        let digest = vertex_digest(&build_ref);
        let started = SystemTime::now();
        let mut shown = describe(&progress.borrow_and_update());
        if tx
            .send(Frame::data(status_frame(
                &digest,
                &shown,
                started,
                None,
                None,
                Some(&shown),
            )))
            .await
            .is_err()
        {
            return;
        }
        let backend: Arc<Backend> = loop {
            tokio::select! {
                changed = progress.changed() => {
                    if changed.is_err() {
                        // The build's waiter is gone (its Solve was cancelled).
                        let _ = tx.send(Frame::trailers(status_trailers(code::OK, ""))).await;
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
            let now = progress.borrow_and_update().clone();
            match now {
                Progress::Waiting { .. } => {
                    let text = describe(&now);
                    if text != shown {
                        shown = text;
                        let frame =
                            status_frame(&digest, &shown, started, None, None, Some(&shown));
                        if tx.send(Frame::data(frame)).await.is_err() {
                            return;
                        }
                    }
                }
                Progress::Placed(backend) => {
                    let done = describe(&Progress::Placed(backend.clone()));
                    let frame = status_frame(
                        &digest,
                        &done,
                        started,
                        Some(SystemTime::now()),
                        None,
                        Some(&done),
                    );
                    if tx.send(Frame::data(frame)).await.is_err() {
                        return;
                    }
                    break backend;
                }
                Progress::Ended { message, .. } => {
                    let frame = status_frame(
                        &digest,
                        &shown,
                        started,
                        Some(SystemTime::now()),
                        Some(&message),
                        None,
                    );
                    let _ = tx.send(Frame::data(frame)).await;
                    let _ = tx
                        .send(Frame::trailers(status_trailers(code::OK, "")))
                        .await;
                    return;
                }
            }
        };
        // Placed: the daemon's own Status stream follows in the same answer.
        let response = match forward::send_copy(&backend, &head, request).await {
            Ok(response) => response,
            Err(error) => {
                let message = format!(
                    "buildkit-router: buildkitd backend {} is unavailable for build {build_ref}: {error}",
                    backend.label()
                );
                let _ = tx
                    .send(Frame::trailers(status_trailers(
                        code::UNAVAILABLE,
                        &message,
                    )))
                    .await;
                return;
            }
        };
        let (parts, mut body) = response.into_parts();
        if crate::grpc::grpc_status_of(&parts.headers).is_some() {
            // Trailers-Only: the status is in the headers.
            let _ = tx.send(Frame::trailers(parts.headers)).await;
            return;
        }
        loop {
            tokio::select! {
                frame = body.frame() => match frame {
                    Some(Ok(frame)) => {
                        let end = frame.is_trailers();
                        if tx.send(frame).await.is_err() || end {
                            return;
                        }
                    }
                    Some(Err(error)) => {
                        debug!(%error, "daemon's Status stream failed");
                        let message = format!(
                            "buildkit-router: lost buildkitd backend {} during build {build_ref}: {error}",
                            backend.label()
                        );
                        let _ = tx.send(Frame::trailers(status_trailers(code::UNAVAILABLE, &message))).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(Frame::trailers(status_trailers(code::OK, ""))).await;
                        return;
                    }
                },
                // The client went away: dropping `body` resets the daemon's stream.
                _ = tx.closed() => return,
            }
        }
    };
    tokio::spawn(task.in_current_span());
    let mut response = Response::new(ResponseBody::channel(rx));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Ok(now) = HeaderValue::from_str(&rfc3339(SystemTime::now())) {
        headers.insert("buildkit-current-timestamp", now);
    }
    response
}

/// The router's answer to a queued build's `LLBBridge/Ping`: a daemon's framed Pong (see
/// [`crate::workers::PING`] for why never an empty one).
pub fn pong(framed: Bytes) -> Response<ResponseBody> {
    forward::ok_response(None, framed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = UNIX_EPOCH + Duration::new(1_796_031_109, 462_109_640);
        assert_eq!(rfc3339(at), "2026-11-30T09:31:49.46210964Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn the_vertex_names_the_position_and_the_pool() {
        let text = describe(&Progress::Waiting {
            ahead: 3,
            queued: 5,
            pool: crate::queue::PoolState {
                ready: 4,
                free: 0,
                active: 16,
                capacity: Some(16),
            },
        });
        assert_eq!(
            text,
            "[buildkit-router] waiting for a builder: 3 builds ahead, 0 of 4 builders free, 16 builds running of 16 slots"
        );
        let digest = vertex_digest("ref1");
        assert_eq!(digest.len(), "sha256:".len() + 64);
        assert_eq!(digest, vertex_digest("ref1"));
        assert_ne!(digest, vertex_digest("ref2"));
    }
}
