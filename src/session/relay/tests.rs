//! Inner streams through [`relay_stream`] with raw h2 on both ends (the daemon's inner client,
//! the build client's inner server), for the resets tonic cannot send on demand.

use std::future::poll_fn;
use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, RecvStream};
use http::{Request, Response};
use tokio::sync::mpsc;

use super::relay_stream;
use crate::session::inner::{client_builder, server_builder};

/// A stream the build client's inner server accepted, as its handler sees it.
type Accepted = (Request<RecvStream>, h2::server::SendResponse<Bytes>);

/// The daemon's inner client, connected through the router's relay to a build client whose
/// inner server hands every accepted stream to the test.
struct Tunnel {
    daemon: h2::client::SendRequest<Bytes>,
    client_streams: mpsc::Receiver<Accepted>,
}

async fn tunnel() -> Tunnel {
    let (daemon_io, router_daemon_side) = tokio::io::duplex(1 << 20);
    let (router_client_side, client_io) = tokio::io::duplex(1 << 20);

    // The build client's inner server.
    let (accepted_tx, client_streams) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut server = h2::server::handshake(client_io)
            .await
            .expect("client handshake");
        while let Some(Ok(accepted)) = server.accept().await {
            if accepted_tx.send(accepted).await.is_err() {
                break;
            }
        }
    });
    // The router: inner client toward the build client, inner server toward the daemon.
    let (to_client, connection) = client_builder()
        .handshake::<_, Bytes>(router_client_side)
        .await
        .expect("router's inner client");
    tokio::spawn(connection);
    tokio::spawn(async move {
        let mut server = server_builder()
            .handshake::<_, Bytes>(router_daemon_side)
            .await
            .expect("router's inner server");
        while let Some(Ok((request, respond))) = server.accept().await {
            tokio::spawn(relay_stream(request, respond, to_client.clone()));
        }
    });
    // The daemon's inner client.
    let (daemon, connection) = h2::client::handshake(daemon_io)
        .await
        .expect("daemon handshake");
    tokio::spawn(connection);
    Tunnel {
        daemon,
        client_streams,
    }
}

fn diff_copy() -> Request<()> {
    Request::post("http://session/moby.filesync.v1.FileSync/DiffCopy")
        .header("content-type", "application/grpc")
        .body(())
        .expect("request")
}

/// The reason a stream error carries, if it is a reset.
fn reset_reason(error: &h2::Error) -> Option<Reason> {
    error.is_reset().then(|| error.reason()).flatten()
}

/// The build client's FileSync handler is cancelled mid-answer (buildctl interrupted, its
/// session server stopping): its RST_STREAM(CANCEL) reaches the daemon's call as CANCEL, on
/// both the answer it reads and the request it still sends.
#[tokio::test]
async fn a_client_cancel_mid_answer_reaches_the_daemon_as_cancel() {
    let mut tunnel = tunnel().await;
    let daemon = tunnel.daemon.clone().ready().await.expect("ready");
    let mut daemon = daemon;
    let (response, mut request_body) = daemon.send_request(diff_copy(), false).expect("send");
    request_body
        .send_data(Bytes::from_static(b"\0\0\0\0\x02\x08\x01"), false)
        .expect("request data");

    let (request, mut respond) = tunnel.client_streams.recv().await.expect("relayed");
    assert_eq!(request.uri().path(), "/moby.filesync.v1.FileSync/DiffCopy");
    let mut answer = respond
        .send_response(Response::new(()), false)
        .expect("answer head");
    answer
        .send_data(Bytes::from_static(b"first packet"), false)
        .expect("answer data");

    let (_, mut from_client) = response.await.expect("answer head relayed").into_parts();
    let first = from_client.data().await.expect("data").expect("data ok");
    assert_eq!(&first[..], b"first packet");

    answer.send_reset(Reason::CANCEL);
    let error = from_client
        .data()
        .await
        .expect("an end")
        .expect_err("the answer is reset");
    assert_eq!(reset_reason(&error), Some(Reason::CANCEL), "{error}");
    let reset = tokio::time::timeout(
        Duration::from_secs(5),
        poll_fn(|cx| request_body.poll_reset(cx)),
    )
    .await
    .expect("the daemon's request side learns of the reset")
    .expect("a reset reason");
    assert_eq!(reset, Reason::CANCEL);
}

/// The build client refuses an inner call before answering (its handler gone): the daemon's
/// call fails with that reason, not a hang and not a different code.
#[tokio::test]
async fn a_client_reset_before_any_answer_reaches_the_daemon() {
    let mut tunnel = tunnel().await;
    let mut daemon = tunnel.daemon.clone().ready().await.expect("ready");
    let (response, _request_body) = daemon.send_request(diff_copy(), false).expect("send");
    let (_request, mut respond) = tunnel.client_streams.recv().await.expect("relayed");
    respond.send_reset(Reason::REFUSED_STREAM);
    let error = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("the daemon's call ends")
        .expect_err("the call is reset");
    assert_eq!(
        reset_reason(&error),
        Some(Reason::REFUSED_STREAM),
        "{error}"
    );
}

/// The daemon cancels its own call mid-request: the client's handler sees CANCEL on the
/// request it reads.
#[tokio::test]
async fn a_daemon_cancel_mid_request_reaches_the_client_as_cancel() {
    let mut tunnel = tunnel().await;
    let mut daemon = tunnel.daemon.clone().ready().await.expect("ready");
    let (_response, mut request_body) = daemon.send_request(diff_copy(), false).expect("send");
    request_body
        .send_data(Bytes::from_static(b"some request"), false)
        .expect("request data");
    let (request, _respond) = tunnel.client_streams.recv().await.expect("relayed");
    let mut from_daemon = request.into_body();
    let first = from_daemon.data().await.expect("data").expect("data ok");
    assert_eq!(&first[..], b"some request");
    request_body.send_reset(Reason::CANCEL);
    let error = tokio::time::timeout(Duration::from_secs(5), from_daemon.data())
        .await
        .expect("the client's handler learns of the reset")
        .expect("an end")
        .expect_err("the request is reset");
    assert_eq!(reset_reason(&error), Some(Reason::CANCEL), "{error}");
}
