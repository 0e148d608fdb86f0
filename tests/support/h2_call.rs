//! Raw gRPC calls over an h2 client connection: a request body sent piece by piece (a client
//! that stalls mid-message or vanishes), and the outcome read from trailers.

use std::net::SocketAddr;

use buildkit_router::app::Running;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// An h2 client connection to the router, driven in the background.
pub async fn h2_client(router: &Running) -> h2::client::SendRequest<bytes::Bytes> {
    h2_connect(router.addr).await.0
}

/// An h2 client connection to `addr` and the task that drives it: aborting the task drops the
/// connection without any HTTP/2 goodbye, as a client process that dies.
pub async fn h2_connect(
    addr: SocketAddr,
) -> (h2::client::SendRequest<bytes::Bytes>, JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send.ready().await.expect("ready"), driver)
}

/// Starts a call to `path`; its answer comes through the future.
pub fn start_call(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request = http::Request::post(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    client.send_request(request, false).expect("send request")
}

/// A gRPC message of `len` payload bytes that any request type decodes: one unknown bytes field
/// (number 15), filled with 0x5a.
pub fn padded_message(len: usize) -> Vec<u8> {
    use prost::encoding::{encode_varint, encoded_len_varint};
    // The field's length leaves out its tag and the bytes of the length itself.
    let k = (1..=5)
        .find(|&k| encoded_len_varint((len - 1 - k) as u64) == k)
        .expect("a length that fits");
    let mut out = Vec::with_capacity(5 + len);
    out.push(0);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(15 << 3 | 2);
    encode_varint((len - 1 - k) as u64, &mut out);
    out.resize(5 + len, 0x5a);
    out
}

/// An Info call that declares a `len`-byte message, sends its first KiB and waits: it holds its
/// share of the routing buffer (`--routing-buffer`) until [`StalledCall::finish`].
pub struct StalledCall {
    _client: h2::client::SendRequest<bytes::Bytes>,
    answer: h2::client::ResponseFuture,
    send: h2::SendStream<bytes::Bytes>,
    message: Vec<u8>,
}

impl StalledCall {
    pub const PATH: &str = "/moby.buildkit.v1.Control/Info";

    /// Returns once the router holds the call's share (so calls started next find the room
    /// taken).
    pub async fn start(router: &Running, len: usize) -> Self {
        let held_before = router.metrics.routing_buffer_bytes.get();
        let mut client = h2_client(router).await;
        let message = padded_message(len);
        let (answer, mut send) = start_call(&mut client, Self::PATH);
        send.send_data(message[..1024].to_vec().into(), false)
            .expect("send");
        let held = held_before + (5 + len) as i64;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while router.metrics.routing_buffer_bytes.get() != held {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stalled call never took its share: {} bytes held, {held} expected",
                router.metrics.routing_buffer_bytes.get()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Self {
            _client: client,
            answer,
            send,
            message,
        }
    }

    /// Sends the rest of the message; the call's grpc-status and grpc-message.
    pub async fn finish(mut self) -> (String, String) {
        self.send
            .send_data(self.message[1024..].to_vec().into(), true)
            .expect("send");
        grpc_outcome(self.answer).await
    }
}

/// The grpc-status and grpc-message a call ended with (trailers, or Trailers-Only headers).
pub async fn grpc_outcome(answer: h2::client::ResponseFuture) -> (String, String) {
    let response = answer.await.expect("an answer");
    let (head, mut body) = response.into_parts();
    let status = |h: &http::HeaderMap| h.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    let text = |h: &http::HeaderMap| {
        h.get("grpc-message")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    if let Some(code) = status(&head.headers) {
        return (code, text(&head.headers));
    }
    while let Some(data) = body.data().await {
        let data = data.expect("data");
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.expect("trailers").expect("trailers");
    (status(&trailers).expect("grpc-status"), text(&trailers))
}
