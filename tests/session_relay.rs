//! The Session tunnel relay end to end: the router terminates the inner HTTP/2 connection (the
//! HTTP/2 client toward the build client, the server toward the daemon) and relays every inner
//! stream. Fake daemons and clients keep BuildKit's real timers: the client's 10 s preface
//! timeout, the daemon's 5 s health checks through the tunnel.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use buildkit_router::app::Running;
use support::client::{spawn_build, vanishing_runtime, BuildOpts, CancelAt, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use support::h2_call::{h2_connect, padded_message};
use support::router_over;
use tonic::Code;

/// How a placed session crosses the router: passed through as it came (placed within
/// `--session-passthrough-window`, the default for a build placed at once), or relayed (held
/// first: the router terminates the inner connection). Each scenario runs both ways.
#[derive(Clone, Copy, Debug)]
enum Path {
    PassedThrough,
    Relayed,
}

const BOTH: [Path; 2] = [Path::PassedThrough, Path::Relayed];

impl Path {
    fn configure(self, cfg: &mut buildkit_router::config::RunConfig) {
        if let Path::Relayed = self {
            cfg.session_passthrough_window = Duration::ZERO;
        }
    }

    /// The `buildkit_router_sessions` phase of such a session once placed.
    fn phase(self) -> &'static str {
        match self {
            Path::PassedThrough => "passed_through",
            Path::Relayed => "relayed",
        }
    }
}

/// `buildkit_router_sessions_placed_total{path}`.
fn placed(router: &Running, path: &str) -> u64 {
    router
        .metrics
        .sessions_placed_total
        .with_label_values(&[path])
        .get()
}

fn sessions(router: &Running, phase: &str) -> i64 {
    router.metrics.sessions.with_label_values(&[phase]).get()
}

/// Polls `f` until it holds (5 ms apart, as the routing tests do), or panics after `limit`.
async fn eventually(what: &str, limit: Duration, f: impl Fn() -> bool) {
    tokio::time::timeout(limit, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {limit:?}"));
}

/// Every session task is gone once its streams ended: nothing held, relayed or passed through.
async fn assert_no_sessions_left(router: &Running) {
    eventually(
        "no session left held, relayed or passed through",
        Duration::from_secs(10),
        || {
            sessions(router, "placing") == 0
                && sessions(router, "held") == 0
                && sessions(router, "relayed") == 0
                && sessions(router, "passed_through") == 0
        },
    )
    .await;
}

/// The build client's 10 s preface timer and the daemon's 5 s health checks are the real ones;
/// the session is held five minutes before any Solve names it. Without the router answering
/// the inner connection itself, the client would give up after 10 s.
#[tokio::test(start_paused = true)]
async fn a_session_held_five_minutes_completes_its_build_with_every_context_byte() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.session_bind_window = Duration::from_secs(3600);
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    let mut opts = BuildOpts::buildctl();
    opts.context_size = 3 << 20;
    opts.calls_after = Some(Duration::from_secs(300));
    let session_id = opts.session_id.clone();
    let build = tokio::spawn({
        let client = client.clone();
        async move { client.build(opts).await }
    });
    // While held, the session is counted as such and has not reached the daemon.
    eventually("the session is held", Duration::from_secs(60), || {
        sessions(&router, "held") == 1
    })
    .await;
    assert!(!daemon.counters().saw_session(&session_id));
    let started = tokio::time::Instant::now();
    let result = build.await.expect("join");
    assert!(started.elapsed() >= Duration::from_secs(290));
    assert!(result.ok(), "{:#?}", result.errors());
    assert!(result.tunnel.preface_received);
    // The context, plus the Dockerfile the frontend read first.
    assert!(result.tunnel.bytes_uploaded >= 3 << 20);
    let info = daemon.counters().session(&session_id).expect("session");
    assert_eq!(
        info.bytes_uploaded, result.tunnel.bytes_uploaded,
        "every byte the client sent reached the daemon"
    );
    assert_eq!(info.corrupt_packets, 0);
    assert!(info.ended, "the daemon saw the session end");
    let metrics = router.metrics.render().expect("render");
    let metrics = String::from_utf8(metrics).expect("utf8");
    assert!(
        metrics.contains("buildkit_router_session_bind_seconds_count{how=\"solve\"} 1"),
        "{metrics}"
    );
    assert_no_sessions_left(&router).await;
}

/// The daemon health-checks the client every 5 s through the tunnel: through the relay, each
/// check is a new inner stream the router opens toward the client.
#[tokio::test(start_paused = true)]
async fn the_daemons_health_checks_cross_the_relay() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        let daemon = FakeDaemon::start_holding("bk0").await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let client = Client::connect(router.addr).await.expect("connect");
        let opts = BuildOpts::buildctl();
        let session_id = opts.session_id.clone();
        let build = tokio::spawn(async move { client.build(opts).await });
        daemon.wait_held(1).await;
        // 30 s of (virtual) build time: six periodic checks on top of the Solve's own.
        tokio::time::timeout(
            Duration::from_secs(60),
            daemon.wait_health_checks(&session_id, 7),
        )
        .await
        .expect("health checks pass through the relay");
        daemon.release_builds();
        let result = build.await.expect("join");
        assert!(result.ok(), "{:#?}", result.errors());
        let info = daemon.counters().session(&session_id).expect("session");
        assert_eq!(info.health_checks_failed, 0);
        assert_no_sessions_left(&router).await;
    }
}

/// A 256 MiB context upload (client to daemon, FileSync) and a 256 MiB export (daemon to client,
/// FileSend) through the relay, every packet's bytes and order checked on arrival: the sizes of
/// a large build context and of a large image exported with `--output type=local`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_cross_the_relay_byte_exact_both_ways() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        const SIZE: usize = 256 << 20;
        let daemon = FakeDaemon::start(
            "bk0",
            DaemonOpts {
                export_size: SIZE,
                ..DaemonOpts::default()
            },
        )
        .await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let client = Client::connect(router.addr).await.expect("connect");
        let mut opts = BuildOpts::buildx();
        opts.context_size = SIZE;
        let session_id = opts.session_id.clone();
        let result = client.build(opts).await;
        assert!(result.ok(), "{:#?}", result.errors());
        // The context, plus the Dockerfile the frontend read first.
        assert!(result.tunnel.bytes_uploaded >= SIZE as u64);
        assert_eq!(result.tunnel.bytes_exported, SIZE as u64);
        assert_eq!(result.tunnel.corrupt_packets, 0, "export bytes intact");
        let info = daemon.counters().session(&session_id).expect("session");
        assert_eq!(info.bytes_uploaded, result.tunnel.bytes_uploaded);
        assert_eq!(info.corrupt_packets, 0, "context bytes intact");
        // Counted once, on the path it took.
        assert_eq!(placed(&router, path.phase()), 1);
        assert_eq!(
            placed(&router, "passed_through") + placed(&router, "relayed"),
            1
        );
        assert_no_sessions_left(&router).await;
    }
}

/// The daemon gives up on an inner call (it drops FileSync mid-upload, as buildkitd does when
/// a context read is cancelled): its RST_STREAM CANCEL reaches the client's FileSync handler
/// through the relay while the session is still open (the build is then held on the daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_reset_from_the_daemon_reaches_the_client() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        let daemon = FakeDaemon::start(
            "bk0",
            DaemonOpts {
                abort_context_after: Some(1 << 20),
                hold_builds: true,
                ..DaemonOpts::default()
            },
        )
        .await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let client = Client::connect(router.addr).await.expect("connect");
        let mut opts = BuildOpts::buildctl();
        opts.context_size = 32 << 20;
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        opts.filesync_cut = Some(cut.clone());
        let build = tokio::spawn(async move { client.build(opts).await });
        tokio::time::timeout(Duration::from_secs(20), daemon.wait_held(1))
            .await
            .expect("the build runs");
        // The session stays open while the build is held: only the relayed reset can cut the
        // client's FileSync answer now.
        tokio::time::timeout(Duration::from_secs(10), cut.notified())
            .await
            .expect("the daemon's RST_STREAM reached the client's FileSync call");
        daemon.release_builds();
        let result = build.await.expect("join");
        assert!(result.ok(), "{:#?}", result.errors());
        assert_eq!(result.tunnel.filesync_resets, 1);
        assert!(
            result.tunnel.bytes_uploaded < 32 << 20,
            "the upload stopped early"
        );
        assert_no_sessions_left(&router).await;
    }
}

/// The client answers an inner call early (its FileSend handler refuses the export while the
/// daemon is still sending), then resets the stream with NO_ERROR: the refusal and its status
/// must reach the daemon before that reset, and the daemon must stop sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_from_the_client_reaches_the_daemon_before_its_reset() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        let daemon = FakeDaemon::start(
            "bk0",
            DaemonOpts {
                export_size: 32 << 20,
                ..DaemonOpts::default()
            },
        )
        .await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let client = Client::connect(router.addr).await.expect("connect");
        let mut opts = BuildOpts::buildx();
        opts.reject_export_after = Some(1 << 20);
        let result = client.build(opts).await;
        assert_eq!(result.solve.code, Code::Unknown, "{:#?}", result.solve);
        assert!(
            result.solve.message.contains("no space left on device"),
            "the daemon got the client's own status: {}",
            result.solve.message
        );
        assert!(result.tunnel.bytes_exported < 32 << 20);
        assert_no_sessions_left(&router).await;
    }
}

/// The daemon dies mid-build: the client's Session ends with UNAVAILABLE naming the backend and
/// the session, not with a hang or an anonymous reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_tunnel_ends_the_session_with_unavailable_naming_it() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        let mut daemon = FakeDaemon::start_holding("bk0").await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let client = Client::connect(router.addr).await.expect("connect");
        let opts = BuildOpts::buildctl();
        let session_id = opts.session_id.clone();
        let build = tokio::spawn(async move { client.build(opts).await });
        tokio::time::timeout(Duration::from_secs(20), daemon.wait_held(1))
            .await
            .expect("the build runs");
        let addr = daemon.addr().to_string();
        daemon.kill();
        let result = tokio::time::timeout(Duration::from_secs(20), build)
            .await
            .expect("no hang")
            .expect("join");
        let session = result.session.expect("session result");
        assert_eq!(session.code, Code::Unavailable, "{session:#?}");
        assert!(
            session.message.contains(&addr),
            "names the backend: {}",
            session.message
        );
        assert!(
            session.message.contains(&session_id),
            "names the session: {}",
            session.message
        );
        assert_eq!(result.solve.code, Code::Unavailable, "{:#?}", result.solve);
        assert_no_sessions_left(&router).await;
    }
}

/// Normal end and cancel, as in the captures: the client half-closes its Session; the daemon
/// sees its inner connection end and ends the Session with status 0, which the client gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_end_and_cancel_end_the_session_with_the_daemons_status() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        let daemon = FakeDaemon::start_holding("bk0").await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let client = Client::connect(router.addr).await.expect("connect");

        // Cancel: RST CANCEL on the Solve, END_STREAM on the Session.
        let mut opts = BuildOpts::buildctl();
        let cancel = std::sync::Arc::new(tokio::sync::Notify::new());
        opts.cancel = Some(CancelAt::Signal(cancel.clone()));
        let session_id = opts.session_id.clone();
        let build = tokio::spawn({
            let client = client.clone();
            async move { client.build(opts).await }
        });
        tokio::time::timeout(Duration::from_secs(20), daemon.wait_held(1))
            .await
            .expect("the build runs");
        cancel.notify_one();
        let result = build.await.expect("join");
        assert!(result.cancelled);
        let session = result.session.expect("session result");
        assert_eq!(session.code, Code::Ok, "{session:#?}");
        tokio::time::timeout(
            Duration::from_secs(10),
            daemon.wait_until(|k| k.session(&session_id).is_some_and(|s| s.ended)),
        )
        .await
        .expect("the daemon's session ended");

        // Normal end.
        daemon.release_builds();
        let opts = BuildOpts::buildctl();
        let session_id = opts.session_id.clone();
        let result = client.build(opts).await;
        assert!(result.ok(), "{:#?}", result.errors());
        assert_eq!(result.session.expect("session").code, Code::Ok);
        assert!(
            daemon
                .counters()
                .session(&session_id)
                .expect("session")
                .ended
        );
        assert_no_sessions_left(&router).await;
    }
}

/// A client that vanishes mid-build takes its relay with it: the daemon's session ends and the
/// router keeps no task for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanishing_client_ends_the_daemons_session_and_leaves_nothing_behind() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        let daemon = FakeDaemon::start_holding("bk0").await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let addr = router.addr;
        let opts = BuildOpts::buildctl();
        let session_id = opts.session_id.clone();
        let client_runtime = vanishing_runtime();
        spawn_build(&client_runtime, addr, opts);
        tokio::time::timeout(Duration::from_secs(20), daemon.wait_held(1))
            .await
            .expect("the build runs");
        assert_eq!(sessions(&router, path.phase()), 1);
        client_runtime.shutdown_background();
        tokio::time::timeout(
            Duration::from_secs(10),
            daemon.wait_until(|k| k.session(&session_id).is_some_and(|s| s.ended)),
        )
        .await
        .expect("the daemon's session ended");
        assert_no_sessions_left(&router).await;
    }
}

/// A client that goes away while its session is held (no Solve has named it yet): the hold ends
/// at once (the wait future, a queue entry tomorrow, is dropped) and nothing reaches a daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_while_held_ends_the_hold_and_reaches_no_daemon() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.session_bind_window = Duration::from_secs(3600);
    })
    .await;
    let addr = router.addr;
    let mut opts = BuildOpts::buildctl();
    // The build's other calls would only start after an hour: the session stays held.
    opts.calls_after = Some(Duration::from_secs(3600));
    let session_id = opts.session_id.clone();
    let client_runtime = vanishing_runtime();
    spawn_build(&client_runtime, addr, opts);
    eventually("the session is held", Duration::from_secs(10), || {
        sessions(&router, "held") == 1
    })
    .await;
    client_runtime.shutdown_background();
    assert_no_sessions_left(&router).await;
    assert!(!daemon.counters().saw_session(&session_id));
    assert_eq!(daemon.counters().calls("Session"), 0);
}

/// Many clients vanish at the same instant (their processes die: the kernel closes every
/// connection) while the router holds their sessions: idle (no Solve yet), waiting with their
/// build in the queue, and relayed with the build running on the daemon. Every session, build
/// and connection ends, and the daemon sees every held build cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_vanishing_at_once_leave_no_session_build_or_connection() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        const IDLE: usize = 30;
        const RUNNING: usize = 30;
        const QUEUED: usize = 20;
        let daemon = FakeDaemon::start_holding("bk0").await;
        let router = router_over(&[&daemon], |cfg| {
            path.configure(cfg);
            cfg.session_bind_window = Duration::from_secs(3600);
            cfg.placement.max_builds_per_backend = Some(RUNNING);
        })
        .await;
        let addr = router.addr;
        let active = || {
            router
                .pool
                .snapshot()
                .backends
                .iter()
                .map(|b| b.active_builds())
                .sum::<usize>()
        };
        let queued = || {
            let text = String::from_utf8(router.metrics.render().expect("render")).expect("utf8");
            text.lines()
                .filter(|l| l.starts_with("buildkit_router_builds_queued{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as usize
        };
        // All on one runtime: shutting it down closes every connection at once.
        let clients = vanishing_runtime();
        let start = |opts: BuildOpts| spawn_build(&clients, addr, opts);
        for _ in 0..IDLE {
            let mut opts = BuildOpts::buildctl();
            opts.calls_after = Some(Duration::from_secs(3600));
            start(opts);
        }
        for _ in 0..RUNNING {
            let mut opts = BuildOpts::buildctl();
            opts.context_size = 64 << 10;
            start(opts);
        }
        tokio::time::timeout(Duration::from_secs(60), daemon.wait_held(RUNNING as u64))
            .await
            .expect("the running builds are held by the daemon");
        for _ in 0..QUEUED {
            start(BuildOpts::buildctl());
        }
        eventually(
            "every session held or relayed, the last builds queued",
            Duration::from_secs(60),
            || {
                sessions(&router, "held") == (IDLE + QUEUED) as i64
                    && sessions(&router, path.phase()) == RUNNING as i64
                    && queued() == QUEUED
            },
        )
        .await;
        assert_eq!(active(), RUNNING);

        clients.shutdown_background();
        eventually(
            "no session, build, queued build or client connection left",
            Duration::from_secs(20),
            || {
                sessions(&router, "held") == 0
                    && sessions(&router, path.phase()) == 0
                    && queued() == 0
                    && active() == 0
                    && router.metrics.connections_active.get() == 0
            },
        )
        .await;
        tokio::time::timeout(Duration::from_secs(20), daemon.wait_none_held())
            .await
            .expect("the daemon saw every running build cancelled");
    }
}

/// buildctl's Ctrl-C: the Solve is reset (RST_STREAM CANCEL) and, at the same instant, the
/// Session half-closed (its deferred `s.Close()`). Mid-upload, the daemon must see the cancel
/// first: seen the other way round, it fails the build on the lost session (a different error in
/// its history) before the cancel arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_context_upload_reaches_the_daemon_before_the_sessions_end() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let client = Client::connect(router.addr).await.expect("connect");
        for round in 0..10 {
            let cancel = std::sync::Arc::new(tokio::sync::Notify::new());
            let mut opts = BuildOpts::buildctl();
            opts.context_size = 64 << 20;
            opts.cancel = Some(CancelAt::Signal(cancel.clone()));
            let (build_ref, session_id) = (opts.build_ref.clone(), opts.session_id.clone());
            let build = tokio::spawn({
                let client = client.clone();
                async move { client.build(opts).await }
            });
            tokio::time::timeout(
                Duration::from_secs(30),
                daemon.wait_until(|c| {
                    c.session(&session_id)
                        .is_some_and(|s| s.bytes_uploaded > 1 << 20)
                }),
            )
            .await
            .expect("the upload starts");
            cancel.notify_one();
            let result = build.await.expect("join");
            assert!(result.cancelled);
            tokio::time::timeout(
                Duration::from_secs(10),
                daemon.wait_until(|c| {
                    c.cancelled_refs().contains(&build_ref)
                        || c.failed_refs().iter().any(|(r, _)| *r == build_ref)
                }),
            )
            .await
            .expect("the daemon ends the build");
            assert!(
                daemon.counters().cancelled_refs().contains(&build_ref),
                "round {round}: the daemon failed the build before it saw the cancel: {:?}",
                daemon.counters().failed_refs()
            );
        }
        assert_no_sessions_left(&router).await;
    }
}

/// The mechanism behind the ordering above: while a Solve naming the session still runs in the
/// router, the client's end of the Session is held back (at most 1 s); the daemon sees the
/// session end only after that. (A cancelled Solve ends at once, releasing it at once.)
#[tokio::test(start_paused = true)]
async fn the_end_of_a_session_waits_up_to_a_second_for_the_solve_that_names_it() {
    // Half-closed (buildctl's `s.Close()`), then reset (a client killed or its connection
    // lost: the router drops the Session's answer at once, before its end is passed on).
    for (path, reset) in BOTH.into_iter().flat_map(|p| [(p, false), (p, true)]) {
        eprintln!("the session {}, reset: {reset}", path.phase());
        let daemon = FakeDaemon::start_holding("bk0").await;
        let router = router_over(&[&daemon], |cfg| path.configure(cfg)).await;
        let client = Client::connect(router.addr).await.expect("connect");
        let end = std::sync::Arc::new(tokio::sync::Notify::new());
        let mut opts = BuildOpts::buildctl();
        opts.session_rst = reset;
        opts.end_session = Some(end.clone());
        let session_id = opts.session_id.clone();
        let build = tokio::spawn(async move { client.build(opts).await });
        daemon.wait_held(1).await;
        let ended_at = tokio::time::Instant::now();
        end.notify_one();
        daemon
            .wait_until(|c| c.session(&session_id).is_some_and(|s| s.ended))
            .await;
        let held_back = ended_at.elapsed();
        assert!(
            held_back >= Duration::from_secs(1) && held_back < Duration::from_secs(2),
            "the session's end reached the daemon {held_back:?} after the client's"
        );
        daemon.release_builds();
        let _ = build.await.expect("join");
        assert_no_sessions_left(&router).await;
    }
}

/// A session whose placement fails inside the pass-through window (here: no Solve names it
/// within the bind window, and no backend is ready to take it on its own) gets the refusal as
/// its own status at once, Trailers-Only, and nothing reaches a daemon.
#[tokio::test(start_paused = true)]
async fn a_session_refused_inside_the_window_gets_the_reason_and_reaches_no_daemon() {
    let mut daemon = FakeDaemon::start_holding("bk0").await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.queue.enabled = false;
        cfg.session_bind_window = Duration::from_millis(100);
    })
    .await;
    // The only daemon is gone: once the router has seen it fail, nothing is ready.
    daemon.kill();
    eventually("the backend is not ready", Duration::from_secs(60), || {
        router.pool.snapshot().any_ready().is_none()
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    let mut opts = BuildOpts::buildctl();
    // The build's other calls come long after the session's placement failed.
    opts.calls_after = Some(Duration::from_secs(3));
    let session_id = opts.session_id.clone();
    let result = client.build(opts).await;
    let session = result.session.expect("session result");
    assert_eq!(session.code, Code::Unavailable, "{session:#?}");
    assert!(
        session.message.contains(&format!("session {session_id}")),
        "names the session: {}",
        session.message
    );
    assert_eq!(
        placed(&router, "passed_through") + placed(&router, "relayed"),
        0
    );
    assert_no_sessions_left(&router).await;
}

/// Everything the router logs at INFO and above on this thread, while the guard lives: for a
/// test on a current-thread runtime, which runs every task (the router's too) on its thread.
struct CapturedLogs {
    lines: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl CapturedLogs {
    fn start() -> Self {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let lines = lines.clone();
            move || LogWriter(lines.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        Self {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().expect("log lock")).into_owned()
    }
}

struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts a Control/Session call for session `uuid` by hand: its body is up to the test.
fn start_session(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    uuid: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request = http::Request::post("http://router/moby.buildkit.v1.Control/Session")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-docker-expose-session-uuid", uuid)
        .header("x-docker-expose-session-name", "ctx")
        .body(())
        .expect("request");
    client.send_request(request, false).expect("send")
}

/// A client that resets its Session (RST_STREAM CANCEL) before any Solve named it, inside the
/// pass-through window, or while held: nothing reaches a daemon, the router logs that the
/// client ended it, and every session gauge is back to 0. Real time: on paused time the
/// runtime may jump past the window before the reset crosses the loopback socket.
#[tokio::test]
async fn a_session_reset_before_it_is_placed_reaches_no_daemon() {
    for path in BOTH {
        eprintln!("the session {}", path.phase());
        let logs = CapturedLogs::start();
        let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
        let router = router_over(&[&daemon], |cfg| {
            path.configure(cfg);
            cfg.session_bind_window = Duration::from_secs(3600);
        })
        .await;
        let uuid = support::new_id();
        let (mut client, _driver) = h2_connect(router.addr).await;
        let (answer, mut send) = start_session(&mut client, &uuid);
        let phase = match path {
            Path::PassedThrough => "placing",
            Path::Relayed => "held",
        };
        eventually(
            &format!("the session is {phase}"),
            Duration::from_secs(1),
            || sessions(&router, phase) == 1,
        )
        .await;
        send.send_reset(h2::Reason::CANCEL);
        drop(answer);
        assert_no_sessions_left(&router).await;
        assert_eq!(daemon.counters().calls("Session"), 0);
        assert!(!daemon.counters().saw_session(&uuid));
        assert_eq!(
            placed(&router, "passed_through") + placed(&router, "relayed"),
            0
        );
        let logged = logs.text();
        let line = logged
            .lines()
            .find(|l| l.contains(&uuid) && l.contains("the client ended the session"))
            .unwrap_or_else(|| panic!("the end is logged, naming the session:\n{logged}"));
        if let Path::PassedThrough = path {
            assert!(line.contains("reset=true"), "{line}");
        }
    }
}

/// A client that sends more than 64 KiB of its Session before the Solve naming it places it:
/// the router reads no more than that (and one frame) while it waits, so what the client could
/// send stays within its 2 MiB stream window; once a Solve places the session, the router
/// reads on and passes the session through to the daemon (src/session/passthrough.rs,
/// READ_LIMIT). Real time, for the flow-control exchange over the socket.
#[tokio::test]
async fn a_session_sending_past_the_read_limit_waits_unread_until_placed() {
    const STREAM_WINDOW: usize = 2 << 20;
    const FRAME: usize = 16 << 10;
    // The daemon reads the session's messages and answers nothing (no inner connection).
    let daemon = FakeDaemon::start(
        "bk0",
        DaemonOpts {
            stall_sessions: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.session_passthrough_window = Duration::from_secs(30);
        cfg.session_bind_window = Duration::from_secs(3600);
    })
    .await;
    let uuid = support::new_id();
    let (mut session_client, _driver) = h2_connect(router.addr).await;
    let (_answer, mut send) = start_session(&mut session_client, &uuid);

    // The client's bytes: well-formed messages (the daemon reads them as BytesMessages), 4 MiB.
    let stream: Vec<u8> = (0..(2 * STREAM_WINDOW) / FRAME)
        .flat_map(|_| padded_message(FRAME - 5))
        .collect();
    // Sends on from `sent` as far as flow control lets, until nothing more is let through for a
    // while or all is sent.
    async fn send_what_fits(
        send: &mut h2::SendStream<bytes::Bytes>,
        stream: &[u8],
        sent: &mut usize,
        quiet: Duration,
    ) {
        while *sent < stream.len() {
            send.reserve_capacity(stream.len() - *sent);
            match tokio::time::timeout(quiet, std::future::poll_fn(|cx| send.poll_capacity(cx)))
                .await
            {
                Ok(Some(Ok(n))) if n > 0 => {
                    let n = n.min(stream.len() - *sent);
                    send.send_data(stream[*sent..*sent + n].to_vec().into(), false)
                        .expect("send");
                    *sent += n;
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("the stream ended: {other:?}"),
                Err(_) => return,
            }
        }
    }
    let mut sent = 0;
    // The stream window goes at once: awaited (a busy machine may take a while to send it)...
    let window = &stream[..STREAM_WINDOW];
    send_what_fits(&mut send, window, &mut sent, Duration::from_secs(10)).await;
    assert_eq!(sent, STREAM_WINDOW, "the client sends its stream window");
    // ...and nothing more is let through while the session waits.
    send_what_fits(&mut send, &stream, &mut sent, Duration::from_millis(300)).await;
    assert_eq!(
        sent, STREAM_WINDOW,
        "no window came back: the router read at most 64 KiB and a frame"
    );
    assert_eq!(sessions(&router, "placing"), 1);
    assert_eq!(daemon.counters().calls("Session"), 0);

    // A Solve names the session: it is placed and passed through, and its bytes flow again.
    let client = Client::connect(router.addr).await.expect("connect");
    let solve = tokio::spawn({
        let uuid = uuid.clone();
        async move {
            let request = buildkit_router::proto::control::SolveRequest {
                r#ref: support::new_id(),
                session: uuid,
                // buildx's probe: placed without reading a Dockerfile through the session,
                // which only a held session could serve.
                internal: true,
                ..Default::default()
            };
            client.solve(request).await
        }
    });
    eventually(
        "the session reaches the daemon",
        Duration::from_secs(10),
        || daemon.counters().calls("Session") == 1,
    )
    .await;
    assert_eq!(placed(&router, "passed_through"), 1);
    send_what_fits(&mut send, &stream, &mut sent, Duration::from_secs(5)).await;
    assert_eq!(
        sent,
        stream.len(),
        "the router reads the session on once it is passed through"
    );
    solve.abort();
}
