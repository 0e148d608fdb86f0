//! Bad input gets a clear error and loses nothing: garbage on the wire, oversized or compressed
//! messages, unknown methods, and clients that vanish mid-build. Every test ends with a normal
//! build through the same router to show it kept serving.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use buildkit_router::app::{self, Running};
use buildkit_router::config::RunConfig;
use buildkit_router::proto::control as pb;
use prost::Message;
use support::client::{raw_write, spawn_build, vanishing_runtime, BuildOpts, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

async fn router_over(daemon: &FakeDaemon, tweak: impl FnOnce(&mut RunConfig)) -> Running {
    let mut cfg = RunConfig::for_tests();
    cfg.backends = vec![daemon.url()];
    tweak(&mut cfg);
    let running = app::start(cfg).await.expect("router starts");
    running.pool.wait_synced().await;
    running
}

async fn still_serves(router: &Running) {
    let client = Client::connect(router.addr).await.expect("connect");
    let result = client.build(BuildOpts::buildctl()).await;
    assert!(
        result.ok(),
        "the router still serves builds: {:#?}",
        result.errors()
    );
}

/// Sends one unary call with a hand-made body (prefix included) and returns the status.
async fn raw_unary(
    addr: std::net::SocketAddr,
    path: &str,
    body: Vec<u8>,
    extra: &[(&str, &str)],
) -> (u32, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut request = http::Request::post(format!("http://router{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        request = request.header(*k, *v);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or(parts.headers);
    let code = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(99);
    let message = trailers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (code, message)
}

fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_http1_on_the_client_port_close_that_connection_only() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&daemon, |_| {}).await;
    raw_write(
        router.addr,
        b"\x00\x01\x02 this is not HTTP/2 at all \xff\xfe",
    )
    .await
    .expect("write");
    // An HTTP/1.1 request gets no HTTP/1.1 answer: the port speaks HTTP/2 only.
    let mut http1 = tokio::net::TcpStream::connect(router.addr)
        .await
        .expect("connect");
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), http1.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "no HTTP/1.1 success on the gRPC port"
    );
    // A valid preface followed by a malformed frame.
    let mut bad = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad.extend_from_slice(&[0, 0, 4, 0x4, 0, 0, 0, 0, 7]); // SETTINGS with a 4-byte payload: invalid
    raw_write(router.addr, &bad).await.expect("write");
    still_serves(&router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_solve_gets_resource_exhausted_naming_the_limit() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&daemon, |cfg| cfg.max_message_size = 4096).await;
    let mut solve = pb::SolveRequest {
        r#ref: support::new_id(),
        ..Default::default()
    };
    solve
        .frontend_attrs
        .insert("build-arg:HUGE".into(), "x".repeat(10_000));
    let (code, message) = raw_unary(
        router.addr,
        "/moby.buildkit.v1.Control/Solve",
        framed(0, &solve.encode_to_vec()),
        &[],
    )
    .await;
    assert_eq!(code, Code::ResourceExhausted as u32, "{message}");
    assert!(message.contains("4096"), "names the limit: {message}");
    assert_eq!(
        daemon.counters().calls("Solve"),
        0,
        "nothing reached the daemon"
    );
    still_serves(&router).await;
}

/// A Solve the router refuses itself ends the rest of its build at once. buildctl's Status
/// waits for the Solve's ref (up to `--ref-wait`, 5 s), and after a failed Solve buildctl waits up
/// to 5 s more for the Status to go quiet: a refused build took 5-8 s to exit. Now its Status
/// ends with OK (buildctl reports the Solve's own error) and its gateway calls get the refusal.
#[tokio::test(start_paused = true)]
async fn a_refused_solve_ends_its_builds_status_and_gateway_calls_at_once() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&daemon, |cfg| cfg.max_message_size = 4096).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let mut opts = BuildOpts::buildctl();
    opts.frontend_attrs
        .insert("build-arg:HUGE".into(), "x".repeat(10_000));
    let started = tokio::time::Instant::now();
    let result = client.build(opts).await;
    let took = started.elapsed();
    assert_eq!(
        result.solve.code,
        Code::ResourceExhausted,
        "{:?}",
        result.solve
    );
    assert_eq!(result.status.code, Code::Ok, "{:?}", result.status);
    assert_eq!(result.status_messages, 0);
    assert_eq!(
        result.ping.code,
        Code::ResourceExhausted,
        "{:?}",
        result.ping
    );
    assert_eq!(
        result.ping.message, result.solve.message,
        "the Solve's own reason"
    );
    // Its Status and Ping reached the router before the refusal: they end at once, without
    // the grace a later call (a retry's) gets.
    assert!(
        took < Duration::from_millis(250),
        "the build took {took:?} to end"
    );
    for call in ["Solve", "Status", "Ping"] {
        assert_eq!(
            daemon.counters().calls(call),
            0,
            "{call} reached the daemon"
        );
    }

    let metrics = router.metrics.registry.gather();
    let refused = metrics
        .iter()
        .find(|m| m.name() == "buildkit_router_builds_refused_total")
        .expect("builds_refused_total");
    let counted: Vec<(String, f64)> = refused
        .get_metric()
        .iter()
        .map(|m| {
            (
                m.get_label()[0].value().to_owned(),
                m.get_counter().get_value(),
            )
        })
        .collect();
    assert!(
        counted.contains(&("RESOURCE_EXHAUSTED".to_owned(), 1.0)),
        "{counted:?}"
    );
    assert_eq!(
        counted.iter().map(|(_, n)| n).sum::<f64>(),
        1.0,
        "{counted:?}"
    );

    // The same request again, smaller, with the same ref (a client retrying), on the same
    // connection and then on a new one (a re-run job): the refusal no longer speaks for the
    // build, whose Status shows the daemon's progress.
    let fresh = Client::connect(router.addr).await.expect("connect");
    for client in [&client, &fresh] {
        let mut retry = BuildOpts::buildctl();
        retry.build_ref = result.build_ref.clone();
        let again = client.build(retry).await;
        assert!(again.ok(), "{:#?}", again.errors());
        assert!(again.status_messages > 0, "the retried build's progress");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_truncated_requests_get_clear_errors() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&daemon, |_| {}).await;
    let status = pb::StatusRequest {
        r#ref: support::new_id(),
    }
    .encode_to_vec();
    let (code, message) = raw_unary(
        router.addr,
        "/moby.buildkit.v1.Control/Status",
        framed(1, &status),
        &[("grpc-encoding", "gzip")],
    )
    .await;
    assert_eq!(code, Code::Unimplemented as u32, "{message}");
    assert!(message.contains("compressed"), "{message}");
    // A prefix announcing 100 bytes, then the stream ends after 3.
    let mut truncated = vec![0, 0, 0, 0, 100];
    truncated.extend_from_slice(b"abc");
    let (code, message) = raw_unary(
        router.addr,
        "/moby.buildkit.v1.Control/Solve",
        truncated,
        &[],
    )
    .await;
    assert_eq!(code, Code::InvalidArgument as u32, "{message}");
    assert!(
        message.contains("ended before its first gRPC message"),
        "{message}"
    );
    // A message flag that is neither 0 nor 1.
    let (code, message) = raw_unary(
        router.addr,
        "/moby.buildkit.v1.Control/Status",
        framed(7, &status),
        &[],
    )
    .await;
    assert_eq!(code, Code::InvalidArgument as u32, "{message}");
    still_serves(&router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_are_forwarded_untouched() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&daemon, |_| {}).await;
    let (code, _) = raw_unary(
        router.addr,
        "/moby.buildkit.v1.Control/SomethingNew",
        framed(0, b""),
        &[],
    )
    .await;
    // The daemon, not the router, answers: tonic's own UNIMPLEMENTED for an unknown method.
    assert_eq!(code, Code::Unimplemented as u32);
    let (code, _) = raw_unary(router.addr, "/no.such.Service/Call", framed(0, b""), &[]).await;
    assert_eq!(code, Code::Unimplemented as u32);
    still_serves(&router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_build_cancels_it_on_the_daemon() {
    let daemon = FakeDaemon::start(
        "bk0",
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&daemon, |_| {}).await;
    let addr = router.addr;
    let opts = BuildOpts::buildctl();
    let build_ref = opts.build_ref.clone();
    let client_runtime = vanishing_runtime();
    spawn_build(&client_runtime, addr, opts);
    daemon.wait_held(1).await;
    client_runtime.shutdown_background();
    daemon
        .wait_until(|k| k.cancelled_refs().contains(&build_ref))
        .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while router
            .pool
            .snapshot()
            .backends
            .iter()
            .any(|b| b.active_builds() > 0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the vanished client's build is no longer counted");
    daemon.release_builds();
    still_serves(&router).await;
}

/// Builds one request by hand, HPACK literals included, as an old buildctl would send it.
fn raw_request_with_authority(authority: &str) -> Vec<u8> {
    fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    let mut block = Vec::new();
    literal(&mut block, ":method", "POST");
    literal(&mut block, ":scheme", "http");
    literal(&mut block, ":path", "/grpc.health.v1.Health/Check");
    literal(&mut block, ":authority", authority);
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "te", "trailers");
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let len = block.len() as u32;
    wire.extend_from_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        1,
        4,
        0,
        0,
        0,
        1,
    ]);
    wire.extend_from_slice(&block);
    wire.extend_from_slice(&[0, 0, 5, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
    wire
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_buildctl_authority_with_a_scheme_is_not_rejected() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&daemon, |_| {}).await;
    for authority in ["tcp://127.0.0.1:1234", "localhost", "127.0.0.1:1234"] {
        let mut stream = tokio::net::TcpStream::connect(router.addr)
            .await
            .expect("connect");
        stream
            .write_all(&raw_request_with_authority(authority))
            .await
            .expect("write");
        // Read frames until stream 1 ends; a rejected request gets RST_STREAM instead.
        let mut seen = Vec::new();
        let mut buf = Vec::new();
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "connection closed before an answer for {authority}");
                buf.extend_from_slice(&chunk[..n]);
                while buf.len() >= 9 {
                    let len = (usize::from(buf[0]) << 16)
                        | (usize::from(buf[1]) << 8)
                        | usize::from(buf[2]);
                    if buf.len() < 9 + len {
                        break;
                    }
                    let (kind, flags, sid) = (
                        buf[3],
                        buf[4],
                        u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]),
                    );
                    buf.drain(..9 + len);
                    if sid == 1 {
                        seen.push(kind);
                        if kind == 3 {
                            return "reset";
                        }
                        if kind == 1 && flags & 1 != 0 {
                            return "answered";
                        }
                    }
                }
            }
        })
        .await
        .expect("an answer");
        assert_eq!(
            outcome, "answered",
            ":authority {authority:?} must not be rejected (frames {seen:?})"
        );
    }
    still_serves(&router).await;
}
