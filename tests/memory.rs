//! Resident memory of the router per idle held Session and per build in flight, measured on
//! the real router binary (a separate process) with the test suite's fake daemon and clients.
//! Ignored: figures for docs/performance.md, run by hand, never a timed assertion in CI:
//!
//! ```text
//! cargo build --release --bin buildkit-router
//! BUILDKIT_ROUTER_BIN=target/release/buildkit-router \
//!     cargo test --test memory -- --ignored --nocapture
//! ```
//!
//! Each client has its own HTTP/2 connection, as separate buildctl processes would, so a
//! figure includes that connection's share. Issue 12's budget: at most 64 KiB per idle session.
//!
//! 1. **Idle held sessions:** [`N`] Sessions the router holds (no Solve names them).
//! 2. **Builds in flight:** [`N`] whole builds at once, each with its Session passed through
//!    (placed at once; `BUILDKIT_ROUTER_SESSION_PASSTHROUGH_WINDOW=0s` in the environment:
//!    relayed) to the fake daemon, its Solve, Status and LLBBridge calls running, and the daemon holding the
//!    build after it pulled the [`CONTEXT`] (`DaemonOpts::hold_builds`). They start in waves
//!    of [`WAVE`], so the figure is what a build costs while it runs, not the allocator's
//!    memory of N uploads at the same instant.
//!
//! Each phase is measured against the router's resident size after a warm-up of the same kind
//! that came and went (so first-use allocations are not counted per session or build), and each
//! phase's clients then vanish at once (their runtime is dropped, closing every connection):
//! the router must end all their sessions and builds, which is checked too.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use support::client::{spawn_build, vanishing_runtime, BuildOpts};
use support::fake_daemon::FakeDaemon;
use support::real::RouterProcess;

/// Sessions, then builds, held at once.
const N: usize = 200;

/// Warm-up sessions or builds before each phase.
const WARM_UP: usize = 10;

/// Build context each build of phase 2 uploads before the daemon holds it.
const CONTEXT: usize = 1 << 20;

/// Builds of phase 2 started together (each wave is held by the daemon before the next).
const WAVE: usize = 10;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// The router's figures, from its `/metrics`.
struct Gauges {
    held: usize,
    relayed: usize,
    passed_through: usize,
    builds: usize,
    connections: usize,
}

impl Gauges {
    fn read(router: &RouterProcess) -> Gauges {
        let metrics = router.admin_get("/metrics").unwrap_or_default();
        let sum = |series: &str| -> usize {
            metrics
                .lines()
                .filter(|l| l.starts_with(series))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map(|v| v as usize)
                .sum()
        };
        Gauges {
            held: sum("buildkit_router_sessions{phase=\"held\"}"),
            relayed: sum("buildkit_router_sessions{phase=\"relayed\"}"),
            passed_through: sum("buildkit_router_sessions{phase=\"passed_through\"}"),
            builds: sum("buildkit_router_builds_active{"),
            connections: sum("buildkit_router_connections_active "),
        }
    }

    fn sessions(&self) -> usize {
        self.held + self.relayed + self.passed_through
    }

    fn nothing_left(&self) -> bool {
        self.sessions() == 0 && self.builds == 0 && self.connections == 0
    }
}

/// Polls `done` until it holds; panics after 2 minutes with what is still there.
async fn until(router: &RouterProcess, what: &str, mut done: impl FnMut(&Gauges) -> bool) {
    eprintln!("waiting: {what}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let gauges = Gauges::read(router);
        if done(&gauges) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {what} (held {}, relayed {}, builds {}, connections {})",
            gauges.held,
            gauges.relayed,
            gauges.builds,
            gauges.connections
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RSS after the process settles (allocator caches, lazily started tasks).
async fn settled_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_kib(pid)
}

/// `n` clients on `rt`, each on its own connection, each running one build with `opts`.
fn start_builds(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    n: usize,
    opts: impl Fn() -> BuildOpts,
) {
    for _ in 0..n {
        spawn_build(rt, addr, opts());
    }
}

/// A build whose Session the router holds: its other calls would start after an hour.
fn idle_session() -> BuildOpts {
    let mut opts = BuildOpts::buildctl();
    opts.calls_after = Some(Duration::from_secs(3600));
    opts
}

/// A whole build, which the fake daemon holds once the context arrived.
fn build_in_flight() -> BuildOpts {
    let mut opts = BuildOpts::buildctl();
    opts.context_size = CONTEXT;
    opts
}

/// Drops every client on `rt` at once, then waits until the router ended everything of theirs.
async fn vanish(router: &RouterProcess, daemon: &FakeDaemon, rt: tokio::runtime::Runtime) {
    rt.shutdown_background();
    until(
        router,
        "every session, build and connection of the vanished clients ended",
        Gauges::nothing_left,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(30), daemon.wait_none_held())
        .await
        .expect("the daemon saw every held build cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/performance.md; run by hand"]
async fn resident_memory_per_idle_session_and_per_build_in_flight() {
    let daemon = FakeDaemon::start_holding("bk0").await;
    let url = daemon.url();
    let router = tokio::task::spawn_blocking(move || {
        RouterProcess::start_urls(
            &[url],
            &[
                "--session-bind-window=1h".to_owned(),
                // Every build of phase 2 runs at once: none waits in the queue.
                format!("--max-builds-per-backend={}", 2 * N),
                "--log=warn".to_owned(),
            ],
            1,
        )
    })
    .await
    .expect("router starts");
    let pid = router.pid();
    let addr = router.addr;

    // Phase 1: idle held sessions.
    let warm = vanishing_runtime();
    start_builds(&warm, addr, WARM_UP, idle_session);
    until(&router, "warm-up sessions open", |g| {
        g.sessions() >= WARM_UP
    })
    .await;
    vanish(&router, &daemon, warm).await;
    let base = settled_rss(pid).await;

    let held_rt = vanishing_runtime();
    start_builds(&held_rt, addr, N, idle_session);
    until(&router, "every session open", |g| g.sessions() >= N).await;
    let relayed_idle = Gauges::read(&router).relayed;
    let held = settled_rss(pid).await;
    let per_session = held.saturating_sub(base) as f64 / N as f64;
    eprintln!(
        "router RSS: {base} KiB after warm-up, {held} KiB with {N} idle sessions \
         ({relayed_idle} of them relayed): {per_session:.1} KiB per idle session"
    );
    vanish(&router, &daemon, held_rt).await;
    let after_sessions = settled_rss(pid).await;
    eprintln!("router RSS: {after_sessions} KiB once those clients vanished");

    // Phase 2: builds in flight, held by the daemon after their context arrived.
    let warm = vanishing_runtime();
    start_builds(&warm, addr, WARM_UP, build_in_flight);
    tokio::time::timeout(Duration::from_secs(120), daemon.wait_held(WARM_UP as u64))
        .await
        .expect("warm-up builds held by the daemon");
    vanish(&router, &daemon, warm).await;
    let base = settled_rss(pid).await;

    // In waves: a build holds a context upload's unforwarded bytes only while it uploads,
    // so all N uploading at once would measure the allocator's memory of that peak.
    let builds_rt = vanishing_runtime();
    for wave in (WAVE..=N).step_by(WAVE) {
        start_builds(&builds_rt, addr, WAVE, build_in_flight);
        tokio::time::timeout(Duration::from_secs(120), daemon.wait_held(wave as u64))
            .await
            .expect("every build held by the daemon after its context");
    }
    until(&router, "every session placed", |g| {
        g.relayed + g.passed_through == N && g.held == 0 && g.builds == N
    })
    .await;
    let passed_through = Gauges::read(&router).passed_through;
    let in_flight = settled_rss(pid).await;
    let per_build = in_flight.saturating_sub(base) as f64 / N as f64;
    eprintln!(
        "router RSS: {base} KiB after warm-up, {in_flight} KiB with {N} builds in flight \
         ({} KiB of context each, pulled, {WAVE} at a time; {passed_through} of their sessions \
         passed through, the others relayed): {per_build:.1} KiB per build in flight",
        CONTEXT >> 10
    );
    vanish(&router, &daemon, builds_rt).await;
    let after_builds = settled_rss(pid).await;
    eprintln!("router RSS: {after_builds} KiB once those clients vanished");

    assert!(
        per_session <= 64.0,
        "an idle held session costs {per_session:.1} KiB (budget 64 KiB)"
    );
}
