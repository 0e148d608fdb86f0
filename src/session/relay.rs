//! Relaying a bound Session: the router opens the Session on the daemon with the client's own
//! request head, serves the daemon's inner HTTP/2 connection as its HTTP/2 server, and relays
//! every inner stream the daemon opens as a new stream to the build client (the connection
//! [`super::held`] keeps): request headers, DATA with end-to-end flow control, trailers and
//! resets both ways. The teardown cases are in docs/session-relay.md.

use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use super::held::{solves_done, unavailable_for_session, Held, Open, Placed};
use super::inner;
use super::tunnel::{ReadEnd, TunnelHandle, TunnelIo, OUT_CHANNEL};
use crate::body::{BackendBody, RequestBody};
use crate::grpc::{code, grpc_status_of, status_trailers};
use crate::pool::Backend;

/// How long the daemon gets to send its inner preface once its Session stream is open.
/// buildkitd sends it at once; this only catches a daemon that answered and then hung.
const DAEMON_PREFACE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the daemon gets to end its Session (trailers) once the client ended its own.
const DAEMON_END_GRACE: Duration = Duration::from_secs(10);

/// How long inner streams still running get to finish when the daemon closed its inner
/// connection gracefully (their last bytes may still be on their way to the client).
const STREAM_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Why the relay loop stopped.
enum Stop {
    /// The client's side of the tunnel ended.
    Client,
    /// The daemon's inner connection closed (cleanly, or with this error).
    Daemon(Option<h2::Error>),
}

/// Relays a held session to the backend it was placed on, until either side ends.
pub(crate) async fn run(
    mut held: Held,
    placed: Placed,
    parts: http::request::Parts,
    open: Open,
    uuid: &str,
    max_message: usize,
) {
    let backend = placed.backend.clone();
    let keep = placed.keep.map(Arc::new);
    // From now on the client's end of the session is held back while a Solve naming it still
    // runs here, so that a cancelled Solve's reset reaches the daemon first.
    if let Some(keep) = &keep {
        held.hold_end_until(solves_done(keep.clone()));
    }
    let label = backend.label();
    let unavailable = |why: &str| {
        Some(status_trailers(
            code::UNAVAILABLE,
            &unavailable_for_session(&label, uuid, why),
        ))
    };

    // Open the Session on the daemon with the client's own head (every
    // x-docker-expose-session-* header unchanged).
    let (daemon_tx, daemon_rx) = mpsc::channel(OUT_CHANNEL);
    let response = match held
        .until(open(
            backend.clone(),
            parts,
            RequestBody::channel(daemon_rx),
        ))
        .await
    {
        None => return held.finish(None).await,
        Some(Err(error)) => {
            warn!(%error, "cannot open the session on its backend");
            return held.finish(unavailable(&error)).await;
        }
        Some(Ok(response)) => response,
    };
    let (head, body) = response.into_parts();
    if grpc_status_of(&head.headers).is_some() {
        // Trailers-Only: the daemon refused the session. Its status is the client's.
        info!(status = ?head.headers.get("grpc-status"), "the backend refused the session");
        return held.finish(Some(head.headers)).await;
    }
    if head.status != http::StatusCode::OK {
        return held
            .finish(unavailable(&format!(
                "it answered the Session with HTTP status {}",
                head.status
            )))
            .await;
    }

    let (io, mut daemon_end) = TunnelIo::new(body, daemon_tx, max_message);
    let mut server = match held
        .until(tokio::time::timeout(
            DAEMON_PREFACE_TIMEOUT,
            inner::server_builder().handshake::<_, Bytes>(io),
        ))
        .await
    {
        None => return held.finish(None).await,
        Some(Err(_)) => {
            return held
                .finish(unavailable(&format!(
                    "no inner HTTP/2 preface within {DAEMON_PREFACE_TIMEOUT:?}"
                )))
                .await
        }
        Some(Ok(Err(error))) => {
            let end = daemon_end.end();
            return held
                .finish(Some(daemon_status(&end, Some(&error), &backend, uuid)))
                .await;
        }
        Some(Ok(Ok(server))) => server,
    };
    info!("session held, now relayed to its backend");

    let client = held.send.clone().expect("held session has its client");
    let mut streams = JoinSet::new();
    let stop = loop {
        tokio::select! {
            accepted = server.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let span = tracing::debug_span!("inner", path = %request.uri().path());
                    streams.spawn(relay_stream(request, respond, client.clone()).instrument(span));
                }
                Some(Err(error)) => break Stop::Daemon(Some(error)),
                None => break Stop::Daemon(None),
            },
            Some(joined) = streams.join_next(), if !streams.is_empty() => {
                if let Err(error) = joined {
                    warn!(%error, "an inner stream relay failed");
                }
            }
            _ = held.ended(), if !held.is_ended() => break Stop::Client,
        }
    };
    drop(client);

    match stop {
        Stop::Client => {
            // Open inner streams are reset toward the daemon (dropping their handles does it).
            streams.shutdown().await;
            if held.client_gone() {
                // Nobody to answer: dropping the daemon's side resets its Session stream.
                info!("the client went away; resetting the session on its backend");
                return;
            }
            if let Some(status) = held.malformed_status() {
                // The client's stream broke: reset the daemon's side, tell the client why.
                drop(server);
                return held.finish(Some(status)).await;
            }
            // The client half-closed. As it would have directly, the daemon sees its inner
            // connection end: a GOAWAY, then the end of our half of the outer stream.
            server.abrupt_shutdown(Reason::NO_ERROR);
            let _ = tokio::time::timeout(DAEMON_END_GRACE, async {
                while let Some(Ok(_)) = server.accept().await {}
            })
            .await;
            drop(server);
            let end = read_to_end(&mut daemon_end, DAEMON_END_GRACE).await;
            let status = match end {
                // The client is done; a daemon that did not say more in time ends OK.
                ReadEnd::Open => {
                    warn!("the backend did not end the session in time after the client did");
                    None
                }
                end => Some(daemon_status(&end, None, &backend, uuid)),
            };
            held.finish(status).await;
        }
        Stop::Daemon(error) => {
            let lost = error.is_some()
                || !matches!(
                    daemon_end.end(),
                    ReadEnd::Open | ReadEnd::Eof | ReadEnd::Trailers(_)
                );
            if lost {
                // Inner streams toward the client are reset (CANCEL) when their relays drop.
                streams.shutdown().await;
            } else {
                // The daemon closed its inner connection (GOAWAY): let running streams finish
                // their way to the client.
                let drained = tokio::time::timeout(STREAM_DRAIN_GRACE, async {
                    while streams.join_next().await.is_some() {}
                })
                .await;
                if drained.is_err() {
                    streams.shutdown().await;
                }
            }
            drop(server);
            let end = read_to_end(&mut daemon_end, DAEMON_END_GRACE).await;
            let status = daemon_status(&end, error.as_ref(), &backend, uuid);
            held.finish(Some(status)).await;
        }
    }
}

/// Reads the rest of the daemon's outer stream (its inner connection is closed: any bytes are
/// discarded) to learn how it ended; `ReadEnd::Open` if it does not end within `grace`.
async fn read_to_end(handle: &mut TunnelHandle<BackendBody>, grace: Duration) -> ReadEnd {
    let end = handle.end();
    if end.is_over() {
        return end;
    }
    let Some(mut rest) = handle.rest().await else {
        return handle.end();
    };
    let read = async {
        loop {
            match rest.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return ReadEnd::Trailers(trailers);
                    }
                }
                Some(Err(error)) => {
                    return match super::tunnel::remote_reset_reason(&error) {
                        Some(reason) => ReadEnd::Reset(reason),
                        None => ReadEnd::Lost(error.to_string()),
                    }
                }
                None => return ReadEnd::Eof,
            }
        }
    };
    tokio::time::timeout(grace, read)
        .await
        .unwrap_or(ReadEnd::Open)
}

/// The status the client gets for how the daemon's side ended.
fn daemon_status(
    end: &ReadEnd,
    error: Option<&h2::Error>,
    backend: &Backend,
    uuid: &str,
) -> HeaderMap {
    let label = backend.label();
    match end {
        ReadEnd::Trailers(trailers) => trailers.clone(),
        ReadEnd::Lost(why) => {
            if let Some(reason) = backend.dead_reason() {
                // The router ended the connection of a backend declared dead.
                return status_trailers(
                    code::UNAVAILABLE,
                    &unavailable_for_session(&label, uuid, reason),
                );
            }
            crate::body::ConnectionHealth::connection_failed(backend, why);
            warn!(error = %why, "lost the backend during the session");
            status_trailers(
                code::UNAVAILABLE,
                &format!(
                    "buildkit-router: lost buildkitd backend {label} during session {uuid}: {why}"
                ),
            )
        }
        ReadEnd::Reset(reason) => {
            let code = match *reason {
                Reason::CANCEL => code::CANCELLED,
                Reason::REFUSED_STREAM => code::UNAVAILABLE,
                _ => code::INTERNAL,
            };
            status_trailers(
                code,
                &format!(
                    "buildkit-router: buildkitd backend {label} reset session {uuid} ({reason})"
                ),
            )
        }
        ReadEnd::Malformed(why) => status_trailers(
            code::INTERNAL,
            &format!("buildkit-router: buildkitd backend {label} broke session {uuid}: {why}"),
        ),
        ReadEnd::Eof | ReadEnd::Open => match error {
            Some(error) => status_trailers(
                code::UNAVAILABLE,
                &format!(
                    "buildkit-router: the inner HTTP/2 connection of session {uuid} with buildkitd backend {label} failed: {error}"
                ),
            ),
            None => status_trailers(
                code::UNKNOWN,
                &format!(
                    "buildkit-router: buildkitd backend {label} ended session {uuid} without a status"
                ),
            ),
        },
    }
}

/// Why one direction of an inner stream stopped early.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// One side reset the stream: reset the other side with the same reason.
    Reset(Reason),
    /// The receiving side reset with NO_ERROR: it has what it needs and wants no more request
    /// body (a server that answered early). The answer must still be relayed.
    StopSending,
    /// A connection failed under the stream: reset whatever is still open (CANCEL).
    Failed(&'static str),
}

impl Cut {
    /// An error from the sending side's stream.
    fn from_sender(error: &h2::Error) -> Cut {
        match error.reason() {
            Some(reason) if error.is_reset() && error.is_remote() => Cut::Reset(reason),
            _ => {
                debug!(%error, "inner stream failed on the sending side");
                Cut::Failed("the sending side failed")
            }
        }
    }

    /// The receiving side reset its stream with `reason`.
    fn from_receiver(reason: Reason) -> Cut {
        if reason == Reason::NO_ERROR {
            Cut::StopSending
        } else {
            Cut::Reset(reason)
        }
    }

    /// An error while sending to the receiving side.
    fn from_send_error(error: &h2::Error) -> Cut {
        match error.reason() {
            Some(reason) if error.is_reset() && error.is_remote() => Cut::from_receiver(reason),
            _ => {
                debug!(%error, "inner stream failed on the receiving side");
                Cut::Failed("the receiving side failed")
            }
        }
    }
}

/// Relays one inner stream the daemon opened: as a new stream to the client, then the client's
/// answer back.
async fn relay_stream(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    client: h2::client::SendRequest<Bytes>,
) {
    let (head, mut from_daemon) = request.into_parts();
    let request_done = from_daemon.is_end_stream();
    let mut client = match client.ready().await {
        Ok(client) => client,
        Err(error) => {
            debug!(%error, "the client's side cannot take a new stream");
            respond.send_reset(Reason::REFUSED_STREAM);
            return;
        }
    };
    let (response, mut to_client) =
        match client.send_request(Request::from_parts(head, ()), request_done) {
            Ok(sent) => sent,
            Err(error) => {
                debug!(%error, "cannot open the stream toward the client");
                respond.send_reset(error.reason().unwrap_or(Reason::REFUSED_STREAM));
                return;
            }
        };
    drop(client);

    let cut = {
        let up = async {
            if request_done {
                Ok(())
            } else {
                pump(&mut from_daemon, &mut to_client).await
            }
        };
        let down = relay_response(response, &mut respond);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                result = &mut up, if !up_done => {
                    up_done = true;
                    match result {
                        // The client answered in full and wants no more of the request: once
                        // the answer is relayed, dropping the daemon's stream handles makes h2
                        // send it RST_STREAM(NO_ERROR) *after* the queued answer and trailers
                        // (an explicit reset would discard them).
                        Ok(()) | Err(Cut::StopSending) => {}
                        Err(cut) => break Some(cut),
                    }
                }
                result = &mut down, if !down_done => {
                    down_done = true;
                    if let Err(cut) = result {
                        break Some(cut);
                    }
                }
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    match cut {
        None => {}
        Some(Cut::Reset(reason)) => {
            debug!(%reason, "inner stream reset; resetting its other side");
            to_client.send_reset(reason);
            respond.send_reset(reason);
        }
        Some(Cut::StopSending | Cut::Failed(_)) => {
            let why = match cut {
                Some(Cut::Failed(why)) => why,
                _ => "the daemon reset with NO_ERROR",
            };
            debug!(why, "inner stream cut; resetting both sides (CANCEL)");
            to_client.send_reset(Reason::CANCEL);
            respond.send_reset(Reason::CANCEL);
        }
    }
}

/// Waits for the client's answer head (or the daemon's reset), sends it to the daemon, and
/// relays the answer's body and trailers.
async fn relay_response(
    response: h2::client::ResponseFuture,
    respond: &mut h2::server::SendResponse<Bytes>,
) -> Result<(), Cut> {
    tokio::pin!(response);
    let answer = poll_fn(|cx| {
        if let Poll::Ready(reset) = respond.poll_reset(cx) {
            return Poll::Ready(Err(reset));
        }
        response.as_mut().poll(cx).map(Ok)
    })
    .await;
    let answer = match answer {
        Err(Ok(reason)) => return Err(Cut::Reset(reason)),
        Err(Err(error)) => {
            debug!(%error, "the daemon's side of an inner stream failed");
            return Err(Cut::Failed("the daemon's side failed"));
        }
        Ok(Err(error)) => return Err(Cut::from_sender(&error)),
        Ok(Ok(answer)) => answer,
    };
    let (head, mut from_client) = answer.into_parts();
    let done = from_client.is_end_stream();
    let mut to_daemon = respond
        .send_response(Response::from_parts(head, ()), done)
        .map_err(|e| Cut::from_send_error(&e))?;
    if done {
        return Ok(());
    }
    pump(&mut from_client, &mut to_daemon).await
}

/// Moves a stream's body and trailers from one inner connection to the other. Window is
/// released on `from` only once `to` has taken the bytes within its peer's window, so a slow
/// reader slows the writer end to end and the router never buffers more than the windows.
async fn pump(from: &mut RecvStream, to: &mut SendStream<Bytes>) -> Result<(), Cut> {
    loop {
        let next = poll_fn(|cx| {
            if let Poll::Ready(reset) = to.poll_reset(cx) {
                return Poll::Ready(Err(reset));
            }
            from.poll_data(cx).map(Ok)
        })
        .await;
        let mut chunk = match next {
            Err(Ok(reason)) => return Err(Cut::from_receiver(reason)),
            Err(Err(error)) => {
                debug!(%error, "the receiving side of an inner stream failed");
                return Err(Cut::Failed("the receiving side failed"));
            }
            Ok(None) => break,
            Ok(Some(Err(error))) => return Err(Cut::from_sender(&error)),
            Ok(Some(Ok(chunk))) => chunk,
        };
        let len = chunk.len();
        let last = from.is_end_stream();
        while !chunk.is_empty() {
            to.reserve_capacity(chunk.len());
            let capacity = loop {
                let capacity = to.capacity();
                if capacity > 0 {
                    break capacity;
                }
                match poll_fn(|cx| to.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(Cut::from_send_error(&error)),
                    // No more capacity will come: the receiver reset or closed the stream.
                    None => {
                        return Err(match poll_fn(|cx| Poll::Ready(to.poll_reset(cx))).await {
                            Poll::Ready(Ok(reason)) => Cut::from_receiver(reason),
                            _ => Cut::Failed("the receiving side closed"),
                        })
                    }
                }
            };
            let part = chunk.split_to(capacity.min(chunk.len()));
            let end = last && chunk.is_empty();
            to.send_data(part, end)
                .map_err(|e| Cut::from_send_error(&e))?;
        }
        // The bytes are on their way: let the sender send more.
        let _ = from.flow_control().release_capacity(len);
        if last {
            if len == 0 {
                to.send_data(Bytes::new(), true)
                    .map_err(|e| Cut::from_send_error(&e))?;
            }
            return Ok(());
        }
    }
    match poll_fn(|cx| from.poll_trailers(cx)).await {
        Ok(Some(trailers)) => to
            .send_trailers(trailers)
            .map_err(|e| Cut::from_send_error(&e)),
        Ok(None) => to
            .send_data(Bytes::new(), true)
            .map_err(|e| Cut::from_send_error(&e)),
        Err(error) => Err(Cut::from_sender(&error)),
    }
}

#[cfg(test)]
mod tests;
