//! Hostile and broken clients against the real router: slowloris (preface, header block and TLS
//! handshake never completed), a stream flood past `--max-concurrent-streams`, rapid reset
//! (CVE-2023-44487: HEADERS then RST_STREAM in a loop), a header-list flood, and too many
//! connections from one address. In each, a well-behaved client's build runs during the attack
//! and must succeed. Attackers speak raw HTTP/2 frames over TCP.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use buildkit_router::app::Running;
use support::client::{BuildOpts, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use support::h2_call::{grpc_outcome, h2_client, padded_message, start_call, StalledCall};
use support::router_over;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block of literal fields (new names, not indexed): a gRPC request for `path`.
fn request_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    let mut literal = |name: &str, value: &str| {
        block.push(0x00);
        hpack_len(&mut block, name.len());
        block.extend_from_slice(name.as_bytes());
        hpack_len(&mut block, value.len());
        block.extend_from_slice(value.as_bytes());
    };
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "router"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        literal(name, value);
    }
    block
}

fn hpack_len(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// A connection that sent its preface and an empty SETTINGS.
async fn raw_connection(router: &Running) -> TcpStream {
    let mut tcp = TcpStream::connect(router.addr).await.expect("connect");
    tcp.write_all(PREFACE).await.expect("preface");
    tcp.write_all(&frame(SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    tcp
}

/// Reads frames until the router closes the connection (or `limit` passes); returns
/// (type, stream, error code for RST_STREAM/GOAWAY) of each.
async fn frames_until_closed(tcp: &mut TcpStream, limit: Duration) -> Vec<(u8, u32, u32)> {
    let mut frames = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut header = [0u8; 9];
        loop {
            if tcp.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let stream =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if tcp.read_exact(&mut payload).await.is_err() {
                return;
            }
            let code = match header[3] {
                RST_STREAM if len >= 4 => u32::from_be_bytes(payload[..4].try_into().unwrap()),
                GOAWAY if len >= 8 => u32::from_be_bytes(payload[4..8].try_into().unwrap()),
                _ => 0,
            };
            frames.push((header[3], stream, code));
        }
    })
    .await;
    frames
}

/// Whether the router closed `tcp` (EOF or reset) within `limit`, discarding what it sent.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A well-behaved buildctl-like client builds through the router.
async fn good_build(router: &Running, daemon: &FakeDaemon) {
    let client = Client::connect(router.addr).await.expect("connect");
    let result = client.build(BuildOpts::buildctl()).await;
    assert!(
        result.ok(),
        "a well-behaved client is served: {:#?}",
        result.errors()
    );
    assert!(daemon.counters().served_build(&result.build_ref));
}

/// Slowloris: connections that never finish the HTTP/2 preface, or begin a header block and
/// never finish it, are closed after `--handshake-timeout`; a connection that finished its
/// handshake and is merely idle is not; a client builds meanwhile.
#[tokio::test(start_paused = true)]
async fn slowloris_connections_are_closed_after_the_handshake_timeout() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.handshake_timeout = Duration::from_secs(10);
    })
    .await;
    let mut half_preface = Vec::new();
    let mut open_block = Vec::new();
    for _ in 0..50 {
        let mut tcp = TcpStream::connect(router.addr).await.expect("connect");
        tcp.write_all(&PREFACE[..10]).await.expect("write");
        half_preface.push(tcp);
        let mut tcp = raw_connection(&router).await;
        // HEADERS without END_HEADERS, then nothing: the stream never starts.
        let block = request_block("/moby.buildkit.v1.Control/Solve", &[]);
        tcp.write_all(&frame(HEADERS, 0, 1, &block[..block.len() / 2]))
            .await
            .expect("write");
        open_block.push(tcp);
    }
    let mut idle = raw_connection(&router).await;
    let started = tokio::time::Instant::now();
    good_build(&router, &daemon).await;
    for tcp in half_preface.iter_mut().chain(open_block.iter_mut()) {
        assert!(
            closed_within(tcp, Duration::from_secs(11)).await,
            "a slowloris connection is still open after {:?}",
            started.elapsed()
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(10));
    // An idle connection that finished its handshake stays (pings aside, which come at 60 s).
    assert!(!closed_within(&mut idle, Duration::from_secs(30)).await);
    good_build(&router, &daemon).await;
}

/// A TLS client that connects and never finishes its handshake is closed after the handshake
/// timeout; a TLS client builds meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_never_completed_is_closed_after_the_timeout() {
    let pki = support::tls::TestPki::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server-key.pem");
    std::fs::write(&cert, &pki.server.cert_pem).expect("cert");
    std::fs::write(&key, &pki.server.key_pem).expect("key");
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.tls_cert = Some(cert);
        cfg.tls_key = Some(key);
        cfg.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(router.addr).await.expect("connect");
        // The first bytes of a ClientHello record, then silence.
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .expect("write");
        stalled.push(tcp);
    }
    let client = Client::connect_tls(router.addr, pki.client_config(true, false), "localhost")
        .await
        .expect("TLS connect");
    let result = client.build(BuildOpts::buildctl()).await;
    assert!(result.ok(), "{:#?}", result.errors());
    for tcp in &mut stalled {
        assert!(closed_within(tcp, Duration::from_secs(5)).await);
    }
    // Counted just after the close the attacker saw; nothing signals it.
    let render = || String::from_utf8(router.metrics.render().expect("render")).expect("utf8");
    let want = "buildkit_router_connections_total{transport=\"tls_failed\"} 20";
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !render().contains(want) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let metrics = render();
    assert!(
        metrics.contains(want),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("connections_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A client opening far more streams than `--max-concurrent-streams` on one connection has the
/// excess refused (RST_STREAM REFUSED_STREAM); the streams it may have stay bounded, and a
/// client on another connection builds meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_past_the_limit_is_refused() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| cfg.max_concurrent_streams = 16).await;
    let mut tcp = raw_connection(&router).await;
    // Solve HEADERS without a body: each stream waits for its first message, held open.
    let block = request_block("/moby.buildkit.v1.Control/Solve", &[]);
    let mut flood = Vec::new();
    for i in 0..500u32 {
        flood.extend_from_slice(&frame(HEADERS, END_HEADERS, 2 * i + 1, &block));
    }
    tcp.write_all(&flood).await.expect("flood");
    good_build(&router, &daemon).await;
    let frames = frames_until_closed(&mut tcp, Duration::from_secs(2)).await;
    let refused = frames
        .iter()
        .filter(|(kind, _, code)| *kind == RST_STREAM && *code == REFUSED_STREAM)
        .count();
    let goaway = frames.iter().any(|(kind, _, _)| *kind == GOAWAY);
    assert!(
        refused >= 400 || goaway,
        "streams past the limit are refused ({refused} refused, GOAWAY: {goaway}): {:?}",
        &frames[..frames.len().min(20)]
    );
    good_build(&router, &daemon).await;
}

/// Rapid reset: HEADERS then RST_STREAM, thousands of times on one connection. The router ends
/// the connection with GOAWAY ENHANCE_YOUR_CALM, and a client builds during the attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_enhance_your_calm() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |_| {}).await;
    let mut tcp = raw_connection(&router).await;
    let block = request_block("/moby.buildkit.v1.Control/Solve", &[]);
    let attack = tokio::spawn(async move {
        let mut sent = 0u32;
        for round in 0..100u32 {
            let mut burst = Vec::new();
            for i in 0..100u32 {
                let stream = 2 * (round * 100 + i) + 1;
                burst.extend_from_slice(&frame(HEADERS, END_HEADERS, stream, &block));
                burst.extend_from_slice(&frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
            }
            if tcp.write_all(&burst).await.is_err() {
                break;
            }
            sent += 100;
        }
        let frames = frames_until_closed(&mut tcp, Duration::from_secs(10)).await;
        (sent, frames)
    });
    good_build(&router, &daemon).await;
    let (sent, frames) = attack.await.expect("join");
    let calm = frames
        .iter()
        .any(|(kind, _, code)| *kind == GOAWAY && *code == ENHANCE_YOUR_CALM);
    assert!(
        calm,
        "after {sent} HEADERS+RST pairs the router sent no GOAWAY ENHANCE_YOUR_CALM: {:?}",
        frames.iter().filter(|f| f.0 == GOAWAY).collect::<Vec<_>>()
    );
    good_build(&router, &daemon).await;
}

/// A header list far over `--max-header-list-size` (64 KiB), in one HEADERS and as a
/// CONTINUATION flood: the router refuses it without buffering it, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_list_flood_is_refused_and_the_router_keeps_serving() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |_| {}).await;
    let big = "x".repeat(200 * 1024);
    // One oversized header in HEADERS + CONTINUATION frames of 16 KiB (the default max frame).
    let mut tcp = raw_connection(&router).await;
    let block = request_block("/moby.buildkit.v1.Control/Solve", &[("x-flood", &big)]);
    let mut chunks = block.chunks(16 * 1024).peekable();
    let mut first = true;
    let mut wire = Vec::new();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last { END_HEADERS } else { 0 };
        let kind = if first { HEADERS } else { CONTINUATION };
        wire.extend_from_slice(&frame(
            kind,
            flags | if first { END_STREAM } else { 0 },
            1,
            chunk,
        ));
        first = false;
    }
    let _ = tcp.write_all(&wire).await;
    good_build(&router, &daemon).await;
    let frames = frames_until_closed(&mut tcp, Duration::from_secs(2)).await;
    let refused = frames
        .iter()
        .any(|(kind, stream, _)| (*kind == RST_STREAM && *stream == 1) || *kind == GOAWAY)
        || frames
            .iter()
            .any(|(kind, stream, _)| *kind == HEADERS && *stream == 1);
    assert!(
        refused,
        "the oversized request is answered or refused: {frames:?}"
    );
    // No Solve reached the daemon from it.
    assert_eq!(daemon.counters().calls("Solve"), 1);
    good_build(&router, &daemon).await;
}

/// `--max-connections-per-ip`: past the limit, new connections from the address are closed at
/// once; when one of them ends, the address is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_ip_limit_are_closed() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| cfg.max_connections_per_ip = 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(raw_connection(&router).await);
    }
    // The router may close it before our preface is even written (a broken pipe here is
    // the refusal too).
    let mut extra = TcpStream::connect(router.addr).await.expect("connect");
    let _ = extra.write_all(PREFACE).await;
    let _ = extra.write_all(&frame(SETTINGS, 0, 0, &[])).await;
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)).await,
        "the fifth connection from one address is closed"
    );
    let metrics = String::from_utf8(router.metrics.render().expect("render")).expect("utf8");
    assert!(
        metrics.contains("connections_total{transport=\"refused_per_ip\"} 1"),
        "{metrics}"
    );
    drop(held.pop());
    // The freed slot is noticed when the router sees the connection end; nothing signals it.
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let client = Client::connect(router.addr).await.expect("connect");
            if client.list_workers().await.is_ok() {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the address is served again");
    let result = served.build(BuildOpts::buildctl()).await;
    assert!(result.ok(), "{:#?}", result.errors());
}

/// Clients that declare large first messages and stall cannot take the router's memory: such
/// messages share `--routing-buffer`, a message that finds no room within
/// `--routing-buffer-wait` is refused with RESOURCE_EXHAUSTED before anything reaches a daemon,
/// small calls and builds are served all along, and the room comes back when the stalled
/// message is done.
#[tokio::test(start_paused = true)]
async fn large_first_messages_share_the_routing_buffer_and_a_stalled_one_holds_only_its_share() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.routing_buffer = 1 << 20;
        cfg.routing_buffer_wait = Duration::from_secs(30);
    })
    .await;
    let metrics = router.metrics.clone();

    // The staller: declares a 900 KiB Info request, sends 1 KiB of it, and waits.
    let stalled = StalledCall::start(&router, 900 << 10).await;
    let held = 5 + (900 << 10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics.routing_buffer_bytes.get() != held {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled message never took its share: {} bytes",
            metrics.routing_buffer_bytes.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Small messages take no share: a whole build goes through meanwhile.
    good_build(&router, &daemon).await;

    // A second large message finds no room: refused after the wait, and no daemon saw it.
    let infos_before = daemon.counters().calls("Info");
    let mut other = h2_client(&router).await;
    let started = tokio::time::Instant::now();
    let (answer, mut send) = start_call(&mut other, StalledCall::PATH);
    send.send_data(padded_message(600 << 10).into(), true)
        .expect("send");
    let (code, message) = grpc_outcome(answer).await;
    assert_eq!(code, "8", "RESOURCE_EXHAUSTED: {message}");
    assert!(started.elapsed() >= Duration::from_secs(30));
    assert!(
        message.contains("--routing-buffer"),
        "the message names the flag: {message}"
    );
    assert_eq!(metrics.routing_buffer_refusals_total.get(), 1);
    assert_eq!(daemon.counters().calls("Info"), infos_before);

    // The staller finishes: it is answered, and its share comes back.
    let (code, message) = stalled.finish().await;
    assert_eq!(code, "0", "{message}");
    assert_eq!(metrics.routing_buffer_bytes.get(), 0);

    // The refused call, sent again, is served.
    let (answer, mut send) = start_call(&mut other, StalledCall::PATH);
    send.send_data(padded_message(600 << 10).into(), true)
        .expect("send");
    let (code, message) = grpc_outcome(answer).await;
    assert_eq!(code, "0", "{message}");
    assert_eq!(daemon.counters().calls("Info"), infos_before + 2);
}

/// As many messages may wait for room in `--routing-buffer` as it holds what each may hold:
/// its 2 MiB stream window, which HTTP/2 keeps unread, and what the router read of it before it
/// waits (its first frame, up to 256 KiB, and for a Solve up to 64 KiB more), whose window
/// HTTP/2 may give back to the client. A buffer that holds two stream windows but not two of
/// those lets one message wait: the next is refused at once.
#[tokio::test(start_paused = true)]
async fn messages_waiting_for_routing_buffer_room_count_what_the_router_read_of_them() {
    const HELD_PER_WAITER: usize = (2 << 20) + (64 << 10) + (256 << 10);
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.routing_buffer = 2 * HELD_PER_WAITER - 1;
        cfg.routing_buffer_wait = Duration::from_secs(60);
    })
    .await;
    // Holds all but 600 KiB of the buffer.
    let stalled = StalledCall::start(&router, 2 * HELD_PER_WAITER - (600 << 10)).await;

    // Two messages of 1 MiB, each sending its first KiB: one waits, the other is refused.
    let mut client = h2_client(&router).await;
    let waiter = |client: &mut h2::client::SendRequest<bytes::Bytes>| {
        let (answer, mut send) = start_call(client, StalledCall::PATH);
        send.send_data(padded_message(1 << 20)[..1024].to_vec().into(), false)
            .expect("send");
        (tokio::spawn(grpc_outcome(answer)), send)
    };
    let started = tokio::time::Instant::now();
    let (mut first, _first_send) = waiter(&mut client);
    let (mut second, _second_send) = waiter(&mut client);
    let (code, message) = tokio::select! {
        outcome = &mut first => outcome,
        outcome = &mut second => outcome,
    }
    .expect("join");
    assert_eq!(code, "8", "RESOURCE_EXHAUSTED: {message}");
    assert!(message.contains("refused at once"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused after {:?}",
        started.elapsed()
    );
    assert_eq!(daemon.counters().calls("Info"), 0);
    drop(stalled);
}
