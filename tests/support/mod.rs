//! Test support: a faithful fake buildkitd ([`fake_daemon`]) and a client that speaks like
//! buildctl and buildx ([`client`]). Both sides of the Session tunnel are real HTTP/2
//! connections carried in `BytesMessage` payloads ([`tunnel`]). [`tls`] makes throwaway PKI.
//! [`real`] runs the real buildkitd, router binary, buildctl and buildx.
//!
//! Use from an integration test with `mod support;`.
#![forbid(unsafe_code)]
#![allow(dead_code)]

pub mod client;
pub mod fake_daemon;
pub mod real;
pub mod tls;
pub mod tunnel;

use rand::Rng;

/// The largest gRPC message either side of BuildKit accepts.
pub const MAX_MESSAGE: usize = 16 << 20;

/// A BuildKit identity (`identity.NewID()`): 25 base36 characters, used for build refs and
/// session ids.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..25)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A per-client node id as buildx puts in session shared keys (`app:<node id>`).
pub fn new_node_id() -> String {
    let mut rng = rand::rng();
    format!("{:016x}", rng.random::<u64>())
}

/// GET an admin path of a router (`/status`, `/readyz`, `/metrics`); the body as text.
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header("host", "admin")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("admin request");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}
