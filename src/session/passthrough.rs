//! Passing a Session through: a Session whose build is placed within
//! `--session-passthrough-window` of its arrival (the usual case: the Solve naming it arrives
//! at the same instant and a backend has room) is forwarded to that backend as it came, byte for
//! byte, like any other call. The inner HTTP/2 connection then runs between the daemon and the
//! build client themselves, and the router does not terminate it: the context upload costs the
//! router one outer HTTP/2 stream in each direction instead of four HTTP/2 codecs and the
//! tunnel's framing (docs/session-relay.md, "Pass-through").
//!
//! Only a session still unplaced when the window ends is answered and held by the router
//! ([`super::hold`]) and relayed once placed ([`super::relay`]). The window stays far below the
//! client's 10 s inner preface timeout, which only the daemon's preface (passed through) or the
//! router's (held) can meet.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use super::held::{solves_done, unavailable_for_session, Open, Placed};
use super::hold::{GaugeGuard, Gauges, Refusal};
use crate::body::{EndHook, RequestBody, ResponseBody, StreamContext, Subject};
use crate::forward;
use crate::grpc::code;

/// Past this many bytes of the client's Session body read while its placement is awaited, the
/// router stops reading until the session is placed or held (it may hold one DATA frame more:
/// up to the listener's largest frame, 256 KiB). The client's side of the inner connection
/// (x/net's server) sends its SETTINGS and a WINDOW_UPDATE first, under 100 bytes.
const READ_LIMIT: usize = 64 * 1024;

/// What became of a Session during the pass-through window.
pub enum FirstLook<W> {
    /// Placed: pass it through. `read` is what was read of the client's body meanwhile.
    Placed { placed: Placed, read: Bytes },
    /// Its placement failed: the client gets this status.
    Refused(Refusal),
    /// The client ended its Session (half-close, reset or loss) before it was placed: nothing
    /// reached a daemon.
    ClientEnded { reset: bool },
    /// Still unplaced when the window ended, or its inner client is wanted (`held_wanted`):
    /// hold it, and keep waiting on `wait`.
    Waiting { wait: W, read: Bytes },
}

/// Waits up to `window` for `wait` (the session's placement), reading the client's body
/// meanwhile so that its end is seen. Ends early, for the session to be held, when
/// `held_wanted` resolves: the router needs the session's inner client itself (the content key
/// reads the Dockerfile through it before placing the build), which only a held session has.
pub async fn first_look<W>(
    body: &mut Incoming,
    mut wait: Pin<Box<W>>,
    window: Duration,
    held_wanted: impl Future<Output = ()>,
) -> FirstLook<Pin<Box<W>>>
where
    W: Future<Output = Result<Placed, Refusal>> + ?Sized,
{
    if window.is_zero() {
        // No window: every session is held, even one whose Solve was already placed.
        return FirstLook::Waiting {
            wait,
            read: Bytes::new(),
        };
    }
    let mut read = BytesMut::new();
    let window_end = tokio::time::sleep(window);
    tokio::pin!(window_end, held_wanted);
    loop {
        tokio::select! {
            biased;
            placed = wait.as_mut() => {
                return match placed {
                    Ok(placed) => FirstLook::Placed { placed, read: read.freeze() },
                    Err(refusal) => FirstLook::Refused(refusal),
                };
            }
            frame = body.frame(), if read.len() < READ_LIMIT => match frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        read.extend_from_slice(data);
                    }
                    if body.is_end_stream() {
                        return FirstLook::ClientEnded { reset: false };
                    }
                }
                Some(Err(error)) => {
                    debug!(%error, "the client's Session stream failed before it was placed");
                    return FirstLook::ClientEnded { reset: true };
                }
                None => return FirstLook::ClientEnded { reset: false },
            },
            () = &mut window_end => return FirstLook::Waiting { wait, read: read.freeze() },
            () = &mut held_wanted => {
                debug!("the session's inner client is wanted: holding it");
                return FirstLook::Waiting { wait, read: read.freeze() };
            }
        }
    }
}

/// Forwards the client's Session to the backend it was placed on, as it came (`read` first,
/// then the rest of `body`), and the backend's answer back; the end of the client's side waits
/// for the Solves naming the session, as in the relay ([`super::held::SOLVE_END_GRACE`]).
///
/// Errors: a backend that cannot take the call gives the client UNAVAILABLE naming the backend
/// and the session; a backend lost mid-session, UNAVAILABLE naming both (as any call).
pub async fn pass_through(
    placed: Placed,
    parts: http::request::Parts,
    body: Incoming,
    read: Bytes,
    open: Open,
    uuid: &str,
    gauges: &Gauges,
) -> Response<ResponseBody> {
    gauges.placed_passed_through.inc();
    let counted = GaugeGuard::new(&gauges.passed_through);
    let Placed { backend, keep } = placed;
    // The pin lives until both directions ended: the client's end (held by the gate) and the
    // answer (the hook below), whichever is last.
    let keep = keep.map(Arc::new);
    let mut body = RequestBody::prefixed(read, body);
    if let Some(keep) = &keep {
        body = body.ending_after(solves_done(keep.clone()));
    }
    info!(backend = %backend.identity(), "session passed through to its backend");
    match open(backend.clone(), parts, body).await {
        Ok(response) => {
            let context = StreamContext {
                backend: backend.identity().clone(),
                build_ref: Some(uuid.into()),
                subject: Subject::Session,
                health: Some(backend.clone()),
            };
            forward::relay(response, context).map(|body| {
                body.with_hook(EndHook::new(move |_| {
                    drop(keep);
                    drop(counted);
                }))
            })
        }
        Err(error) => {
            warn!(%error, "cannot open the session on its backend");
            forward::status_response(
                code::UNAVAILABLE,
                &unavailable_for_session(&backend.label(), uuid, error),
            )
        }
    }
}
