//! End to end: rebuilds of one repository through the real router land on one fake daemon
//! while it has room, and spill to the same next daemon when it has none.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use buildkit_router::app::{self, Running};
use buildkit_router::config::RunConfig;
use support::client::{BuildOpts, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};

async fn daemons(n: usize, opts: DaemonOpts) -> Vec<FakeDaemon> {
    FakeDaemon::start_pool(n, opts).await
}

async fn router_over(daemons: &[FakeDaemon], max_per_backend: Option<usize>) -> Running {
    let mut cfg = RunConfig::for_tests();
    cfg.backends = daemons.iter().map(FakeDaemon::url).collect();
    cfg.placement.max_builds_per_backend = max_per_backend;
    let running = app::start(cfg).await.expect("router starts");
    running.pool.wait_synced().await;
    running
}

fn owner(daemons: &[FakeDaemon], build_ref: &str) -> String {
    let owners: Vec<&str> = daemons
        .iter()
        .filter(|d| d.counters().served_build(build_ref))
        .map(|d| d.name())
        .collect();
    assert_eq!(owners.len(), 1, "{build_ref} reached {owners:?}");
    owners[0].to_owned()
}

fn repo_build(repo: &str) -> BuildOpts {
    let mut o = BuildOpts::buildx();
    o.frontend_attrs.insert("vcs:source".into(), repo.into());
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilds_of_one_repository_land_on_one_daemon() {
    let ds = daemons(4, DaemonOpts::default()).await;
    let router = router_over(&ds, None).await;
    let client = Client::connect(router.addr).await.expect("connect");
    // Different URL spellings of the same repository are one project.
    let spellings = [
        "https://git.example.com/team/app.git",
        "git@git.example.com:team/app.git",
        "https://Git.Example.com/team/app",
    ];
    let mut homes = Vec::new();
    for i in 0..6 {
        let r = client.build(repo_build(spellings[i % 3])).await;
        assert!(r.ok(), "{:#?}", r.errors());
        homes.push(owner(&ds, &r.build_ref));
    }
    homes.dedup();
    assert_eq!(homes.len(), 1, "rebuilds moved: {homes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_home_spills_to_the_same_next_daemon_every_time() {
    let opts = DaemonOpts {
        build_duration: Some(Duration::from_millis(1500)),
        ..DaemonOpts::default()
    };
    let ds = daemons(4, opts).await;
    let router = router_over(&ds, Some(1)).await;
    let client = Client::connect(router.addr).await.expect("connect");
    let repo = "https://git.example.com/team/app.git";
    let mut pairs = Vec::new();
    for _ in 0..2 {
        let first = tokio::spawn({
            let client = client.clone();
            async move { client.build(repo_build(repo)).await }
        });
        // Let the first build take its home's only slot.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let second = client.build(repo_build(repo)).await;
        let first = first.await.expect("join");
        assert!(
            first.ok() && second.ok(),
            "{:#?} {:#?}",
            first.errors(),
            second.errors()
        );
        let (home, spill) = (owner(&ds, &first.build_ref), owner(&ds, &second.build_ref));
        assert_ne!(home, spill, "the home was full");
        pairs.push((home, spill));
    }
    assert_eq!(pairs[0], pairs[1], "spill order is deterministic");
}
