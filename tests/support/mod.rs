//! Test support: a faithful fake buildkitd ([`fake_daemon`]) and a client that speaks like
//! buildctl and buildx ([`client`]). Both sides of the Session tunnel are real HTTP/2
//! connections carried in `BytesMessage` payloads ([`tunnel`]). [`tls`] makes throwaway PKI.
//! [`real`] runs the real buildkitd, router binary, buildctl and buildx.
//!
//! Use from an integration test with `mod support;`.
#![forbid(unsafe_code)]
#![allow(dead_code)]

pub mod client;
pub mod dns;
pub mod fake_daemon;
pub mod gate;
pub mod h2_call;
pub mod keda;
pub mod real;
pub mod tls;
pub mod tunnel;

use rand::Rng;

/// The real router, in-process, over fake `daemons` (`tweak` sets flags), once its first list of
/// backends is in. `RUST_LOG=buildkit_router=debug` shows the router's side of a failing test.
pub async fn router_over(
    daemons: &[&fake_daemon::FakeDaemon],
    tweak: impl FnOnce(&mut buildkit_router::config::RunConfig),
) -> buildkit_router::app::Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = buildkit_router::config::RunConfig::for_tests();
    cfg.backends = daemons.iter().map(|d| d.url()).collect();
    tweak(&mut cfg);
    let running = buildkit_router::app::start(cfg)
        .await
        .expect("router starts");
    running.pool.wait_synced().await;
    running
}

/// The largest gRPC message either side of BuildKit accepts.
pub const MAX_MESSAGE: usize = 16 << 20;

/// The fill byte of the `index`th DATA packet of a FileSync or FileSend transfer. Every packet
/// is filled with one byte that changes from packet to packet, so the receiving side can check
/// every byte it got, and its order, in one pass (`pattern_ok`).
pub fn pattern_byte(index: u64) -> u8 {
    (index.wrapping_mul(151).wrapping_add(7) % 251) as u8
}

/// Whether `data` is the `index`th packet of a transfer. Word-wise without early exit, so it
/// vectorises: checking costs the benchmarks next to nothing.
pub fn pattern_ok(index: u64, data: &[u8]) -> bool {
    let b = pattern_byte(index);
    let splat = u64::from_ne_bytes([b; 8]);
    let mut words = data.chunks_exact(8);
    let diff = words.by_ref().fold(0u64, |acc, w| {
        acc | (u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) ^ splat)
    });
    diff == 0 && words.remainder().iter().all(|&x| x == b)
}

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

/// The value of one series (`name{labels}` as exposed) in a Prometheus text exposition.
pub fn metric_value(exposition: &str, series: &str) -> u64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{exposition}"))
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
