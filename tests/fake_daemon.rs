//! Tests of the fake buildkitd and the test client against each other, without the router:
//! they must behave like buildkitd, buildctl and buildx before the router is tested with them.
#![forbid(unsafe_code)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use buildkit_router::proto::control as pb;
use support::client::{BuildOpts, CancelAt, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon, Timers};
use support::tls::TestPki;
use tokio::sync::Notify;
use tonic::Code;

const MB2: u64 = 2 << 20;

async fn daemon(name: &str) -> (FakeDaemon, Client) {
    daemon_with(name, DaemonOpts::default()).await
}

async fn daemon_with(name: &str, opts: DaemonOpts) -> (FakeDaemon, Client) {
    let d = FakeDaemon::start(name, opts).await;
    let c = Client::connect(d.addr()).await.expect("connect");
    (d, c)
}

fn short_timers() -> Timers {
    Timers {
        session_wait: Duration::from_millis(300),
        status_wait: Duration::from_millis(300),
        bridge_wait: Duration::from_millis(300),
        ..Timers::default()
    }
}

#[tokio::test]
async fn buildctl_build_reaches_the_daemon_with_every_call() {
    let (d, c) = daemon("d0").await;
    let r = c.build(BuildOpts::buildctl()).await;
    assert!(r.ok(), "{r:#?}");
    let k = d.counters();
    for m in [
        "Solve",
        "Status",
        "LLBBridge/Ping",
        "LLBBridge/Solve",
        "LLBBridge/Return",
    ] {
        assert!(
            k.methods_for(&r.build_ref).iter().any(|x| x == m),
            "{m} missing: {:?}",
            k.methods_for(&r.build_ref)
        );
        assert_eq!(k.calls(m), 1, "{m}");
    }
    assert_eq!(k.calls("Session"), 1);
    let s = k.session(&r.session_id).expect("session seen");
    assert!(s.ended);
    assert!(s
        .methods
        .iter()
        .any(|m| m == "/moby.filesync.v1.FileSync/DiffCopy"));
    assert_eq!(
        s.tunnel_calls,
        [
            "/grpc.health.v1.Health/Check",
            "/moby.filesync.v1.FileSync/DiffCopy",
            "/moby.filesync.v1.FileSync/DiffCopy",
            "/moby.filesync.v1.FileSync/DiffCopy",
        ]
    );
    // The context (2 MiB) plus the Dockerfile (64 bytes), counted on both sides of the tunnel.
    assert_eq!(k.bytes_uploaded(), MB2 + 64);
    assert_eq!(r.tunnel.bytes_uploaded, MB2 + 64);
    assert!(r.tunnel.preface_received);
    assert!(r.status_messages >= 2, "{}", r.status_messages);
    assert!(r.exporter_response.contains_key("containerimage.digest"));
    assert_eq!(k.routing_errors(), 0);
    assert_eq!(k.cancels(), 0);
    assert_eq!(k.completed_refs(), std::slice::from_ref(&r.build_ref));
    assert_eq!(k.connections(), 1, "one connection for everything");
}

#[tokio::test]
async fn buildx_build_runs_probe_then_build_with_oci_export() {
    let (d, c) = daemon("d0").await;
    let r = c.buildx_build(BuildOpts::buildx()).await;
    assert!(r.ok(), "{r:#?}");
    let k = d.counters();
    assert_eq!(k.calls("ListWorkers"), 3);
    assert_eq!(k.calls("Solve"), 2);
    assert_eq!(k.calls("Session"), 2);
    assert_eq!(
        k.calls("LLBBridge/Solve"),
        1,
        "the probe has no frontend solve"
    );
    assert_eq!(k.calls("ListenBuildHistory"), 1);
    let probe_calls = k.methods_for(&r.probe.build_ref);
    for m in ["Solve", "Status", "LLBBridge/Ping", "LLBBridge/Return"] {
        assert!(probe_calls.iter().any(|x| x == m), "{m}: {probe_calls:?}");
    }
    let probe_session = k.session(&r.probe.session_id).expect("probe session");
    assert_eq!(probe_session.methods, ["/grpc.health.v1.Health/Check"]);
    assert!(probe_session.tunnel_calls.is_empty());
    assert_eq!(k.bytes_exported(), 1 << 20);
    assert_eq!(r.build.tunnel.bytes_exported, 1 << 20);
    assert_eq!(r.build.tunnel.filesend_calls, 1);
    assert!(r
        .build
        .exporter_response
        .contains_key("containerimage.digest"));
    let key = k.session(&r.build.session_id).unwrap().shared_key;
    assert!(key.starts_with("app:"), "{key}");
    assert_eq!(k.routing_errors(), 0);
    assert_eq!(k.connections(), 1);
    // Status and ListenBuildHistory answer with buildkit-current-timestamp (RFC 3339).
    let mut raw = buildkit_router::proto::control::control_client::ControlClient::new(c.channel());
    let resp = raw
        .listen_build_history(pb::BuildHistoryRequest {
            early_exit: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let ts = resp.metadata().get("buildkit-current-timestamp").unwrap();
    let ts = ts.to_str().unwrap();
    assert!(
        ts.len() == 30 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{ts}"
    );
}

#[tokio::test]
async fn bake_shares_one_session_between_two_targets() {
    let (d, c) = daemon("d0").await;
    let r = c.bake(2, 1 << 20).await;
    assert!(r.ok(), "{r:#?}");
    let k = d.counters();
    assert_eq!(k.calls("Solve"), 2);
    assert_eq!(k.calls("Session"), 3);
    let shared = k.session(&r.shared_session_id).expect("shared session");
    assert!(shared.shared_key.starts_with("bake:"));
    // Each target read its Dockerfile and context from the shared session.
    assert_eq!(shared.bytes_uploaded, 2 * ((1 << 20) + 64));
    for t in &r.targets {
        let own = k.session(&t.session_id).expect("target session");
        assert_eq!(own.bytes_uploaded, 0);
        assert!(own
            .tunnel_calls
            .contains(&"/moby.filesync.v1.FileSend/DiffCopy".to_string()));
        assert_eq!(t.tunnel.bytes_exported, 1 << 20);
    }
    assert_eq!(k.routing_errors(), 0);
}

#[tokio::test(start_paused = true)]
async fn status_of_unknown_ref_is_not_found_after_6s() {
    let (d, c) = daemon("d0").await;
    let t0 = tokio::time::Instant::now();
    let e = c.status("nosuchref").await.expect_err("unknown ref");
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "no such job nosuchref");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(6) && waited < Duration::from_secs(7),
        "{waited:?}"
    );
    assert_eq!(d.counters().no_such_job(), 1);
}

#[tokio::test(start_paused = true)]
async fn bridge_call_for_unknown_ref_is_not_found_after_3s() {
    let (d, c) = daemon("d0").await;
    let t0 = tokio::time::Instant::now();
    let e = c.bridge_ping(Some("nosuchref")).await.expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "forwarding Ping: no such job nosuchref");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(d.counters().no_such_job(), 1);
}

#[tokio::test]
async fn bridge_call_without_buildid_header_is_rejected() {
    let (d, c) = daemon("d0").await;
    let e = c.bridge_ping(None).await.expect_err("no header");
    assert_eq!(e.code(), Code::Unknown);
    assert_eq!(e.message(), "forwarding Ping: no buildid found in context");
    assert_eq!(d.counters().no_buildid(), 1);
}

#[tokio::test]
async fn solve_naming_a_session_that_never_opens_fails_with_no_active_session() {
    let (d, c) = daemon_with(
        "d0",
        DaemonOpts {
            timers: short_timers(),
            ..DaemonOpts::default()
        },
    )
    .await;
    let mut o = BuildOpts::buildctl();
    o.open_session = false;
    let r = c.build(o.clone()).await;
    assert!(!r.ok());
    assert_eq!(r.solve.code, Code::Unknown);
    assert_eq!(
        r.solve.message,
        format!(
            "no active session for {}: context deadline exceeded",
            o.session_id
        )
    );
    // Status ends normally once the job failed.
    assert!(r.status.is_ok(), "{r:#?}");
    assert_eq!(d.counters().no_active_session(), 1);
}

#[tokio::test]
async fn client_cancel_is_seen_by_the_daemon() {
    let (d, c) = daemon_with(
        "d0",
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let mut o = BuildOpts::buildctl();
    o.cancel = Some(CancelAt::AfterUpload);
    let r = c.build(o).await;
    assert!(r.cancelled);
    assert_eq!(r.solve.code, Code::Cancelled);
    // As in the capture: Session and Status still end with OK.
    assert!(r.status.is_ok(), "{r:#?}");
    assert!(r.session.as_ref().unwrap().is_ok(), "{r:#?}");
    let k = d.counters();
    assert_eq!(k.cancels(), 1);
    assert_eq!(k.cancelled_refs(), std::slice::from_ref(&r.build_ref));
    assert!(k.completed_refs().is_empty());
}

#[tokio::test]
async fn held_build_completes_when_released() {
    let (d, c) = daemon_with(
        "d0",
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let build = tokio::spawn(async move { c.build(BuildOpts::buildctl()).await });
    d.wait_held(1).await;
    assert_eq!(d.held(), 1);
    d.release_builds();
    let r = build.await.unwrap();
    assert!(r.ok(), "{r:#?}");
}

#[tokio::test]
async fn cancel_on_signal_mid_build() {
    let (d, c) = daemon_with(
        "d0",
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let sig = Arc::new(Notify::new());
    let mut o = BuildOpts::buildx();
    o.cancel = Some(CancelAt::Signal(sig.clone()));
    let build = tokio::spawn(async move { c.build(o).await });
    d.wait_held(1).await;
    sig.notify_one();
    let r = build.await.unwrap();
    assert!(r.cancelled);
    assert_eq!(d.counters().cancels(), 1);
}

#[tokio::test]
async fn killed_daemon_fails_the_build_mid_way() {
    let (mut d, c) = daemon_with(
        "d0",
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let build = tokio::spawn(async move { c.build(BuildOpts::buildctl()).await });
    d.wait_held(1).await;
    d.kill();
    let r = build.await.unwrap();
    assert!(!r.ok());
    assert_ne!(r.solve.code, Code::Ok, "{r:#?}");
    assert_eq!(d.counters().cancels(), 0, "a kill is not a client cancel");
}

#[tokio::test]
async fn housekeeping_calls() {
    let (d, c) = daemon_with(
        "d7",
        DaemonOpts {
            platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
            ..DaemonOpts::default()
        },
    )
    .await;
    let w = c.list_workers().await.unwrap();
    assert_eq!(w.record.len(), 1);
    assert_eq!(w.record[0].platforms.len(), 2);
    assert_eq!(w.record[0].platforms[1].architecture, "arm64");
    let i = c.info().await.unwrap();
    assert_eq!(i.buildkit_version.unwrap().version, "v0.32.2");
    let du = c.disk_usage().await.unwrap();
    let ids: Vec<_> = du.record.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["d7-rec1", "d7-rec2"]);
    assert_eq!(c.prune().await.unwrap().len(), 2);
    // Nothing left: an empty stream (Trailers-Only OK).
    assert!(c.prune().await.unwrap().is_empty());
    assert!(c.disk_usage().await.unwrap().record.is_empty());

    let r = c.build(BuildOpts::buildctl()).await;
    assert!(r.ok(), "{r:#?}");
    let h = c
        .listen_build_history(pb::BuildHistoryRequest {
            early_exit: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].record.as_ref().unwrap().r#ref, r.build_ref);
    assert_eq!(h[0].r#type, pb::BuildHistoryEventType::Complete as i32);
    let active = c
        .listen_build_history(pb::BuildHistoryRequest {
            early_exit: true,
            active_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(active.is_empty());
    let probe = c
        .listen_build_history(pb::BuildHistoryRequest {
            r#ref: "buildx-test-history-api-feature".into(),
            early_exit: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(probe.is_empty());
    let e = c
        .update_build_history(pb::UpdateBuildHistoryRequest {
            r#ref: "nosuchref".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown ref");
    assert_eq!(e.code(), Code::Unknown);
    assert_eq!(
        e.message(),
        "failed to retrieve ref nosuchref: file does not exist"
    );
    c.update_build_history(pb::UpdateBuildHistoryRequest {
        r#ref: r.build_ref.clone(),
        delete: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(d.counters().calls("UpdateBuildHistory"), 2);
}

#[tokio::test]
async fn tls_with_and_without_alpn_and_mtls() {
    let pki = TestPki::generate();
    let d = FakeDaemon::start(
        "tls",
        DaemonOpts {
            tls: Some(pki.server_config(true)),
            ..DaemonOpts::default()
        },
    )
    .await;
    for alpn in [true, false] {
        let c = Client::connect_tls(d.addr(), pki.client_config(alpn, true), "localhost")
            .await
            .expect("connect");
        let r = c.build(BuildOpts::buildctl()).await;
        assert!(r.ok(), "alpn={alpn}: {r:#?}");
    }
    // Without a client certificate the handshake (or the first call) fails.
    let no_cert = async {
        let c = Client::connect_tls(d.addr(), pki.client_config(true, false), "localhost").await?;
        c.list_workers().await.map_err(|e| e.into())
    };
    let r: Result<_, Box<dyn std::error::Error>> = no_cert.await;
    assert!(r.is_err());
    assert_eq!(d.counters().calls("Solve"), 2);
}

#[tokio::test]
async fn daemon_health_checks_sessions_through_the_tunnel() {
    let (d, c) = daemon_with(
        "d0",
        DaemonOpts {
            hold_builds: true,
            timers: Timers {
                health_interval: Duration::from_millis(20),
                ..Timers::default()
            },
            ..DaemonOpts::default()
        },
    )
    .await;
    let o = BuildOpts::buildctl();
    let sid = o.session_id.clone();
    let build = tokio::spawn(async move { c.build(o).await });
    d.wait_held(1).await;
    d.wait_health_checks(&sid, 3).await;
    d.release_builds();
    let r = build.await.unwrap();
    assert!(r.ok(), "{r:#?}");
    let s = d.counters().session(&sid).unwrap();
    assert!(s.health_checks_ok >= 3, "{s:?}");
    assert_eq!(s.health_checks_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_builds_share_one_connection() {
    let (d, c) = daemon("d0").await;
    let builds = (0..32).map(|i| {
        let c = c.clone();
        let mut o = if i % 2 == 0 {
            BuildOpts::buildctl()
        } else {
            BuildOpts::buildx()
        };
        o.context_size = 256 << 10;
        tokio::spawn(async move { c.build(o).await })
    });
    let results = futures_util::future::join_all(builds).await;
    let k = d.counters();
    for r in results {
        let r = r.unwrap();
        assert!(r.ok(), "{r:#?}");
        assert_eq!(
            k.methods_for(&r.build_ref).len(),
            5,
            "{:?}",
            k.methods_for(&r.build_ref)
        );
        assert!(k.saw_session(&r.session_id));
    }
    assert_eq!(k.calls("Solve"), 32);
    assert_eq!(k.routing_errors(), 0);
    assert_eq!(k.connections(), 1);
}

#[tokio::test]
async fn client_gives_up_when_the_daemon_preface_never_comes() {
    let (d, c) = daemon_with(
        "d0",
        DaemonOpts {
            stall_sessions: true,
            timers: short_timers(),
            ..DaemonOpts::default()
        },
    )
    .await;
    let mut o = BuildOpts::buildctl();
    o.preface_timeout = Duration::from_millis(200);
    let r = c.build(o).await;
    let s = r.session.clone().unwrap();
    assert_eq!(s.code, Code::DeadlineExceeded, "{r:#?}");
    assert!(s.message.contains("no HTTP/2 preface"), "{s:?}");
    assert!(!r.ok());
    assert_eq!(d.counters().no_active_session(), 1);
}

/// Golden answers recorded from the real buildkitd v0.32.2 (`tests/real_buildkit.rs` compares
/// the fake with it live): history updates of unknown refs fail as BuildKit's bolt store does.
#[tokio::test]
async fn history_updates_of_unknown_refs_fail_as_buildkit_does() {
    let (_d, c) = daemon("d0").await;
    let update = |pinned: bool, delete: bool| {
        c.update_build_history(pb::UpdateBuildHistoryRequest {
            r#ref: "nosuchref".into(),
            pinned,
            delete,
            ..Default::default()
        })
    };
    // A fresh daemon has no history bucket yet.
    let e = update(true, false).await.expect_err("fresh daemon");
    assert_eq!(e.code(), Code::Unknown);
    assert_eq!(
        e.message(),
        "failed to retrieve bucket _records: file does not exist"
    );
    // Any history call opens it; then the ref itself is missing.
    c.listen_build_history(pb::BuildHistoryRequest {
        early_exit: true,
        ..Default::default()
    })
    .await
    .expect("history");
    let e = update(true, false).await.expect_err("unknown ref");
    assert_eq!(e.code(), Code::Unknown);
    assert_eq!(
        e.message(),
        "failed to retrieve ref nosuchref: file does not exist"
    );
}
