//! Frozen, silent and departing daemons, against fake buildkitd: a daemon that stops answering
//! (SIGSTOP: no reads, no writes, no accepts) is taken out of placement at its first unanswered
//! health check and, once declared dead, every build on it ends with UNAVAILABLE naming the
//! backend, the build and how long it has been silent; a build that is merely silent on a
//! healthy daemon is never cut; the router never pings a daemon; a daemon's GOAWAY drains only
//! that daemon's streams and never reaches the client's connection.
//!
//! Time is paused where the router's health timers matter: the 10 s interval, 2 s timeout and
//! 3 unanswered checks run at their real defaults, and pass as soon as everything waits.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use buildkit_router::app::Running;
use buildkit_router::pool::BackendState;
use support::client::{BuildOpts, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use support::router_over;
use tokio::time::Instant;
use tonic::Code;

fn held() -> DaemonOpts {
    DaemonOpts {
        hold_builds: true,
        ..DaemonOpts::default()
    }
}

/// The router's state of the backend at `url`.
fn state_of(router: &Running, url: &str) -> BackendState {
    router
        .pool
        .snapshot()
        .get(url)
        .map(|b| b.state())
        .expect("backend known")
}

/// Waits (in virtual time) until the backend at `url` is in `state`; panics after `limit`.
async fn wait_state(router: &Running, url: &str, state: BackendState, limit: Duration) {
    tokio::time::timeout(limit, async {
        while state_of(router, url) != state {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{url} did not become {state:?} within {limit:?}"));
}

/// One of two daemons freezes while each runs a build. Its build ends with UNAVAILABLE naming
/// the backend, the build and the silence, within the health interval plus three 2 s checks;
/// the other daemon's build completes; new builds go to the live daemon; after a thaw the
/// frozen daemon rejoins and takes builds again.
#[tokio::test(start_paused = true)]
async fn a_frozen_daemon_ends_its_builds_with_unavailable_and_the_pool_routes_around_it() {
    let d0 = FakeDaemon::start("bk0", held()).await;
    let d1 = FakeDaemon::start("bk1", held()).await;
    let ds = [&d0, &d1];
    // One build per daemon, so each daemon holds exactly one.
    let router = router_over(&ds, |cfg| cfg.placement.max_builds_per_backend = Some(1)).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.build(BuildOpts::buildctl()).await }
    });
    let (_, victim, _) =
        futures_util::future::select_all(ds.iter().map(|d| Box::pin(d.wait_held(1)))).await;
    let survivor = 1 - victim;
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.build(BuildOpts::buildctl()).await }
    });
    ds[survivor].wait_held(1).await;

    let frozen_at = Instant::now();
    ds[victim].freeze();
    let lost = first.await.expect("join");
    let waited = frozen_at.elapsed();
    assert_eq!(lost.solve.code, Code::Unavailable, "{:#?}", lost.solve);
    let message = &lost.solve.message;
    for part in [
        ds[victim].url().as_str(),
        lost.build_ref.as_str(),
        "stopped answering health checks for",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    // Health interval (10 s) + three unanswered checks (2 s each, 200 ms and 400 ms apart).
    assert!(
        waited >= Duration::from_secs(6) && waited <= Duration::from_secs(18),
        "the build ended {waited:?} after the freeze"
    );
    // Its other calls end too: nobody hangs.
    for call in lost.calls() {
        assert!(
            !call.is_ok() || call.method.starts_with("LLBBridge"),
            "{call:?}"
        );
    }
    assert_eq!(
        state_of(&router, &ds[victim].url()),
        BackendState::Unhealthy
    );

    // The live daemon's build is untouched and completes.
    ds[survivor].release_builds();
    let kept = second.await.expect("join");
    assert!(kept.ok(), "{:#?}", kept.errors());

    // The next build goes to the live daemon, at once.
    let next = client.build(BuildOpts::buildctl()).await;
    assert!(next.ok(), "{:#?}", next.errors());
    assert!(ds[survivor].counters().served_build(&next.build_ref));
    assert!(!ds[victim].counters().served_build(&next.build_ref));

    // SIGCONT: it passes a health check within the 2 s probe backoff and takes builds again.
    ds[victim].thaw();
    wait_state(
        &router,
        &ds[victim].url(),
        BackendState::Ready,
        Duration::from_secs(5),
    )
    .await;
    // Thawed, the daemon reads that the router closed the frozen build's connection: to it,
    // the build was cancelled (as buildkitd records a client that went away).
    let lost_ref = lost.build_ref.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        ds[victim].wait_until(|c| c.cancelled_refs().contains(&lost_ref)),
    )
    .await
    .expect("the thawed daemon cancels the build the router ended");
    ds[victim].release_builds();
    // Two concurrent builds at one per daemon: one of them lands on the thawed daemon.
    let (a, b) = tokio::join!(
        client.build(BuildOpts::buildctl()),
        client.build(BuildOpts::buildctl())
    );
    assert!(a.ok() && b.ok(), "{:#?} {:#?}", a.errors(), b.errors());
    assert!(
        [&a, &b]
            .iter()
            .any(|r| ds[victim].counters().served_build(&r.build_ref)),
        "the thawed daemon takes builds again"
    );
    assert!(!ds[victim]
        .counters()
        .completed_refs()
        .contains(&lost.build_ref));
}

/// ListWorkers and Info on a connection whose daemon just froze are answered by the other
/// daemon after one health-check timeout (2 s), not after the seconds its health checks take to
/// declare it dead; with no other daemon, from the last known answer.
#[tokio::test(start_paused = true)]
async fn list_workers_moves_on_from_a_frozen_daemon_after_one_health_check_timeout() {
    let d0 = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let d1 = FakeDaemon::start("bk1", DaemonOpts::default()).await;
    let ds = [&d0, &d1];
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    // (The router asks daemons for their workers itself too: count what this client adds.)
    let asked = |d: &FakeDaemon| d.counters().calls("ListWorkers");
    let before = asked(&d0);
    client.list_workers().await.expect("ListWorkers");
    let first = if asked(&d0) > before { 0 } else { 1 };
    let other = 1 - first;

    // The connection's daemon freezes: the next ListWorkers asks it first, then the other.
    ds[first].freeze();
    let before = asked(ds[other]);
    let started = Instant::now();
    let answer = client
        .list_workers()
        .await
        .expect("answered by the live daemon");
    let waited = started.elapsed();
    assert!(!answer.record.is_empty());
    assert!(asked(ds[other]) > before, "the live daemon answered");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "answered {waited:?} after the call"
    );
    // Info the same way, from the daemon this connection now uses: no wait at all.
    let started = Instant::now();
    client.info().await.expect("Info");
    assert!(started.elapsed() < Duration::from_secs(1));

    // Both frozen: the last known answer, after one timeout per daemon asked.
    ds[other].freeze();
    let started = Instant::now();
    let cached = client.list_workers().await.expect("the last known answer");
    assert_eq!(cached.record.len(), answer.record.len());
    assert!(started.elapsed() < Duration::from_secs(5));
    d0.thaw();
    d1.thaw();
}

/// A build that prints nothing for ten minutes on a daemon that answers its health checks is
/// never cut, and in all that time the router sends the daemon no HTTP/2 PING (buildkitd's
/// keepalive enforcement would answer pings with GOAWAY ENHANCE_YOUR_CALM).
#[tokio::test(start_paused = true)]
async fn a_silent_ten_minute_build_on_a_healthy_daemon_is_never_cut_and_never_pinged() {
    let d0 = FakeDaemon::start(
        "bk0",
        DaemonOpts {
            build_duration: Some(Duration::from_secs(600)),
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&[&d0], |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let started = Instant::now();
    let mut opts = BuildOpts::buildctl();
    opts.drain_timeout = Duration::from_secs(3600);
    let result = client.build(opts).await;
    assert!(result.ok(), "{:#?}", result.errors());
    assert!(started.elapsed() >= Duration::from_secs(600));
    // Idle for a while after the build too (PermitWithoutStream is false in grpc-go).
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(d0.pings_received(), 0, "the router pinged buildkitd");
    assert_eq!(state_of(&router, &d0.url()), BackendState::Ready);
    let again = client.build(BuildOpts::buildctl()).await;
    assert!(again.ok(), "{:#?}", again.errors());
}

/// A daemon shutting down gracefully (GOAWAY, then it lets running calls finish) drains its own
/// build; the client's connection, which also carries a build on another daemon, never sees a
/// GOAWAY or an error, and its next build goes to the other daemon on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemons_goaway_drains_its_builds_and_never_reaches_the_clients_connection() {
    let d0 = FakeDaemon::start("bk0", held()).await;
    let d1 = FakeDaemon::start("bk1", held()).await;
    let router = router_over(&[&d0, &d1], |cfg| {
        cfg.placement.max_builds_per_backend = Some(1)
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.build(BuildOpts::buildctl()).await }
    });
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.build(BuildOpts::buildctl()).await }
    });
    tokio::time::timeout(Duration::from_secs(20), async {
        d0.wait_held(1).await;
        d1.wait_held(1).await;
    })
    .await
    .expect("each daemon holds one build");
    let d0_addr = d0.addr();
    let d0_counters = d0.counters();
    let d0_stopping = tokio::spawn(async move {
        d0.release_builds();
        d0.shutdown().await
    });
    // The daemon stopped listening (its GOAWAY went out with it); nothing signals that.
    tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(d0_addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the daemon stops listening");
    d1.release_builds();
    let (first, second) = (first.await.expect("join"), second.await.expect("join"));
    assert!(first.ok(), "{:#?}", first.errors());
    assert!(second.ok(), "{:#?}", second.errors());
    tokio::time::timeout(Duration::from_secs(10), d0_stopping)
        .await
        .expect("the daemon finished draining")
        .expect("join");
    let on_d0 = [&first, &second]
        .iter()
        .filter(|r| d0_counters.served_build(&r.build_ref))
        .count();
    assert_eq!(on_d0, 1, "one build drained on the departing daemon");

    let next = client.build(BuildOpts::buildctl()).await;
    assert!(next.ok(), "{:#?}", next.errors());
    assert!(d1.counters().served_build(&next.build_ref));
    let metrics = String::from_utf8(router.metrics.render().expect("render")).expect("utf8");
    assert!(
        metrics.contains("buildkit_router_connections_total{transport=\"h2c\"} 1"),
        "the client kept its one connection:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("connections_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
