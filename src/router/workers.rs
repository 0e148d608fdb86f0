//! ListWorkers and Info: any ready daemon, the next if one fails, else the last known answer.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{info, warn};

use super::base::{error, stream_context, unavailable_backend, ConnState, Router};
use crate::body::ResponseBody;
use crate::forward::{self, code, ForwardError, Head};
use crate::pool::{Backend, BackendState};
use crate::wire;

/// How often a ListWorkers/Info answer is read whole to refresh the cache; in between, answers
/// are relayed frame by frame like any other call.
pub(super) const CACHE_REFRESH: Duration = Duration::from_secs(30);

impl Router {
    pub(super) async fn any_ready(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let path: &'static str = match request.uri().path() {
            "/moby.buildkit.v1.Control/ListWorkers" => "/moby.buildkit.v1.Control/ListWorkers",
            _ => "/moby.buildkit.v1.Control/Info",
        };
        // This connection's backend first, then the others by load: a daemon that died a
        // moment ago costs a retry on the next, never the client's call. The first choice needs
        // no list; the rest is sorted only when it fails.
        let snapshot = self.pool.snapshot();
        let ready = |b: &Arc<Backend>| b.state() == BackendState::Ready;
        let first = conn.last_backend().filter(ready).or_else(|| {
            snapshot
                .backends
                .iter()
                .filter(|b| ready(b))
                .min_by_key(|b| b.active_builds())
                .cloned()
        });
        let others = |first: &Arc<Backend>| {
            let mut others: Vec<Arc<Backend>> = snapshot
                .backends
                .iter()
                .filter(|b| ready(b) && !Arc::ptr_eq(b, first))
                .cloned()
                .collect();
            others.sort_by_key(|b| b.active_builds());
            others.into_iter()
        };
        let fresh = self
            .refreshed
            .lock()
            .expect("refresh lock")
            .get(path)
            .is_some_and(|at| at.elapsed() < CACHE_REFRESH);
        // ListWorkersRequest / InfoRequest: one small message, read to be sent again.
        let (parts, _rest, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let head = Head::from_owned(parts);
        // buildkitd answers these in milliseconds. A daemon silent for as long as a health
        // check may take is likely frozen: ask the next one rather than wait seconds for its
        // health checks to declare it dead.
        let answer_within = self.pool.settings().health_timeout;
        let mut response = None;
        let candidates = first
            .clone()
            .into_iter()
            .chain(first.as_ref().into_iter().flat_map(others));
        for backend in candidates {
            let answer = forward::send_copy_answered_within(
                &backend,
                &head,
                peeked.buffered.clone(),
                answer_within,
            );
            match answer.await {
                Ok(answer) => {
                    tracing::Span::current().record("backend", &**backend.identity());
                    conn.used(&backend);
                    response = Some((backend, answer));
                    break;
                }
                Err(error) => {
                    if let ForwardError::Send { source, .. } = &error {
                        if !crate::body::is_stream_reset(source) {
                            backend.mark_unreachable(&source.to_string());
                        }
                    }
                    warn!(backend = %backend.identity(), %error, "{path} failed on a backend; trying the next");
                }
            }
        }
        let Some((backend, response)) = response else {
            return self.offline_answer(path);
        };
        if fresh {
            return forward::relay(response, stream_context(&backend, None));
        }
        // Small answers: read them whole, to cache them and learn the workers' platforms.
        let collected = match forward::collect(response, self.settings.max_message_size).await {
            Ok(collected) => collected,
            Err(error) => return unavailable_backend(&backend, None, error),
        };
        if collected.status != code::OK {
            return error(collected.status, collected.message);
        }
        self.offline.remember(path, &collected.body);
        if path.ends_with("ListWorkers") {
            let mut splitter = wire::MessageSplitter::default();
            splitter.push(&collected.body);
            if let Ok(Some(message)) = splitter.next_message(self.settings.max_message_size) {
                if let Ok(platforms) =
                    wire::decode_worker_platforms(&message[wire::GRPC_PREFIX_LEN..])
                {
                    backend.set_platforms(platforms);
                }
            }
        }
        self.refreshed
            .lock()
            .expect("refresh lock")
            .insert(path, Instant::now());
        forward::ok_response(Some(&collected.headers), collected.body)
    }

    /// ListWorkers/Info with no backend to ask (see [`crate::workers`]).
    pub(super) fn offline_answer(&self, path: &str) -> Response<ResponseBody> {
        match self.offline.answer(path) {
            Some(framed) => {
                info!("no backend is ready; answering {path} from the last known answer");
                forward::ok_response(None, framed)
            }
            None => error(
                code::UNAVAILABLE,
                "buildkit-router: no buildkitd backend is ready",
            ),
        }
    }
}
