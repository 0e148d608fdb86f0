//! Control/Session: the router side of the tunnel (passed through when placed at once, else
//! held while its build waits, then relayed); the tunnel itself is in `crate::session`.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::field;

use super::base::{placement_refusal, ConnState, Router};
use super::refs::settled;
use crate::admission::{Admission, Progress};
use crate::body::ResponseBody;
use crate::forward::{self, ForwardError};
use crate::grpc::code;
use crate::registry::KeyKind;
use crate::session;

impl Router {
    /// Control/Session: passed through to its backend as it came when placed within
    /// `--session-passthrough-window` (a Solve names it, a backend has room); otherwise answered
    /// and held by the router (its inner HTTP/2 connection to the client keeps the client's
    /// timers satisfied) until a Solve names it, the queue places its build or the bind window
    /// places it, then relayed to that backend. The tunnel work is in `session`.
    pub(super) async fn session(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let Some(uuid) = header(session::UUID_HEADER).filter(|u| !u.is_empty()) else {
            // buildkitd rejects it with its own error; pass it on untouched.
            return self.sticky(conn, request).await;
        };
        let shared_key = header(session::SHARED_KEY_HEADER).unwrap_or_default();
        tracing::Span::current()
            .record("build_ref", field::display(format_args!("session:{uuid}")));
        let wait = {
            let router = self.clone();
            let uuid = uuid.clone();
            async move {
                // A Session whose build waits in the queue is held (the relay keeps the
                // client's inner connection alive) until that build is placed.
                let held_since = Instant::now();
                let bind_window = match &router.admission {
                    Some(admission) => router
                        .wait_for_queued_owner(admission, &uuid)
                        .await
                        .map_err(|(code, message)| session::Refusal { code, message })?,
                    None => router.settings.session_bind_window,
                };
                let held = held_since.elapsed();
                let mut bound = session::bind(
                    &router.registry,
                    &router.pool,
                    &router.placement,
                    &uuid,
                    &shared_key,
                    bind_window,
                )
                .await
                .map_err(|error| {
                    let (code, message) =
                        placement_refusal(&error, &format!("session {uuid}"), &router.pool);
                    session::Refusal { code, message }
                })?;
                if !held.is_zero() && bound.how == session::BindHow::Immediate {
                    // A Solve bound it while it was held for its queued build.
                    bound.how = session::BindHow::Solve;
                    bound.waited += held;
                }
                router
                    .metrics
                    .session_bind_seconds
                    .with_label_values(&[bound.how.as_str()])
                    .observe(bound.waited.as_secs_f64());
                let pin = router.registry.pin_session(&uuid);
                Ok(session::Placed {
                    backend: bound.backend,
                    keep: Some(pin),
                })
            }
        };
        let open: session::Open = {
            let conn = conn.clone();
            Box::new(move |backend, parts, body| {
                Box::pin(async move {
                    conn.used(&backend);
                    forward::send(&backend, parts, body).await.map_err(|error| {
                        if let ForwardError::Send { source, .. } = &error {
                            if !crate::body::is_stream_reset(source) {
                                backend.mark_unreachable(&source.to_string());
                            }
                        }
                        error.to_string()
                    })
                })
            })
        };
        let gauges = session::Gauges {
            held: self.metrics.sessions.with_label_values(&["held"]),
            relayed: self.metrics.sessions.with_label_values(&["relayed"]),
            passed_through: self.metrics.sessions.with_label_values(&["passed_through"]),
            placed_relayed: self
                .metrics
                .sessions_placed_total
                .with_label_values(&["relayed"]),
            placed_passed_through: self
                .metrics
                .sessions_placed_total
                .with_label_values(&["passed_through"]),
        };
        let (parts, mut body) = request.into_parts();
        let placing = crate::session::hold::GaugeGuard::new(
            &self.metrics.sessions.with_label_values(&["placing"]),
        );
        let first_look = session::first_look(
            &mut body,
            Box::pin(wait),
            self.settings.session_passthrough_window,
            self.sessions.wanted(&uuid),
        )
        .await;
        drop(placing);
        let (wait, read) = match first_look {
            session::FirstLook::Placed { placed, read } => {
                tracing::Span::current().record("backend", &**placed.backend.identity());
                return session::pass_through(placed, parts, body, read, open, &uuid, &gauges)
                    .await;
            }
            session::FirstLook::Refused(refusal) => {
                return forward::status_response(refusal.code, &refusal.message)
            }
            session::FirstLook::ClientEnded { reset } => {
                tracing::info!(reset, "the client ended the session before it was placed");
                return forward::status_response(code::OK, "");
            }
            session::FirstLook::Waiting { wait, read } => (wait, read),
        };
        session::serve(
            session::SessionCall {
                uuid,
                request: Request::from_parts(parts, body),
                read,
                // The tunnel carries whole inner connections: BuildKit's own message limit
                // applies there, whatever limit the router reads routed calls with.
                max_message: self
                    .settings
                    .max_message_size
                    .max(session::tunnel::MAX_MESSAGE),
                gauges,
                directory: Some(self.sessions.clone()),
            },
            wait,
            open,
        )
    }

    /// Holds a Session while the build that names it waits in the queue, until that build is
    /// placed (and binds it). Returns what is left of the bind window for `session::bind`.
    pub(super) async fn wait_for_queued_owner(
        &self,
        admission: &Admission,
        uuid: &str,
    ) -> Result<Duration, (u32, String)> {
        let deadline = Instant::now() + self.settings.session_bind_window;
        loop {
            let arrived = admission.arrivals().notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.registry.lookup(KeyKind::Session, uuid).is_some() {
                return Ok(Duration::ZERO);
            }
            if let Some(mut progress) = admission.queued_session(uuid) {
                if let Progress::Ended { code, message } = settled(&mut progress).await {
                    return Err((code, message.to_string()));
                }
                // Placed: its Solve binds this session right after admission.
                let _ = self
                    .registry
                    .wait_bound(KeyKind::Session, uuid, self.settings.ref_wait)
                    .await;
                return Ok(Duration::ZERO);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(remaining);
            }
            tokio::select! {
                _ = self.registry.wait_bound(KeyKind::Session, uuid, remaining) => return Ok(Duration::ZERO),
                _ = arrived => {}
            }
        }
    }
}
