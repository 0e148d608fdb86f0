//! Resident memory of the router per idle held Session, measured on
//! the real router binary (a separate process) with the test suite's fake daemon and clients.
//! Ignored: a figure for docs/performance.md, run by hand, never a timed assertion in CI:
//!
//! ```text
//! cargo build --release --bin buildkit-router
//! BUILDKIT_ROUTER_BIN=target/release/buildkit-router \
//!     cargo test --test memory -- --ignored --nocapture
//! ```
//!
//! Each client has its own HTTP/2 connection, as separate buildctl processes would, so a
//! figure includes that connection's share. Issue 12's budget: at most 64 KiB per idle session.
//! (Memory per build in flight is not measured here yet: see docs/performance.md.)
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use support::client::{BuildOpts, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use support::real::RouterProcess;

/// Sessions (and then builds) held at once.
const N: usize = 200;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// The router's gauge `buildkit_router_sessions{phase}`.
fn sessions(router: &RouterProcess, phase: &str) -> usize {
    let metrics = router.admin_get("/metrics").unwrap_or_default();
    let prefix = format!("buildkit_router_sessions{{phase=\"{phase}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as usize)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    eprintln!("waiting: {what}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RSS after the process settles (allocator caches, lazily started tasks).
async fn settled_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_kib(pid)
}

/// A client whose Session the router holds: its other calls would start after an hour. Runs on
/// `rt`: shutting that runtime down closes the client's connection (a tonic channel's
/// connection task outlives an aborted caller).
fn hold_one(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
) -> tokio::task::JoinHandle<()> {
    rt.spawn(async move {
        let client = Client::connect(addr).await.expect("connect");
        let mut opts = BuildOpts::buildctl();
        opts.calls_after = Some(Duration::from_secs(3600));
        client.build(opts).await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/performance.md; run by hand"]
async fn resident_memory_per_idle_held_session() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let url = daemon.url();
    let router = tokio::task::spawn_blocking(move || {
        RouterProcess::start_urls(
            &[url],
            &[
                "--session-bind-window=1h".to_owned(),
                "--log=warn".to_owned(),
            ],
            1,
        )
    })
    .await
    .expect("router starts");
    let pid = router.pid();
    let addr = router.addr;

    // Warm up: a few held sessions come and go, so first-use allocations (runtime, buffers)
    // are not counted per session.
    let clients_rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("client runtime")
    };
    let warm_rt = clients_rt();
    for _ in 0..10 {
        hold_one(&warm_rt, addr);
    }
    until("warm-up sessions open", || {
        sessions(&router, "held") + sessions(&router, "relayed") >= 10
    })
    .await;
    warm_rt.shutdown_background();
    until("warm-up sessions gone", || {
        sessions(&router, "held") + sessions(&router, "relayed") == 0
    })
    .await;
    let base = settled_rss(pid).await;

    // N idle sessions, each held by the router (no Solve names them for an hour).
    let held_rt = clients_rt();
    for _ in 0..N {
        hold_one(&held_rt, addr);
    }
    // Some are placed anyway while they wait (bound by their shared key); idle either way.
    until("every session open", || {
        sessions(&router, "held") + sessions(&router, "relayed") >= N
    })
    .await;
    let relayed_idle = sessions(&router, "relayed");
    let held = settled_rss(pid).await;
    held_rt.shutdown_background();
    let per_session = held.saturating_sub(base) as f64 / N as f64;
    eprintln!(
        "router RSS: {base} KiB after warm-up, {held} KiB with {N} idle sessions \
         ({relayed_idle} of them relayed): {per_session:.1} KiB per idle session"
    );
    assert!(
        per_session <= 64.0,
        "an idle held session costs {per_session:.1} KiB (budget 64 KiB)"
    );
}
