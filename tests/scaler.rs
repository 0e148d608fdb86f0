//! The KEDA external scaler API, driven as KEDA drives it (a tonic client of
//! `externalscaler.ExternalScaler`), against the real router over a pool scaled to zero: the
//! router's DNS discovery asks a real DNS server on 127.0.0.1 that answers NXDOMAIN until the
//! test lets a fake daemon "start" (the name then resolves to it).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use buildkit_router::app::{self, Running};
use buildkit_router::config::RunConfig;
use buildkit_router::proto::externalscaler::{GetMetricsRequest, IsActiveResponse};
use buildkit_router::scaler::METRIC_NAME;
use support::client::{BuildOpts, CancelAt, Client};
use support::dns::{Behaviour, DnsServer};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use support::keda::{next_push, Keda};
use tonic::Streaming;

/// A router whose only backends come from `buildkitd.test:<daemon_port>` asked of `dns`, with
/// its scaler API on `scaler_listen`.
async fn router(
    dns: &DnsServer,
    daemon_port: u16,
    scaler_listen: SocketAddr,
    tweak: impl FnOnce(&mut RunConfig),
) -> Running {
    let mut cfg = RunConfig::for_tests();
    cfg.discovery.dns = Some(format!("buildkitd.test:{daemon_port}"));
    cfg.discovery.dns_server = vec![dns.addr];
    cfg.discovery.dns_interval = Duration::from_millis(50);
    cfg.scaler.scaler_listen = Some(scaler_listen);
    tweak(&mut cfg);
    let running = app::start(cfg).await.expect("router starts");
    running.pool.wait_synced().await;
    running
}

fn scaler_addr(router: &Running) -> SocketAddr {
    router.scaler.as_ref().expect("scaler on").addr
}

/// Expects the next push to be `true`, within 100 ms of `since` (KEDA then scales from zero
/// without waiting for a polling interval).
async fn expect_push_true(stream: &mut Streaming<IsActiveResponse>, since: Instant, what: &str) {
    assert!(next_push(stream).await, "pushed active");
    let latency = since.elapsed();
    println!("StreamIsActive pushed true {latency:?} after {what}");
    assert!(
        latency < Duration::from_millis(100),
        "pushed after {latency:?}"
    );
}

/// A build's result, once a daemon serves it (bounded).
async fn finish(
    build: tokio::task::JoinHandle<support::client::BuildResult>,
) -> support::client::BuildResult {
    tokio::time::timeout(Duration::from_secs(30), build)
        .await
        .expect("the queued build completes once a daemon appears")
        .expect("build task")
}

/// Waits (bounded) until `n` builds wait in `router`'s queue.
async fn wait_queued(router: &Running, n: i64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while router.metrics.queued_total.get() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("expected {n} queued builds"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_scales_from_zero_by_push_and_back_to_zero_after_idle() {
    let dns = DnsServer::start(Behaviour::NxDomain).await;
    let daemon = FakeDaemon::start("buildkitd-0", DaemonOpts::default()).await;
    let idle = Duration::from_millis(1500);
    let router = router(
        &dns,
        daemon.addr().port(),
        "127.0.0.1:0".parse().unwrap(),
        |cfg| cfg.scaler.scale_to_zero_idle = idle,
    )
    .await;
    assert!(
        router.pool.snapshot().backends.is_empty(),
        "NXDOMAIN: zero backends"
    );

    let mut keda = Keda::connect(scaler_addr(&router)).await;
    let spec = keda
        .client
        .get_metric_spec(Keda::object())
        .await
        .expect("GetMetricSpec")
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    assert_eq!(spec.metric_specs[0].metric_name, METRIC_NAME);
    assert_eq!(
        spec.metric_specs[0].target_size, 4,
        "--target-builds-per-backend"
    );
    let unknown = keda
        .client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(Keda::object()),
            metric_name: "cpu".into(),
        })
        .await
        .expect_err("an unknown metric is refused");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(unknown.message().contains(METRIC_NAME), "{unknown:?}");
    let mut stream = keda.stream().await;
    assert!(
        !next_push(&mut stream).await,
        "an idle pool starts inactive"
    );
    assert!(!keda.is_active().await);
    assert_eq!(keda.metric().await, 0);

    // A build arrives at an empty pool: it is queued, and KEDA is told at once.
    let client = Client::connect(router.addr).await.expect("connect");
    let started = Instant::now();
    let build = tokio::spawn(async move { client.build(BuildOpts::buildctl()).await });
    expect_push_true(&mut stream, started, "the build was sent").await;
    wait_queued(&router, 1).await;
    assert!(keda.is_active().await);
    assert_eq!(keda.metric().await, 1, "the queued build is counted");

    // KEDA starts a daemon: it appears through DNS discovery and the build completes on it.
    dns.set(Behaviour::Addresses(vec!["127.0.0.1".parse().unwrap()]));
    let result = finish(build).await;
    assert!(result.ok(), "{result:#?}");
    assert!(daemon.counters().served_build(&result.build_ref));
    let finished = Instant::now();
    assert_eq!(keda.metric().await, 0, "nothing queued or running");

    // No build for --scale-to-zero-idle: the push goes false.
    assert!(!next_push(&mut stream).await, "idle pool reported inactive");
    let quiet = finished.elapsed();
    println!("StreamIsActive pushed false {quiet:?} after the build ended (idle {idle:?})");
    assert!(
        quiet >= idle - Duration::from_millis(200),
        "pushed false after only {quiet:?}"
    );
    assert!(!keda.is_active().await);

    router.shutdown.cancel();
    router.finished().await;
}

/// A build that waited longer than the idle time and then left without running (its client
/// gave up): the idle window starts when it left, so the pool is not reported inactive at once
/// (a scale-up under way is not undone the moment a waiting build is cancelled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_window_starts_when_the_last_build_leaves_the_queue() {
    let dns = DnsServer::start(Behaviour::NxDomain).await;
    let idle = Duration::from_millis(400);
    let router = router(&dns, 1, "127.0.0.1:0".parse().unwrap(), |cfg| {
        cfg.scaler.scale_to_zero_idle = idle
    })
    .await;
    let mut keda = Keda::connect(scaler_addr(&router)).await;
    let mut stream = keda.stream().await;
    assert!(
        !next_push(&mut stream).await,
        "an idle pool starts inactive"
    );

    let client = Client::connect(router.addr).await.expect("connect");
    let cancel = std::sync::Arc::new(tokio::sync::Notify::new());
    let opts = BuildOpts {
        cancel: Some(CancelAt::Signal(cancel.clone())),
        ..BuildOpts::buildctl()
    };
    let build = tokio::spawn(async move { client.build(opts).await });
    assert!(next_push(&mut stream).await, "pushed active");
    wait_queued(&router, 1).await;
    // Queued for longer than the idle time, then cancelled (Ctrl-C).
    tokio::time::sleep(idle * 2).await;
    cancel.notify_one();
    wait_queued(&router, 0).await;
    let left = Instant::now();
    assert!(!next_push(&mut stream).await, "idle pool reported inactive");
    let quiet = left.elapsed();
    assert!(
        quiet >= idle - Duration::from_millis(100),
        "reported inactive {quiet:?} after the build left (idle {idle:?})"
    );
    assert!(build.await.expect("build task").cancelled);
    router.shutdown.cancel();
    router.finished().await;
}

/// Two replicas as in a cluster: the same scaler port on two addresses (127.0.0.2 and
/// 127.0.0.3), each listing both as peers (what a headless Service resolves to), each
/// recognising and skipping itself.
async fn two_replicas(
    dns: &DnsServer,
    daemon_port: u16,
    tweak: impl Fn(&mut RunConfig),
) -> Vec<Running> {
    let port = std::net::TcpListener::bind("127.0.0.2:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let peers = vec![format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}")];
    let mut replicas = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let listen = format!("{ip}:{port}").parse().unwrap();
        replicas.push(
            router(dns, daemon_port, listen, |cfg| {
                cfg.scaler.scaler_peers = peers.clone();
                tweak(cfg);
            })
            .await,
        );
    }
    replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_replica_counts_every_replicas_queued_builds() {
    let dns = DnsServer::start(Behaviour::NxDomain).await;
    let daemon = FakeDaemon::start("buildkitd-0", DaemonOpts::default()).await;
    let replicas = two_replicas(&dns, daemon.addr().port(), |_| {}).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let mut keda_a = Keda::connect(scaler_addr(a)).await;
    let mut keda_b = Keda::connect(scaler_addr(b)).await;
    let mut stream_a = keda_a.stream().await;
    assert!(!next_push(&mut stream_a).await);

    // A build queued on B only: KEDA, talking to A, is pushed true (once A follows B: at start
    // each replica retries the other with a backoff until it is up).
    for replica in [a, b] {
        let scaler = &replica.scaler.as_ref().unwrap().scaler;
        tokio::time::timeout(Duration::from_secs(20), async {
            while scaler.peers_following() != 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("each replica follows the other");
    }
    let client_b = Client::connect(b.addr).await.expect("connect");
    let started = Instant::now();
    let mut builds = vec![{
        let client = client_b.clone();
        tokio::spawn(async move { client.build(BuildOpts::buildctl()).await })
    }];
    expect_push_true(
        &mut stream_a,
        started,
        "a build was sent to the other replica",
    )
    .await;

    builds.push(tokio::spawn(async move {
        client_b.build(BuildOpts::buildctl()).await
    }));
    let client_a = Client::connect(a.addr).await.expect("connect");
    builds.push(tokio::spawn(async move {
        client_a.build(BuildOpts::buildctl()).await
    }));
    wait_queued(a, 1).await;
    wait_queued(b, 2).await;
    assert_eq!(
        keda_a.metric().await,
        3,
        "A counts its own and B's queued builds"
    );
    assert_eq!(
        keda_b.metric().await,
        3,
        "B counts its own and A's queued builds"
    );

    dns.set(Behaviour::Addresses(vec!["127.0.0.1".parse().unwrap()]));
    for build in builds {
        let result = finish(build).await;
        assert!(result.ok(), "{result:#?}");
    }
    assert_eq!(keda_a.metric().await, 0);
    assert_eq!(keda_b.metric().await, 0);
    for replica in replicas {
        replica.shutdown.cancel();
        replica.finished().await;
    }
}

/// The scaler over TLS: KEDA connects with the CA, plain HTTP/2 is refused, and the replicas
/// reach each other over TLS (verifying the peers' certificate with --scaler-peer-ca).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaler_speaks_tls_to_keda_and_between_replicas() {
    let pki = support::tls::TestPki::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    };
    let (ca, cert, key) = (
        write("ca.pem", &pki.ca_pem),
        write("scaler.pem", &pki.server.cert_pem),
        write("scaler-key.pem", &pki.server.key_pem),
    );
    let dns = DnsServer::start(Behaviour::NxDomain).await;
    let daemon = FakeDaemon::start("buildkitd-0", DaemonOpts::default()).await;
    let replicas = two_replicas(&dns, daemon.addr().port(), |cfg| {
        cfg.scaler.scaler_tls_cert = Some(cert.clone());
        cfg.scaler.scaler_tls_key = Some(key.clone());
        cfg.scaler.scaler_peer_ca = Some(ca.clone());
        // The certificate names localhost, not each replica's address.
        cfg.scaler.scaler_peer_server_name = Some("localhost".into());
    })
    .await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let mut plain = Keda::connect(scaler_addr(a)).await;
    assert!(
        plain.client.get_metric_spec(Keda::object()).await.is_err(),
        "a TLS scaler refuses plain HTTP/2"
    );
    let mut keda = Keda::connect_tls(scaler_addr(a), pki.client_config(true, false)).await;
    assert_eq!(keda.metric().await, 0);

    let client_b = Client::connect(b.addr).await.expect("connect");
    let build = tokio::spawn(async move { client_b.build(BuildOpts::buildctl()).await });
    wait_queued(b, 1).await;
    assert_eq!(keda.metric().await, 1, "A asked B over TLS");
    assert!(keda.is_active().await);

    dns.set(Behaviour::Addresses(vec!["127.0.0.1".parse().unwrap()]));
    let result = finish(build).await;
    assert!(result.ok(), "{result:#?}");
    for replica in replicas {
        replica.shutdown.cancel();
        replica.finished().await;
    }
}
