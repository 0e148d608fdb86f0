//! The `content` affinity key through the real router, with the fake client and daemons: a
//! build that names no project is keyed by its own Dockerfile, which the router reads through
//! the client's FileSync before placing it. Different Dockerfiles get different homes, a
//! rebuild with another context keeps its home, and a client that refuses or ignores the
//! router's read still builds, placed on load, with the daemon receiving everything as before.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use buildkit_router::app::{self, Running};
use buildkit_router::config::RunConfig;
use buildkit_router::placement::dockerfile::{fingerprint, instructions};
use buildkit_router::placement::key::content_key;
use buildkit_router::placement::{BuildTraits, Node, Placement};
use support::client::{BuildOpts, BuildResult, Client, FirstRead};
use support::fake_daemon::{DaemonOpts, FakeDaemon};

async fn daemons(n: usize) -> Vec<FakeDaemon> {
    FakeDaemon::start_pool(n, DaemonOpts::default()).await
}

async fn router_over(daemons: &[FakeDaemon], timeout: Duration) -> Running {
    let mut cfg = RunConfig::for_tests();
    cfg.backends = daemons.iter().map(FakeDaemon::url).collect();
    cfg.content.content_key_timeout = timeout;
    let running = app::start(cfg).await.expect("router starts");
    running.pool.wait_synced().await;
    running
}

/// `buildctl build --frontend dockerfile.v0 --local context=. --local dockerfile=.` with no
/// image name, cache ref or git information: nothing but the content to key on.
fn keyless(dockerfile: &str) -> BuildOpts {
    let mut o = BuildOpts::buildctl();
    o.exporter = None;
    o.dockerfile = Some(dockerfile.to_owned());
    o
}

fn owner(daemons: &[FakeDaemon], r: &BuildResult) -> usize {
    let owners: Vec<usize> = (0..daemons.len())
        .filter(|&i| daemons[i].counters().served_build(&r.build_ref))
        .collect();
    assert_eq!(owners.len(), 1, "{} reached {owners:?}", r.build_ref);
    owners[0]
}

/// A daemon as placement sees it in an idle pool.
struct Idle(String);

impl Node for Idle {
    fn identity(&self) -> &str {
        &self.0
    }
    fn active_builds(&self) -> usize {
        0
    }
    fn accepts_builds(&self) -> bool {
        true
    }
    fn capacity(&self) -> Option<usize> {
        None
    }
    fn supports_platform(&self, _: &str) -> bool {
        true
    }
    fn platforms(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The daemon (index) an idle pool gives the content key of `dockerfile` built for
/// linux/amd64, by the router's own placement code; backend identities come from /status.
async fn predicted_home(router: &Running, daemons: &[FakeDaemon], dockerfile: &str) -> usize {
    let status: serde_json::Value =
        serde_json::from_str(&support::admin_get(router.admin_addr, "/status").await)
            .expect("status json");
    let nodes: Vec<Idle> = status["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| Idle(b["identity"].as_str().expect("identity").to_owned()))
        .collect();
    let traits = BuildTraits {
        key: Some(content_key(
            &fingerprint(&instructions(dockerfile)),
            "",
            &["linux/amd64".to_owned()],
        )),
        ..Default::default()
    };
    let choice = Placement::default()
        .choose(&nodes, &traits)
        .expect("a home");
    let identity = &nodes[choice.index].0;
    daemons
        .iter()
        .position(|d| identity.contains(&d.addr().to_string()))
        .expect("identity names a daemon")
}

use support::metric_value as metric;

/// Small projects as they are found in the wild, each in a few commits.
const GO_SERVICE: &str = "# syntax=docker/dockerfile:1\n\
FROM golang:1.21-alpine AS build\nWORKDIR /src\nCOPY go.mod go.sum ./\nRUN go mod download\n\
COPY . .\nRUN go build -o /out/api ./cmd/api\n\
FROM alpine:3.18\nCOPY --from=build /out/api /usr/bin/api\nEXPOSE 8080\nENTRYPOINT [\"/usr/bin/api\"]\n";
/// The next commit: Go and Alpine bumped, a build flag added, a package installed.
const GO_SERVICE_NEXT: &str = "# syntax=docker/dockerfile:1\n\
FROM golang:1.22-alpine AS build\nWORKDIR /src\nCOPY go.mod go.sum ./\nRUN go mod download\n\
COPY . .\nRUN go build -trimpath -o /out/api ./cmd/api\n\
FROM alpine:3.20\nRUN apk add --no-cache ca-certificates\n\
COPY --from=build /out/api /usr/bin/api\nEXPOSE 8080\nENTRYPOINT [\"/usr/bin/api\"]\n";
const CANDIDATES: [&str; 6] = [
    "FROM node:20-slim\nWORKDIR /app\nCOPY package*.json ./\nRUN npm ci\nCOPY . .\nEXPOSE 3000\nCMD [\"node\", \"server.js\"]\n",
    "FROM python:3.12-slim\nWORKDIR /app\nCOPY requirements.txt .\nRUN pip install -r requirements.txt\nCOPY . .\nCMD [\"python\", \"-m\", \"worker\"]\n",
    "FROM eclipse-temurin:21-jre\nCOPY build/libs/billing-1.4.2.jar app.jar\nENTRYPOINT [\"java\", \"-jar\", \"/app.jar\"]\n",
    "FROM nginx:1.25\nCOPY dist/ /usr/share/nginx/html/\nEXPOSE 80\n",
    "FROM rust:1.79 AS build\nWORKDIR /src\nCOPY . .\nRUN cargo build --release\nFROM debian:bookworm-slim\nCOPY --from=build /src/target/release/indexer /usr/local/bin/\nCMD [\"indexer\"]\n",
    "FROM ruby:3.3\nWORKDIR /app\nCOPY Gemfile Gemfile.lock ./\nRUN bundle install\nCOPY . .\nCMD [\"bundle\", \"exec\", \"puma\"]\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_dockerfiles_get_different_homes_and_a_changed_context_keeps_its_home() {
    let ds = daemons(3).await;
    let router = router_over(&ds, Duration::from_millis(500)).await;
    let client = Client::connect(router.addr).await.expect("connect");

    // A project, and another whose home differs from the first's (by the router's own
    // placement code: homes depend on the daemons' identities, which are ports here).
    let home_a = predicted_home(&router, &ds, GO_SERVICE).await;
    let mut other = None;
    for df in CANDIDATES {
        if predicted_home(&router, &ds, df).await != home_a {
            other = Some(df);
            break;
        }
    }
    let other = other.expect("six projects cannot all share one home of three");
    let home_b = predicted_home(&router, &ds, other).await;

    let a = client.build(keyless(GO_SERVICE)).await;
    assert!(a.ok(), "{:#?}", a.errors());
    assert_eq!(owner(&ds, &a), home_a, "keyed by its Dockerfile");
    let b = client.build(keyless(other)).await;
    assert!(b.ok(), "{:#?}", b.errors());
    assert_eq!(owner(&ds, &b), home_b);
    assert_ne!(home_a, home_b);

    // The next commit of the first project: another context, a build-arg changed, and a
    // Dockerfile whose versions and RUN steps moved on. Same project, same home.
    let mut next = keyless(GO_SERVICE_NEXT);
    next.context_size = 3 << 20;
    next.frontend_attrs
        .insert("build-arg:FOO".into(), "another value".into());
    let a2 = client.build(next).await;
    assert!(a2.ok(), "{:#?}", a2.errors());
    assert_eq!(owner(&ds, &a2), home_a, "the rebuild kept its home");

    // Nothing changed for the daemon: it read the whole Dockerfile and context itself.
    for (r, text) in [(&a, GO_SERVICE), (&b, other), (&a2, GO_SERVICE_NEXT)] {
        let d = &ds[owner(&ds, r)];
        let session = d.counters().session(&r.session_id).expect("session");
        assert_eq!(String::from_utf8_lossy(&session.dockerfile), text);
        assert_eq!(session.corrupt_packets, 0);
        // The client served the router's read and the daemon's.
        assert_eq!(r.tunnel.dockerfile_reads, 2, "{:?}", r.tunnel);
    }
    assert_eq!(
        a2.tunnel.bytes_uploaded,
        (3 << 20) + GO_SERVICE_NEXT.len() as u64 * 2
    );

    let metrics = support::admin_get(router.admin_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "buildkit_router_affinity_key_source_total{source=\"content\"}"
        ),
        3
    );
    assert_eq!(
        metric(
            &metrics,
            "buildkit_router_content_key_reads_total{outcome=\"ok\"}"
        ),
        3
    );
}

/// A client that refuses the router's read (PERMISSION_DENIED), and one that never answers it:
/// both builds succeed, placed without a content key, and the daemon's own Dockerfile read is
/// served in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_refuses_or_ignores_the_read_still_builds() {
    let ds = daemons(2).await;
    let router = router_over(&ds, Duration::from_millis(300)).await;
    let client = Client::connect(router.addr).await.expect("connect");
    for (how, outcome) in [
        (FirstRead::Refuse, "refused"),
        (FirstRead::Stall, "timeout"),
    ] {
        let mut o = keyless(GO_SERVICE);
        o.first_dockerfile_read = how;
        let r = client.build(o).await;
        assert!(r.ok(), "{how:?}: {:#?}", r.errors());
        let session = ds[owner(&ds, &r)]
            .counters()
            .session(&r.session_id)
            .expect("session");
        assert_eq!(String::from_utf8_lossy(&session.dockerfile), GO_SERVICE);
        let metrics = support::admin_get(router.admin_addr, "/metrics").await;
        assert_eq!(
            metric(
                &metrics,
                &format!("buildkit_router_content_key_reads_total{{outcome=\"{outcome}\"}}")
            ),
            1,
            "{how:?}"
        );
    }
    let metrics = support::admin_get(router.admin_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "buildkit_router_affinity_key_source_total{source=\"none\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &metrics,
            "buildkit_router_affinity_key_source_total{source=\"content\"}"
        ),
        0
    );
    // No session or read is left behind.
    assert_eq!(
        metric(&metrics, "buildkit_router_sessions{phase=\"held\"}")
            + metric(&metrics, "buildkit_router_sessions{phase=\"relayed\"}")
            + metric(
                &metrics,
                "buildkit_router_sessions{phase=\"passed_through\"}"
            )
            + metric(&metrics, "buildkit_router_sessions{phase=\"placing\"}"),
        0
    );
}

/// Builds that carry a key, and buildx's probe, are never read: the client serves only the
/// daemon's read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_builds_and_probes_are_not_read() {
    let ds = daemons(2).await;
    let router = router_over(&ds, Duration::from_millis(500)).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let probe = client.build(BuildOpts::probe()).await;
    assert!(probe.ok(), "{:#?}", probe.errors());
    let mut named = BuildOpts::buildctl();
    named.dockerfile = Some(GO_SERVICE.to_owned());
    let r = client.build(named).await;
    assert!(r.ok(), "{:#?}", r.errors());
    assert_eq!(r.tunnel.dockerfile_reads, 1);
    let metrics = support::admin_get(router.admin_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "buildkit_router_affinity_key_source_total{source=\"image\"}"
        ),
        1
    );
    for outcome in buildkit_router::content::OUTCOMES {
        assert_eq!(
            metric(
                &metrics,
                &format!("buildkit_router_content_key_reads_total{{outcome=\"{outcome}\"}}")
            ),
            0
        );
    }
}

/// A running build keyed by its content shows it in /status: source `content` and the key's
/// hash, as for the other sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_content_key_of_a_running_build() {
    let ds = FakeDaemon::start_pool(
        1,
        DaemonOpts {
            hold_builds: true,
            ..DaemonOpts::default()
        },
    )
    .await;
    let router = router_over(&ds, Duration::from_millis(500)).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let build = tokio::spawn(async move { client.build(keyless(GO_SERVICE)).await });
    ds[0].wait_held(1).await;
    let status: serde_json::Value =
        serde_json::from_str(&support::admin_get(router.admin_addr, "/status").await)
            .expect("status json");
    let running = &status["builds"][0];
    assert_eq!(running["key_source"], "content", "{status}");
    let key = content_key(
        &fingerprint(&instructions(GO_SERVICE)),
        "",
        &["linux/amd64".to_owned()],
    );
    assert_eq!(running["key_hash"], format!("{:016x}", key.hash));
    ds[0].release_builds();
    let r = build.await.unwrap();
    assert!(r.ok(), "{:#?}", r.errors());
}
