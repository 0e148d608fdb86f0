//! The admission queue through the real router, over fake daemons: builds wait for a daemon with
//! room (an empty pool, a full one), see why in their Status stream, time out with a clear
//! RESOURCE_EXHAUSTED, and leave the queue at once when their client cancels.

mod support;

use std::sync::Arc;
use std::time::Duration;

use buildkit_router::app::{self, Running};
use buildkit_router::config::RunConfig;
use buildkit_router::pool::{BackendAddress, EndpointSpec, EndpointState, PoolUpdate};
use support::client::{BuildOpts, CancelAt, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use tonic::Code;

/// A router over `backends`; with none, over one address where nothing listens (a pool scaled
/// to zero: discovery lists no live daemon).
async fn router(backends: &[&FakeDaemon], tweak: impl FnOnce(&mut RunConfig)) -> Running {
    let mut cfg = RunConfig::for_tests();
    cfg.backends = backends.iter().map(|d| d.url()).collect();
    if backends.is_empty() {
        let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        cfg.backends = vec![format!("tcp://{nowhere}")];
    }
    tweak(&mut cfg);
    let running = app::start(cfg).await.expect("router starts");
    running.pool.wait_synced().await;
    running
}

/// Waits (bounded) until `n` builds wait in the router's queue.
async fn wait_queued(router: &Running, n: i64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while router.metrics.queued_total.get() != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "expected {n} queued builds, have {}",
            router.metrics.queued_total.get()
        )
    });
}

/// One daemon that holds its builds, a router capping it at one build, and one build holding
/// that slot: a full pool, where the next build waits.
async fn full_pool() -> (
    FakeDaemon,
    Running,
    Client,
    tokio::task::JoinHandle<support::client::BuildResult>,
) {
    let daemon = FakeDaemon::start(
        "d0",
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router(&[&daemon], |cfg| {
        cfg.placement.max_builds_per_backend = Some(1);
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    let running = {
        let client = client.clone();
        tokio::spawn(async move { client.build(BuildOpts::buildctl()).await })
    };
    daemon.wait_held(1).await;
    (daemon, router, client, running)
}

fn add(daemon: &FakeDaemon) -> PoolUpdate {
    PoolUpdate::Add(EndpointSpec {
        identity: daemon.name().to_owned(),
        address: BackendAddress::tcp("127.0.0.1", daemon.addr().port()),
        state: EndpointState::Ready,
        zone: None,
        node: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_wait_for_an_empty_pool_and_all_complete_when_a_daemon_appears() {
    let router = router(&[], |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let builds: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.build(BuildOpts::buildctl()).await })
        })
        .collect();
    wait_queued(&router, 3).await;
    let status: serde_json::Value =
        serde_json::from_str(&support::admin_get(router.admin_addr, "/status").await)
            .expect("status json");
    assert_eq!(
        status["queued"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    let daemon = FakeDaemon::start("late", DaemonOpts::default()).await;
    router.pool.apply(add(&daemon));
    for b in builds {
        let b = b.await.expect("build task");
        assert!(b.ok(), "{b:#?}");
        assert!(
            b.status_vertexes
                .iter()
                .any(|v| v.starts_with("[buildkit-router] waiting for a builder")),
            "the client saw why it waited: {:?}",
            b.status_vertexes
        );
        assert!(
            b.status_vertexes.iter().any(|v| v.contains("fake step")),
            "then the daemon's own progress: {:?}",
            b.status_vertexes
        );
        assert!(b.tunnel.bytes_uploaded > 0, "context went through: {b:#?}");
    }
    assert_eq!(daemon.counters().refs().len(), 3);
    assert_eq!(router.metrics.queued_total.get(), 0);
    assert!(router.metrics.queue_wait_seconds.get_sample_count() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_serves_queued_builds_as_slots_free_never_over_capacity() {
    let opts = DaemonOpts {
        hold_builds: true,
        ..DaemonOpts::default()
    };
    let d0 = FakeDaemon::start("d0", opts.clone()).await;
    let d1 = FakeDaemon::start("d1", opts).await;
    let router = router(&[&d0, &d1], |cfg| {
        cfg.placement.max_builds_per_backend = Some(1);
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    let builds: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.build(BuildOpts::buildctl()).await })
        })
        .collect();
    d0.wait_held(1).await;
    d1.wait_held(1).await;
    wait_queued(&router, 2).await;
    assert_eq!(
        (d0.held(), d1.held()),
        (1, 1),
        "the cap is real: nothing overflows"
    );
    d0.release_builds();
    d1.release_builds();
    for b in builds {
        let b = b.await.expect("build task");
        assert!(b.ok(), "{b:#?}");
    }
    assert_eq!(d0.counters().refs().len() + d1.counters().refs().len(), 4);
    assert_eq!(router.metrics.queued_total.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_waits_too_long_gets_resource_exhausted_naming_its_wait() {
    let router = router(&[], |cfg| {
        cfg.queue.queue_timeout = Duration::from_millis(500);
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    let b = client.build(BuildOpts::buildctl()).await;
    // The Solve, or the frontend call the client was waiting in (which then cancels the
    // Solve), ends with the queue's verdict.
    let calls = b.calls();
    let refused = calls
        .iter()
        .find(|c| c.code == Code::ResourceExhausted)
        .unwrap_or_else(|| panic!("a call ends with RESOURCE_EXHAUSTED: {calls:#?}"));
    for needle in [
        "no builder became free after waiting",
        "--queue-timeout",
        "no builder is ready",
        &b.build_ref,
    ] {
        assert!(
            refused.message.contains(needle),
            "{needle}: {}",
            refused.message
        );
    }
    assert_eq!(router.metrics.queue_timeouts_total.get(), 1);
    // The gauge is updated by the queue's dispatcher, which may run just after the client
    // got its answer (seen under the whole suite's load).
    wait_queued(&router, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_cancelled_while_queued_leaves_at_once_and_reaches_no_daemon() {
    let (daemon, router, client, running) = full_pool().await;
    let cancel = Arc::new(tokio::sync::Notify::new());
    let queued = {
        let client = client.clone();
        let opts = BuildOpts {
            cancel: Some(CancelAt::Signal(cancel.clone())),
            ..BuildOpts::buildctl()
        };
        tokio::spawn(async move { client.build(opts).await })
    };
    wait_queued(&router, 1).await;
    cancel.notify_one();
    wait_queued(&router, 0).await;
    let queued = queued.await.expect("build task");
    assert!(queued.cancelled, "{queued:#?}");
    // Nothing of the build ran on a daemon (asking the daemons' histories about an unknown ref,
    // as the router may for its Status, is no build).
    let reached = daemon.counters().methods_for(&queued.build_ref);
    assert!(
        !reached
            .iter()
            .any(|m| m == "Solve" || m.starts_with("LLBBridge")),
        "a build cancelled while queued never reaches a daemon: {reached:?}"
    );
    assert!(!daemon.counters().saw_session(&queued.session_id));
    daemon.release_builds();
    assert!(running.await.expect("build task").ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pool_is_ready_and_answers_list_workers_from_default_platforms() {
    let router = router(&[], |cfg| {
        cfg.default_platforms = vec!["linux/amd64".into(), "linux/arm64".into()];
    })
    .await;
    let ready = support::admin_get(router.admin_addr, "/readyz").await;
    assert!(ready.starts_with("ready"), "{ready}");
    let client = Client::connect(router.addr).await.expect("connect");
    let workers = client
        .list_workers()
        .await
        .expect("ListWorkers with no daemon");
    let platforms: Vec<String> = workers.record[0]
        .platforms
        .iter()
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    client.info().await.expect("Info with no daemon");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildx_probe_builds_never_wait_behind_full_daemons() {
    let (daemon, router, client, running) = full_pool().await;
    // The probe (Internal, no work) is not queued behind the full daemon.
    let probe = client.build(BuildOpts::probe()).await;
    assert!(probe.solve.is_ok(), "{probe:#?}");
    assert_eq!(router.metrics.queued_total.get(), 0);
    daemon.release_builds();
    assert!(running.await.expect("build task").ok());
}

/// Two router replicas over the same daemons, each with `--max-builds-per-backend 1`: each
/// learns the other's builds from the daemons' own reports (`ListenBuildHistory{ActiveOnly}`),
/// so together they never run more than one build per daemon; the rest wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_respect_one_cap_through_the_daemons_reports() {
    let opts = DaemonOpts {
        hold_builds: true,
        ..DaemonOpts::default()
    };
    let d0 = FakeDaemon::start("d0", opts.clone()).await;
    let d1 = FakeDaemon::start("d1", opts).await;
    let cap = |cfg: &mut RunConfig| cfg.placement.max_builds_per_backend = Some(1);
    let a = router(&[&d0, &d1], cap).await;
    let b = router(&[&d0, &d1], cap).await;
    let (ca, cb) = (
        Client::connect(a.addr).await.expect("connect a"),
        Client::connect(b.addr).await.expect("connect b"),
    );
    let reported = |r: &Running| -> usize {
        r.pool
            .snapshot()
            .backends
            .iter()
            .filter_map(|bk| bk.reported_builds())
            .sum()
    };
    let start = |c: &Client| {
        let c = c.clone();
        tokio::spawn(async move { c.build(BuildOpts::buildctl()).await })
    };
    // One build through each replica, each after the other replica saw the previous one.
    let first = start(&ca);
    tokio::time::timeout(Duration::from_secs(10), async {
        while reported(&b) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("replica b hears of a's build from the daemon");
    let second = start(&cb);
    tokio::time::timeout(Duration::from_secs(10), async {
        while reported(&a) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("replica a hears of b's build from the daemon");
    // Every daemon is full for both replicas: the next builds wait, one in each.
    let third = start(&ca);
    let fourth = start(&cb);
    wait_queued(&a, 1).await;
    wait_queued(&b, 1).await;
    d0.wait_held(1).await;
    d1.wait_held(1).await;
    assert_eq!(
        (d0.held(), d1.held()),
        (1, 1),
        "one build per daemon in all"
    );
    d0.release_builds();
    d1.release_builds();
    for build in [first, second, third, fourth] {
        let build = build.await.expect("build task");
        assert!(build.ok(), "{build:#?}");
    }
    assert_eq!(d0.counters().refs().len() + d1.counters().refs().len(), 4);
}

/// Tenants are served round robin: a tenant with one build waits behind one build of a tenant
/// that queued three, not behind all three (`--tenant-from key-owner`: the key's group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_serves_two_tenants_in_turn() {
    let (daemon, router, client, running) = full_pool().await;
    let build = |key: &str| {
        let mut opts = BuildOpts::buildctl();
        opts.frontend_attrs
            .insert("build-arg:BUILDKIT_ROUTER_KEY".into(), key.into());
        let build_ref = opts.build_ref.clone();
        let client = client.clone();
        (
            build_ref,
            tokio::spawn(async move { client.build(opts).await }),
        )
    };
    let mut queued = Vec::new();
    for (i, key) in ["team-a/p1", "team-a/p2", "team-a/p3", "team-b/p1"]
        .into_iter()
        .enumerate()
    {
        queued.push(build(key));
        // Queue them in this order.
        wait_queued(&router, i as i64 + 1).await;
    }
    daemon.release_builds();
    assert!(running.await.expect("build task").ok());
    let mut refs = Vec::new();
    for (build_ref, task) in queued {
        assert!(task.await.expect("build task").ok());
        refs.push(build_ref);
    }
    let order: Vec<usize> = daemon
        .counters()
        .completed_refs()
        .iter()
        .filter_map(|r| refs.iter().position(|q| q == r))
        .collect();
    // team-a's first, then team-b's only build, then the rest of team-a's.
    assert_eq!(order, [0, 3, 1, 2], "served in turn: {order:?}");
}
