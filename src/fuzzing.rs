//! Entry points that feed arbitrary bytes to each decoder the router runs on input it does not
//! control: the cargo-fuzz targets in `fuzz/` call them, and `tests/fuzz_corpus.rs` replays the
//! committed corpus and every crash ever found through them on each `cargo test`.
//!
//! Each function must return normally for any input: no panic, no allocation out of proportion
//! to the input (libFuzzer runs with an RSS limit), no hang. Where a decoder has an invariant a
//! client would notice if it broke, it is asserted here (a failed assertion is a crash).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Frame;
use tokio::io::{AsyncRead, ReadBuf};

use crate::session::tunnel::{Decoder, Encoder, TunnelIo};
use crate::wire;

/// Largest message the entry points let a decoder accept: BuildKit's 16 MiB, as the router.
const MAX_MESSAGE: usize = 16 * 1024 * 1024 + 64 * 1024;

/// Splits `data` into chunks whose sizes come from its own first bytes, so the fuzzer also
/// explores how input is cut into reads (every decoder here is fed incrementally).
fn chunks(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let Some((&seed, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let mut out = Vec::new();
    let mut left = rest;
    let mut step = usize::from(seed) + 1;
    while !left.is_empty() {
        let n = step.min(left.len());
        out.push(&left[..n]);
        left = &left[n..];
        // A cheap sequence of varied sizes (1..=256) derived from the seed.
        step = (step * 7 + 3) % 256 + 1;
    }
    (out, rest)
}

/// Every protobuf walker in [`wire`]: Solve, Status, history, workers, health.
pub fn wire(data: &[u8]) {
    if let Ok(solve) = wire::decode_solve(data) {
        // The accessors placement uses walk the decoded fields again.
        let _ = solve.session_ids();
        let _ = solve.frontend_attr("platform");
        let _ = solve.image_names().count();
        let _ = solve.registry_cache_refs().count();
    }
    let _ = wire::decode_status_ref(data);
    let _ = wire::decode_history_event(data);
    let _ = wire::decode_history_request(data);
    let _ = wire::decode_update_history_ref(data);
    if let Ok(platforms) = wire::decode_worker_platforms(data) {
        for p in &platforms {
            let _ = crate::placement::normalize_platform(p);
        }
    }
    let _ = wire::decode_health_status(data);
}

/// gRPC length-prefixed framing: the frame header parser and the message splitter, fed in
/// chunks. Invariant: the messages it yields are exactly the input's prefix, in order.
pub fn grpc_framing(data: &[u8]) {
    let (chunks, whole) = chunks(data);
    let _ = wire::parse_frame_header(whole, MAX_MESSAGE);
    let mut splitter = wire::MessageSplitter::default();
    let mut out = Vec::new();
    'feed: for chunk in chunks {
        splitter.push(chunk);
        loop {
            match splitter.next_message(1 << 20) {
                Ok(Some(message)) => out.extend_from_slice(&message),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    assert!(
        whole.starts_with(&out),
        "the splitter yielded bytes that are not the input's prefix"
    );
}

/// Polls a future that never waits (its I/O is in memory) to completion.
fn run_ready<T>(mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> T {
    let mut cx = Context::from_waker(Waker::noop());
    // Each poll makes progress on in-memory input; the bound only guards against a livelock.
    for _ in 0..1_000_000 {
        if let Poll::Ready(out) = poll(&mut cx) {
            return out;
        }
    }
    panic!("an in-memory read made no progress");
}

/// A reader that hands out the given chunks, one per read, then EOF.
struct ChunkReader<'a> {
    chunks: std::vec::IntoIter<&'a [u8]>,
    current: &'a [u8],
}

impl AsyncRead for ChunkReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.current.is_empty() {
            self.current = self.chunks.next().unwrap_or_default();
        }
        let n = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current[..n]);
        self.current = &self.current[n..];
        Poll::Ready(Ok(()))
    }
}

/// The `:authority` repair over a client's HTTP/2 byte stream, read in chunks. Invariants: the
/// output has exactly the input's length (the repair is in place, at the same length, so the
/// HPACK state stays in step), and repairing a HEADERS payload twice changes nothing more.
pub fn authority(data: &[u8]) {
    use crate::listener::authority::{repair_headers_payload, AuthorityFix};
    let (chunks, whole) = chunks(data);
    let mut fix = AuthorityFix::new(ChunkReader {
        chunks: chunks.into_iter(),
        current: &[],
    });
    let mut out = Vec::with_capacity(whole.len());
    let mut buf = [0u8; 4096];
    loop {
        let n = run_ready(|cx| {
            let mut read = ReadBuf::new(&mut buf);
            Pin::new(&mut fix)
                .poll_read(cx, &mut read)
                .map(|r| r.map(|()| read.filled().len()))
        })
        .expect("in-memory reads do not fail");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        assert!(out.len() <= whole.len(), "the repair added bytes");
    }
    assert_eq!(
        out.len(),
        whole.len(),
        "the repair changed the stream's length"
    );

    if let Some((&flags, payload)) = whole.split_first() {
        let mut once = payload.to_vec();
        repair_headers_payload(flags, &mut once);
        assert_eq!(once.len(), payload.len());
        let mut twice = once.clone();
        repair_headers_payload(flags, &mut twice);
        assert_eq!(once, twice, "a repaired header block was repaired again");
    }
}

/// The Session stream's framing (`BytesMessage`s carrying the inner HTTP/2 connection), fed in
/// chunks, and the encoder: whatever the encoder frames, the decoder gives back unchanged.
pub fn session_tunnel(data: &[u8]) {
    let (chunks, whole) = chunks(data);
    let mut decoder = Decoder::new(1 << 20);
    'feed: for chunk in chunks {
        let mut chunk = Bytes::copy_from_slice(chunk);
        loop {
            match decoder.next(&mut chunk) {
                Ok(Some(_payload)) => {}
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    let _ = decoder.finish();

    let framed = Encoder::frame(whole);
    let mut decoder = Decoder::new(MAX_MESSAGE);
    let mut back = Vec::with_capacity(whole.len());
    let mut framed = framed;
    while let Some(payload) = decoder.next(&mut framed).expect("our own framing decodes") {
        back.extend_from_slice(&payload);
    }
    decoder
        .finish()
        .expect("our own framing ends between messages");
    assert_eq!(back, whole, "a framed payload did not decode to itself");
}

/// The relay's inner HTTP/2 server, as the daemon side of a Session reaches it: `data` (cut
/// into chunks) is the inner connection a daemon would send, framed into the Session stream's
/// messages and read through [`TunnelIo`] by h2. Every stream it opens is answered and its
/// request read to the end, until the connection ends.
pub fn session_inner_h2(data: &[u8]) {
    let (chunks, _) = chunks(data);
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Encoder::frame(c))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async move {
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(crate::session::tunnel::OUT_CHANNEL);
        // What the router writes back toward the daemon is discarded.
        let drain = tokio::spawn(async move { while out_rx.recv().await.is_some() {} });
        let (io, _handle) = TunnelIo::new(body, out_tx, MAX_MESSAGE);
        let serve = async {
            let Ok(mut conn) = crate::session::inner::server_builder()
                .handshake::<_, Bytes>(io)
                .await
            else {
                return;
            };
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                let mut body = request.into_body();
                let _ = respond.send_response(http::Response::new(()), true);
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
            }
        };
        // The input's end ends the inner connection: nothing here waits on a timer.
        serve.await;
        drain.abort();
    });
}

/// EndpointSlices from the Kubernetes API (JSON, as the watcher receives them), through the
/// whole slice-set logic; and the discovery flags (`--dns`, `--kubernetes-port`, `--backend`).
pub fn endpoint_slices(data: &[u8]) {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    let port = match selector % 4 {
        0 => "",
        1 => "buildkit",
        2 => "1234",
        _ => "grpc",
    };
    let slices: Vec<EndpointSlice> = match serde_json::from_slice(json) {
        Ok(slices) => slices,
        Err(_) => match serde_json::from_slice::<EndpointSlice>(json) {
            Ok(slice) => vec![slice],
            Err(_) => return,
        },
    };
    for spec in crate::discovery::backends_from_slices(port, slices) {
        // A backend's address must be printable and usable as a URI authority, or a clear
        // error; never a panic.
        let _ = spec.address.to_string();
        let _ = crate::pool::BackendAddress::tcp(spec.address.host.clone(), spec.address.port);
    }
}

/// The discovery and backend flags a user or a manifest passes: `--dns NAME:PORT`,
/// `--kubernetes-port`, and `--backend tcp://...` (without a query, which would read files).
pub fn discovery_flags(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<crate::discovery::DnsTarget>();
    let _ = text.parse::<crate::discovery::PortSelector>();
    let _ = crate::duration::parse_duration(text);
    let url = text.split('?').next().unwrap_or_default();
    let _ = crate::tls::parse_backend_url(url, &crate::tls::BackendTlsFiles::default());
}
