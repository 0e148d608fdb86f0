//! End to end: the real router in front of fake buildkitd daemons, driven by a client that
//! speaks like buildctl and buildx. Every call of every build must reach the daemon that got
//! its Solve; failures must come back as precise gRPC errors.
#![forbid(unsafe_code)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use buildkit_router::app::{self, Running};
use buildkit_router::config::RunConfig;
use buildkit_router::proto::control as pb;
use support::client::{BuildOpts, CancelAt, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon, Timers};
use tonic::Code;

async fn daemons(n: usize, opts: DaemonOpts) -> Vec<FakeDaemon> {
    FakeDaemon::start_pool(n, opts).await
}

async fn router_over(daemons: &[FakeDaemon], tweak: impl FnOnce(&mut RunConfig)) -> Running {
    // RUST_LOG=buildkit_router=debug shows the router's side of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = RunConfig::for_tests();
    cfg.backends = daemons.iter().map(FakeDaemon::url).collect();
    tweak(&mut cfg);
    let running = app::start(cfg).await.expect("router starts");
    running.pool.wait_synced().await;
    running
}

/// Which daemon saw `build_ref`'s Solve.
fn owner(daemons: &[FakeDaemon], build_ref: &str) -> Vec<String> {
    daemons
        .iter()
        .filter(|d| d.counters().served_build(build_ref))
        .map(|d| d.name().to_owned())
        .collect()
}

fn assert_build_on_one_daemon(daemons: &[FakeDaemon], build_ref: &str) {
    let owners = owner(daemons, build_ref);
    assert_eq!(owners.len(), 1, "build {build_ref} reached {owners:?}");
    let d = daemons
        .iter()
        .find(|d| d.name() == owners[0])
        .expect("owner");
    let methods = d.counters().methods_for(build_ref);
    // (LLBBridge/Ping may not reach any daemon: the router answers it while the build waits in
    // the queue. Any call it forwarded went to the owner: `owner` counts every call's ref.)
    for m in ["Solve", "Status", "LLBBridge/Return"] {
        assert!(
            methods.iter().any(|x| x == m),
            "{m} of {build_ref} did not reach {}: {methods:?}",
            owners[0]
        );
    }
}

/// The index of the first daemon to hold a build (`hold_builds`), awaited, within 20 s.
async fn holding_daemon(ds: &[FakeDaemon]) -> usize {
    let waits = ds.iter().map(|d| Box::pin(d.wait_held(1)));
    let (_, index, _) = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::select_all(waits),
    )
    .await
    .expect("a daemon holds the build");
    index
}

fn assert_no_routing_errors(daemons: &[FakeDaemon]) {
    for d in daemons {
        let k = d.counters();
        assert_eq!(k.no_such_job(), 0, "{} answered `no such job`", d.name());
        assert_eq!(
            k.no_active_session(),
            0,
            "{} answered `no active session`",
            d.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_builds_over_three_daemons_all_stay_on_their_daemon() {
    let ds = daemons(3, DaemonOpts::default()).await;
    let router = router_over(&ds, |_| {}).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let addr = router.addr;
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(addr).await.expect("connect to router");
            let mut opts = if i % 2 == 0 {
                BuildOpts::buildctl()
            } else {
                BuildOpts::buildx()
            };
            opts.context_size = 256 * 1024;
            client.build(opts).await
        }));
    }
    let mut refs = Vec::new();
    for task in tasks {
        let result = task.await.expect("join");
        assert!(
            result.ok(),
            "build failed through the router: {:#?}",
            result.errors()
        );
        assert!(
            result.tunnel.bytes_uploaded >= 256 * 1024,
            "whole context went through the tunnel"
        );
        refs.push(result.build_ref);
    }
    for r in &refs {
        assert_build_on_one_daemon(&ds, r);
    }
    assert_no_routing_errors(&ds);
    let used: HashSet<_> = refs.iter().flat_map(|r| owner(&ds, r)).collect();
    assert_eq!(
        used.len(),
        3,
        "least-loaded placement spreads 32 builds over all 3 daemons"
    );
    // Every build has ended: nothing is counted as active any more.
    assert!(router
        .pool
        .snapshot()
        .backends
        .iter()
        .all(|b| b.active_builds() == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_builds_on_one_client_connection_each_stay_on_their_daemon() {
    let ds = daemons(3, DaemonOpts::default()).await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let builds = (0..12).map(|_| {
        let client = client.clone();
        async move { client.build(BuildOpts::buildctl()).await }
    });
    let results = futures_util::future::join_all(builds).await;
    for r in &results {
        assert!(r.ok(), "{:#?}", r.errors());
        assert_build_on_one_daemon(&ds, &r.build_ref);
    }
    assert_no_routing_errors(&ds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildx_probe_build_and_history_probe_work_through_the_router() {
    let ds = daemons(2, DaemonOpts::default()).await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let result = client.buildx_build(BuildOpts::buildx()).await;
    assert!(result.ok(), "{result:#?}");
    assert_build_on_one_daemon(&ds, &result.build.build_ref);
    assert_eq!(
        owner(&ds, &result.probe.build_ref).len(),
        1,
        "the probe build ran on one daemon"
    );
    assert_no_routing_errors(&ds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bake_targets_sharing_a_session_land_on_one_daemon() {
    let ds = daemons(3, DaemonOpts::default()).await;
    let router = router_over(&ds, |_| {}).await;
    for _ in 0..4 {
        let client = Client::connect(router.addr).await.expect("connect");
        let bake = client.bake(2, 128 * 1024).await;
        assert!(bake.ok(), "{bake:#?}");
        let owners: HashSet<_> = bake
            .targets
            .iter()
            .flat_map(|t| owner(&ds, &t.build_ref))
            .collect();
        assert_eq!(
            owners.len(),
            1,
            "both targets and the shared session on one daemon: {owners:?}"
        );
        let daemon = ds
            .iter()
            .find(|d| owners.contains(d.name()))
            .expect("owner");
        assert!(daemon.counters().saw_session(&bake.shared_session_id));
    }
    assert_no_routing_errors(&ds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_build_is_cancelled_on_its_daemon() {
    let ds = daemons(
        2,
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let mut opts = BuildOpts::buildctl();
    let cancel = Arc::new(tokio::sync::Notify::new());
    opts.cancel = Some(CancelAt::Signal(cancel.clone()));
    let build_ref = opts.build_ref.clone();
    let build = tokio::spawn(async move { client.build(opts).await });
    // Cancel once the build runs on its daemon (context uploaded, solver busy), as a user
    // pressing Ctrl-C mid-build would.
    let daemon = &ds[holding_daemon(&ds).await];
    cancel.notify_one();
    let result = build.await.expect("join");
    assert!(result.cancelled);
    tokio::time::timeout(
        Duration::from_secs(10),
        daemon.wait_until(|k| k.cancelled_refs().contains(&build_ref)),
    )
    .await
    .expect("the daemon sees the client's RST_STREAM CANCEL through the router");
    assert_eq!(owner(&ds, &build_ref), vec![daemon.name().to_owned()]);
    // The router forgets the build once its Solve is gone.
    tokio::time::timeout(Duration::from_secs(5), async {
        while router
            .pool
            .snapshot()
            .backends
            .iter()
            .any(|b| b.active_builds() > 0)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("active build count drops to zero after the cancel");
    let metrics = support::admin_get(router.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("outcome=\"cancelled\"} 1"),
        "a cancelled build is counted as such:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_mid_build_fails_that_build_with_unavailable_naming_it() {
    let mut ds = daemons(
        2,
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let opts = BuildOpts::buildctl();
    let build_ref = opts.build_ref.clone();
    let running = {
        let client = client.clone();
        tokio::spawn(async move { client.build(opts).await })
    };
    // Wait until the build is held on its daemon, then kill that daemon.
    let victim = holding_daemon(&ds).await;
    let victim_addr = ds[victim].addr();
    ds[victim].kill();
    let result = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("no hang")
        .expect("join");
    assert!(!result.ok());
    assert_eq!(result.solve.code, Code::Unavailable, "{:#?}", result.solve);
    assert!(
        result.solve.message.contains(&build_ref),
        "names the build: {}",
        result.solve.message
    );
    assert!(
        result.solve.message.contains(&victim_addr.to_string()),
        "names the backend: {}",
        result.solve.message
    );
    // The router keeps serving: the next build goes to the surviving daemon.
    let survivor = 1 - victim;
    let next = {
        let client = client.clone();
        let opts = BuildOpts::buildctl();
        let r = opts.build_ref.clone();
        let handle = tokio::spawn(async move { client.build(opts).await });
        // The failed connection ejected the dead daemon: the next build goes to the survivor
        // even before health checks notice.
        tokio::time::timeout(Duration::from_secs(20), ds[survivor].wait_held(1))
            .await
            .expect("the next build reaches the surviving daemon");
        ds[survivor].release_builds();
        (r, handle.await.expect("join"))
    };
    assert!(next.1.ok(), "{:#?}", next.1.errors());
    assert_eq!(owner(&ds, &next.0), vec![ds[survivor].name().to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_usage_and_prune_cover_every_daemon() {
    let ds = daemons(3, DaemonOpts::default()).await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let du = client.disk_usage().await.expect("DiskUsage");
    for d in &ds {
        assert!(
            du.record.iter().any(|r| r.id.starts_with(d.name())),
            "DiskUsage merged {} too: {:?}",
            d.name(),
            du.record.iter().map(|r| &r.id).collect::<Vec<_>>()
        );
    }
    let pruned = client.prune().await.expect("Prune");
    for d in &ds {
        assert!(
            pruned.iter().any(|r| r.id.starts_with(d.name())),
            "Prune reached {}",
            d.name()
        );
        assert_eq!(d.counters().calls("Prune"), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_for_an_unknown_ref_gets_the_daemons_no_such_job() {
    let timers = Timers {
        status_wait: Duration::from_millis(300),
        ..Timers::default()
    };
    let ds = daemons(
        2,
        DaemonOpts {
            timers,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&ds, |cfg| cfg.ref_wait = Duration::from_millis(200)).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let err = client
        .status("doesnotexist0000000000000")
        .await
        .expect_err("unknown ref");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message()
            .contains("no such job doesnotexist0000000000000"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_no_solve_names_is_placed_after_the_bind_window() {
    let ds = daemons(2, DaemonOpts::default()).await;
    let router = router_over(&ds, |cfg| {
        cfg.session_bind_window = Duration::from_millis(100)
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    // A build whose Solve never names its own session: the session must still get its daemon's
    // preface (the client would die after 10 s otherwise).
    let mut opts = BuildOpts::probe();
    opts.session_id = support::new_id();
    let session_id = opts.session_id.clone();
    let (daemon_saw, _) = tokio::join!(
        async {
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if ds.iter().any(|d| d.counters().saw_session(&session_id)) {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
        },
        client.build(opts)
    );
    assert!(
        daemon_saw.unwrap_or(false),
        "the held session reached a daemon after the bind window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_get_invalid_argument_and_the_router_keeps_serving() {
    let ds = daemons(1, DaemonOpts::default()).await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    // A Solve whose Ref field claims more bytes than the message has.
    let mut grpc = tonic::client::Grpc::new(client.channel());
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/moby.buildkit.v1.Control/Solve");
    let status = grpc
        .unary::<_, pb::SolveResponse, _>(
            tonic::Request::new(RawBytes(vec![0x0a, 0x7f, b'x'])),
            path,
            RawCodec,
        )
        .await
        .expect_err("malformed Solve");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("Control/Solve"),
        "{}",
        status.message()
    );
    let result = client.build(BuildOpts::buildctl()).await;
    assert!(result.ok(), "router still serves: {:#?}", result.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_ready_is_a_clear_unavailable() {
    let ds = daemons(1, DaemonOpts::default()).await;
    let addr = ds[0].url();
    drop(ds);
    let mut cfg = RunConfig::for_tests();
    cfg.backends = vec![addr];
    cfg.connect_timeout = Duration::from_millis(500);
    // Without the queue (with it, the build waits for a daemon: tests/queue.rs).
    cfg.queue.enabled = false;
    let router = app::start(cfg).await.expect("start");
    router.pool.wait_synced().await;
    let client = Client::connect(router.addr).await.expect("connect");
    let result = client.build(BuildOpts::buildctl()).await;
    assert_eq!(result.solve.code, Code::Unavailable, "{:#?}", result.solve);
    assert!(
        result.solve.message.contains(&result.build_ref),
        "{}",
        result.solve.message
    );
    assert!(
        // Whether the first health check or this Solve met the dead daemon first, the user
        // learns the cause.
        result.solve.message.contains("Connection refused"),
        "says why: {}",
        result.solve.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_answers_grpc_health_itself() {
    let ds = daemons(1, DaemonOpts::default()).await;
    let router = router_over(&ds, |_| {}).await;
    let channel = Client::connect(router.addr)
        .await
        .expect("connect")
        .channel();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(ds[0].counters().calls("Health/Check"), 0, "not forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_are_served_on_the_admin_port() {
    let ds = daemons(2, DaemonOpts::default()).await;
    let router = router_over(&ds, |cfg| cfg.placement.max_builds_per_backend = Some(8)).await;
    let client = Client::connect(router.addr).await.expect("connect");
    assert!(client.build(BuildOpts::buildctl()).await.ok());
    let metrics = support::admin_get(router.admin_addr, "/metrics").await;
    for needle in [
        "buildkit_router_requests_total{code=\"OK\",method=\"Control/Solve\"} 1",
        "buildkit_router_builds_total{",
        "buildkit_router_session_bind_seconds_bucket{how=",
        "buildkit_router_backends{state=\"ready\"} 2",
        "buildkit_router_builds_active{backend=",
        "buildkit_router_desired_backends 0",
        "buildkit_router_placement_total{reason=\"affinity\"} 1",
        "buildkit_router_affinity_key_source_total{source=",
        "buildkit_router_discovery_updates_total{",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }
    // Every metric the Kubernetes manifests (autoscalers, dashboard, adapter rules) rely on is
    // really exported, with the type they assume.
    let manifests = include_str!("deploy_manifests.rs");
    let list = &manifests[manifests.find("const ROUTER_METRICS").expect("metric list")..];
    let list = &list[..list.find("];").expect("end of list")];
    let mut checked = 0;
    let list = &list[list.find("= &[").expect("list start")..];
    for entry in list.split('(').filter(|e| e.contains('"')) {
        let name = entry.split('"').nth(1).expect("quoted metric name");
        let kind = entry
            .split("MetricKind::")
            .nth(1)
            .map(|k| {
                k.chars()
                    .take_while(char::is_ascii_alphabetic)
                    .collect::<String>()
            })
            .expect("metric kind")
            .to_lowercase();
        assert!(
            metrics.contains(&format!("# TYPE {name} {kind}")),
            "the manifests use {name} ({kind}), which /metrics does not export:\n{metrics}"
        );
        checked += 1;
    }
    assert!(
        checked >= 15,
        "parsed the manifests' metric list ({checked} names)"
    );
    assert!(support::admin_get(router.admin_addr, "/readyz")
        .await
        .starts_with("ready"));
    let status = support::admin_get(router.admin_addr, "/status").await;
    let doc: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(doc["backends"].as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_build_finish_and_refuses_new_connections() {
    let ds = daemons(
        1,
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let build = {
        let client = client.clone();
        tokio::spawn(async move { client.build(BuildOpts::buildctl()).await })
    };
    ds[0].wait_held(1).await;
    let addr = router.addr;
    router.shutdown.cancel();
    let finished = tokio::spawn(router.finished());
    // New connections are refused once the listener is closed.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "listener closed on shutdown");
    ds[0].release_builds();
    let result = build.await.expect("join");
    assert!(
        result.ok(),
        "in-flight build finished during the drain: {:#?}",
        result.errors()
    );
    tokio::time::timeout(Duration::from_secs(10), finished)
        .await
        .expect("router exits once drained")
        .expect("join");
}

/// Raw request bytes, to send what no well-behaved client would.
#[derive(Clone)]
struct RawBytes(Vec<u8>);

#[derive(Default)]
struct RawCodec;

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = RawBytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: RawBytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item.0);
        Ok(())
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = RawBytes;
    type Decode = pb::SolveResponse;
    type Encoder = RawEncoder;
    type Decoder =
        <tonic_prost::ProstCodec<RawBytesDummy, pb::SolveResponse> as tonic::codec::Codec>::Decoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic::codec::Codec::decoder(&mut tonic_prost::ProstCodec::<
            RawBytesDummy,
            pb::SolveResponse,
        >::default())
    }
}

type RawBytesDummy = pb::SolveRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_calls_for_a_known_build_go_to_its_daemon_and_unknown_ones_to_all() {
    let ds = daemons(3, DaemonOpts::default()).await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let build = client.build(BuildOpts::buildctl()).await;
    assert!(build.ok(), "{:#?}", build.errors());
    let owner_name = owner(&ds, &build.build_ref).pop().expect("owner");
    // buildx --metadata-file: the real ref, right after the build.
    let events = client
        .listen_build_history(pb::BuildHistoryRequest {
            r#ref: build.build_ref.clone(),
            early_exit: true,
            ..Default::default()
        })
        .await
        .expect("history of the build");
    assert!(
        events.iter().any(|e| e
            .record
            .as_ref()
            .is_some_and(|r| r.r#ref == build.build_ref)),
        "{events:?}"
    );
    for d in &ds {
        // (The router's own ActiveOnly watchers call every daemon too; count this ref's calls.)
        let expected = usize::from(d.name() == owner_name);
        let calls = d
            .counters()
            .methods_for(&build.build_ref)
            .iter()
            .filter(|m| *m == "ListenBuildHistory")
            .count();
        assert_eq!(calls, expected, "{}", d.name());
    }
    // An unknown ref is asked of every daemon; when none has it, the client gets BuildKit's
    // own error (UNKNOWN, "failed to retrieve ref ...").
    let err = client
        .update_build_history(pb::UpdateBuildHistoryRequest {
            r#ref: "nosuchbuild".into(),
            pinned: true,
            ..Default::default()
        })
        .await
        .expect_err("unknown ref");
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(
        err.message().ends_with(": file does not exist"),
        "the daemon's own message, decoded once: {err:?}"
    );
    for d in &ds {
        assert_eq!(d.counters().calls("UpdateBuildHistory"), 1, "{}", d.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_workers_is_answered_from_cache_when_no_backend_is_ready() {
    let mut ds = daemons(
        1,
        DaemonOpts {
            platforms: vec!["linux/arm64".into()],
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&ds, |cfg| {
        cfg.queue.enabled = false;
        cfg.health_interval = Duration::from_millis(50);
        cfg.health_failures = 1;
        cfg.connect_timeout = Duration::from_millis(200);
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    let live = client.list_workers().await.expect("ListWorkers");
    ds[0].kill();
    tokio::time::timeout(Duration::from_secs(10), async {
        while router.pool.snapshot().any_ready().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the dead daemon is ejected by health checks");
    let cached = client.list_workers().await.expect("cached ListWorkers");
    assert_eq!(cached, live, "the last good answer is served");
    let err = client.build(BuildOpts::buildctl()).await.solve;
    assert_eq!(err.code, Code::Unavailable);
    assert!(
        err.message.contains("no buildkitd backend is ready"),
        "{}",
        err.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_on_a_draining_backend_completes_and_the_next_goes_elsewhere() {
    use buildkit_router::pool::{BackendAddress, EndpointSpec, EndpointState, PoolUpdate};
    let ds = daemons(
        2,
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&ds, |_| {}).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let first = {
        let client = client.clone();
        tokio::spawn(async move { client.build(BuildOpts::buildctl()).await })
    };
    let busy = holding_daemon(&ds).await;
    // Discovery reports the busy daemon's pod as terminating, as an EndpointSlice update would.
    let addr = ds[busy].addr();
    router.pool.apply(PoolUpdate::Update(EndpointSpec {
        identity: ds[busy].url(),
        address: BackendAddress::tcp(addr.ip().to_string(), addr.port()),
        state: EndpointState::Draining,
        zone: None,
        node: None,
    }));
    // The same project again: its affinity home is draining, so it goes to the other daemon.
    let other = 1 - busy;
    let second = {
        let client = client.clone();
        tokio::spawn(async move { client.build(BuildOpts::buildctl()).await })
    };
    tokio::time::timeout(Duration::from_secs(20), ds[other].wait_held(1))
        .await
        .expect("the next build goes to the ready daemon");
    ds[busy].release_builds();
    ds[other].release_builds();
    let first = first.await.expect("join");
    assert!(
        first.ok(),
        "the draining daemon's build completes: {:#?}",
        first.errors()
    );
    assert_build_on_one_daemon(&ds, &first.build_ref);
    assert_eq!(
        owner(&ds, &first.build_ref),
        vec![ds[busy].name().to_owned()]
    );
    let second = second.await.expect("join");
    assert!(second.ok(), "{:#?}", second.errors());
    assert_eq!(
        owner(&ds, &second.build_ref),
        vec![ds[other].name().to_owned()]
    );
    assert_no_routing_errors(&ds);
}

/// A daemon that comes up after the router (a router started first, a pod restarting) is used
/// as soon as it answers: ejected backends are probed again from 200 ms, not only at the next
/// health interval (10 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_starts_after_the_router_is_used_well_before_the_health_interval() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let router = router_over(&[], |cfg| {
        cfg.backends = vec![format!("tcp://{addr}")];
        cfg.health_interval = Duration::from_secs(10);
        cfg.connect_timeout = Duration::from_millis(200);
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while router.pool.snapshot().any_ready().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first health check finds nothing listening");
    let daemon = FakeDaemon::start(
        "late",
        DaemonOpts {
            listen: Some(addr),
            ..DaemonOpts::default()
        },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while router.pool.snapshot().any_ready().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the daemon rejoins long before the 10 s health interval");
    let client = Client::connect(router.addr).await.expect("connect");
    let build = client.build(BuildOpts::buildctl()).await;
    assert!(build.ok(), "{build:#?}");
    assert_eq!(daemon.counters().refs().len(), 1);
}
