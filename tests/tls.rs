//! TLS on both sides of the router: buildctl offers ALPN h2, buildx's remote driver offers no
//! ALPN at all, mTLS requires a client certificate, and daemons may require the router's.
#![forbid(unsafe_code)]

mod support;

use std::path::PathBuf;

use buildkit_router::app::{self, Running};
use buildkit_router::config::RunConfig;
use support::client::{BuildOpts, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use support::tls::TestPki;

struct Files {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write_pki(pki: &TestPki) -> Files {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    };
    Files {
        ca: write("ca.pem", &pki.ca_pem),
        server_cert: write("server.pem", &pki.server.cert_pem),
        server_key: write("server-key.pem", &pki.server.key_pem),
        client_cert: write("client.pem", &pki.client.cert_pem),
        client_key: write("client-key.pem", &pki.client.key_pem),
        _dir: dir,
    }
}

async fn tls_router(daemon: &FakeDaemon, files: &Files, mtls: bool) -> Running {
    let mut cfg = RunConfig::for_tests();
    cfg.backends = vec![daemon.url()];
    cfg.tls_cert = Some(files.server_cert.clone());
    cfg.tls_key = Some(files.server_key.clone());
    cfg.tls_client_ca = mtls.then(|| files.ca.clone());
    let running = app::start(cfg).await.expect("router starts");
    running.pool.wait_synced().await;
    running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_buildctl_with_alpn_and_buildx_without_alpn() {
    let pki = TestPki::generate();
    let files = write_pki(&pki);
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = tls_router(&daemon, &files, false).await;
    for alpn in [true, false] {
        let client = Client::connect_tls(router.addr, pki.client_config(alpn, false), "localhost")
            .await
            .expect("TLS connect");
        let result = client.build(BuildOpts::buildctl()).await;
        assert!(result.ok(), "alpn={alpn}: {:#?}", result.errors());
    }
    assert_eq!(daemon.counters().calls("Solve"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_signed_by_the_ca() {
    let pki = TestPki::generate();
    let files = write_pki(&pki);
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = tls_router(&daemon, &files, true).await;
    let with_cert = Client::connect_tls(router.addr, pki.client_config(false, true), "localhost")
        .await
        .expect("mTLS connect");
    let result = with_cert.build(BuildOpts::buildctl()).await;
    assert!(result.ok(), "{:#?}", result.errors());

    // Without a certificate the handshake fails (TLS 1.3 may report it on first use).
    let rejected =
        match Client::connect_tls(router.addr, pki.client_config(true, false), "localhost").await {
            Err(_) => true,
            Ok(client) => client.list_workers().await.is_err(),
        };
    assert!(rejected, "a client without a certificate must be refused");
    assert_eq!(
        daemon.counters().calls("Solve"),
        1,
        "nothing from the refused client reached the daemon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_over_mtls_with_the_routers_client_certificate() {
    let pki = TestPki::generate();
    let files = write_pki(&pki);
    let daemon = FakeDaemon::start(
        "bk0",
        DaemonOpts {
            tls: Some(pki.server_config(true)),
            ..DaemonOpts::default()
        },
    )
    .await;
    let mut cfg = RunConfig::for_tests();
    cfg.backends = vec![format!("tls://{}?server-name=localhost", daemon.addr())];
    cfg.backend_tls_ca = Some(files.ca.clone());
    cfg.backend_tls_cert = Some(files.client_cert.clone());
    cfg.backend_tls_key = Some(files.client_key.clone());
    let router = app::start(cfg).await.expect("router starts");
    router.pool.wait_synced().await;
    let client = Client::connect(router.addr).await.expect("connect");
    let result = client.build(BuildOpts::buildctl()).await;
    assert!(result.ok(), "{:#?}", result.errors());
    assert_eq!(daemon.counters().calls("Solve"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_tls_files_fail_startup_with_the_path() {
    let mut cfg = RunConfig::for_tests();
    cfg.backends = vec!["tcp://127.0.0.1:1".into()];
    cfg.tls_cert = Some("/nonexistent/cert.pem".into());
    cfg.tls_key = Some("/nonexistent/key.pem".into());
    let error = app::start(cfg)
        .await
        .err()
        .expect("startup fails")
        .to_string();
    assert!(error.contains("/nonexistent/cert.pem"), "{error}");
}
