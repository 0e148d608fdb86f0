//! Soak: many builds through the router over four fake daemons while faults are injected at
//! random: daemons killed and restarted at the same address, daemons frozen briefly (their
//! sessions stall) or long enough to be declared dead, client cancels at random moments and
//! resets mid-upload, and discovery re-lists and drain flaps (what a dropped watch and a rollout
//! look like to the pool). It asserts what a user would notice:
//! - 0 calls misrouted: every call of a build reached the daemon (address) that got its Solve;
//! - 0 hangs: every build ended on its own (no client timer had to give up);
//! - every failed build failed with a precise status naming its cause;
//! - 0 registry entries left once the linger passed;
//! - resident memory back near its level after warm-up.
//!
//! CI runs it at a reduced size. `SOAK_BUILDS=10000 cargo test --release --test soak -- --nocapture`
//! runs the full size; `SOAK_SEED` replays a schedule. Figures: docs/reliability.md.
#![forbid(unsafe_code)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildkit_router::pool::{BackendAddress, EndpointSpec, EndpointState, PoolUpdate};
use rand::{Rng, SeedableRng};
use support::client::{BuildOpts, CallResult, CancelAt, Client};
use support::fake_daemon::{Counters, DaemonOpts, FakeDaemon};
use support::router_over;
use tonic::Code;

const DAEMONS: usize = 4;
const WORKERS: usize = 16;

/// One daemon address: the running incarnation, and the counters of every incarnation.
struct Slot {
    addr: SocketAddr,
    daemon: Option<FakeDaemon>,
    counters: Vec<Arc<Counters>>,
}

fn opts() -> DaemonOpts {
    DaemonOpts::default()
}

/// Resident set size of this process, in MiB (Linux).
fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// What ended a build, as the client saw it.
#[derive(Debug)]
enum Outcome {
    Ok {
        build_ref: String,
    },
    Cancelled,
    Failed {
        build_ref: String,
        calls: Vec<CallResult>,
    },
}

/// Texts that name the cause of a failure: the router's own messages, and the daemon errors
/// BuildKit itself gives when its session or job is gone with a daemon that died.
const PRECISE: &[&str] = &[
    "buildkit-router: ",
    "no such job",
    "no active session",
    "context canceled",
];

fn precise(call: &CallResult) -> bool {
    PRECISE.iter().any(|p| call.message.contains(p))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_survive_random_daemon_kills_freezes_cancels_and_discovery_flaps() {
    let builds: usize = std::env::var("SOAK_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("soak: {builds} builds, seed {seed} (SOAK_SEED={seed} replays the fault schedule)");

    let mut slots = Vec::new();
    for i in 0..DAEMONS {
        let daemon = FakeDaemon::start(&format!("bk{i}"), opts()).await;
        slots.push(Slot {
            addr: daemon.addr(),
            counters: vec![daemon.counters()],
            daemon: Some(daemon),
        });
    }
    let urls: Vec<String> = slots.iter().map(|s| format!("tcp://{}", s.addr)).collect();
    let daemons: Vec<&FakeDaemon> = slots.iter().filter_map(|s| s.daemon.as_ref()).collect();
    let router = router_over(&daemons, |cfg| {
        cfg.health_interval = Duration::from_millis(500);
        cfg.health_timeout = Duration::from_millis(300);
        cfg.health_failures = 2;
        cfg.build_linger = Duration::from_secs(1);
        // Unbound slots (a Status for a build cancelled before its Solve) expire after
        // 4 x (ref wait + bind window): 8 s here.
        cfg.ref_wait = Duration::from_secs(1);
        cfg.session_bind_window = Duration::from_secs(1);
        cfg.connect_timeout = Duration::from_millis(500);
    })
    .await;
    drop(daemons);
    let slots = Arc::new(Mutex::new(slots));

    // Warm-up: a few builds on every daemon, then the memory baseline.
    let client = Client::connect(router.addr).await.expect("connect");
    for _ in 0..8 {
        let r = client.build(BuildOpts::buildctl()).await;
        assert!(r.ok(), "warm-up: {:#?}", r.errors());
    }
    let rss_start = rss_mib();
    let started = std::time::Instant::now();

    // The fault injector.
    let done = Arc::new(AtomicBool::new(false));
    let faults: Arc<Mutex<BTreeMap<&'static str, usize>>> = Arc::default();
    let injector = tokio::spawn({
        let (slots, done, faults, pool) = (
            slots.clone(),
            done.clone(),
            faults.clone(),
            router.pool.clone(),
        );
        let urls = urls.clone();
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let spec = |url: &str, state| {
                let addr: SocketAddr = url.trim_start_matches("tcp://").parse().expect("addr");
                EndpointSpec {
                    identity: url.to_owned(),
                    address: BackendAddress::tcp(addr.ip().to_string(), addr.port()),
                    state,
                    zone: None,
                    node: None,
                }
            };
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..600))).await;
                let victim = rng.random_range(0..DAEMONS);
                let roll = rng.random_range(0..100);
                let kind = match roll {
                    0..30 => {
                        // Killed (RST on every connection), back at the same address soon.
                        let addr = {
                            let mut slots = slots.lock().unwrap();
                            if let Some(mut d) = slots[victim].daemon.take() {
                                d.kill();
                            }
                            slots[victim].addr
                        };
                        tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                        let daemon = FakeDaemon::start(
                            &format!("bk{victim}"),
                            DaemonOpts {
                                listen: Some(addr),
                                ..opts()
                            },
                        )
                        .await;
                        let mut slots = slots.lock().unwrap();
                        slots[victim].counters.push(daemon.counters());
                        slots[victim].daemon = Some(daemon);
                        "daemon killed and restarted"
                    }
                    30..55 => {
                        // A short stall: ejected, its sessions stall, nothing is ended.
                        let gate = slots.lock().unwrap()[victim].daemon.as_ref().map(|d| {
                            d.freeze();
                            victim
                        });
                        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
                        if gate.is_some() {
                            if let Some(d) = slots.lock().unwrap()[victim].daemon.as_ref() {
                                d.thaw();
                            }
                        }
                        "daemon stalled briefly"
                    }
                    55..65 => {
                        // Frozen long enough to be declared dead, then back.
                        if let Some(d) = slots.lock().unwrap()[victim].daemon.as_ref() {
                            d.freeze();
                        }
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        if let Some(d) = slots.lock().unwrap()[victim].daemon.as_ref() {
                            d.thaw();
                        }
                        "daemon frozen until declared dead"
                    }
                    65..80 => {
                        // A watch that dropped and re-listed: the same set again.
                        pool.apply(PoolUpdate::Reset(
                            urls.iter().map(|u| spec(u, EndpointState::Ready)).collect(),
                        ));
                        "discovery re-list"
                    }
                    _ => {
                        // A rollout flap: terminating, then ready again.
                        pool.apply(PoolUpdate::Update(spec(
                            &urls[victim],
                            EndpointState::Draining,
                        )));
                        tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
                        pool.apply(PoolUpdate::Update(spec(
                            &urls[victim],
                            EndpointState::Ready,
                        )));
                        "backend draining then ready"
                    }
                };
                *faults.lock().unwrap().entry(kind).or_default() += 1;
            }
            // Leave every daemon running and thawed.
            let slots = slots.lock().unwrap();
            for slot in slots.iter() {
                if let Some(d) = slot.daemon.as_ref() {
                    d.thaw();
                }
            }
        }
    });

    // The clients: WORKERS at a time, each build on its own connection or a shared one.
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    // (builds started, RSS MiB): a leak grows with the count, a high-water mark levels off.
    let rss_samples: Arc<Mutex<Vec<(usize, f64)>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (next, outcomes, rss_samples) = (next.clone(), outcomes.clone(), rss_samples.clone());
        let addr = router.addr;
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (w as u64 + 1) << 32);
            let client = Client::connect(addr).await.expect("connect");
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= builds {
                    break;
                }
                if n % 1000 == 0 {
                    rss_samples.lock().unwrap().push((n, rss_mib()));
                }
                let mut opts = if rng.random_range(0..4) == 0 {
                    BuildOpts::buildx()
                } else {
                    BuildOpts::buildctl()
                };
                opts.context_size = rng.random_range(1..256) * 1024;
                opts.drain_timeout = Duration::from_secs(20);
                let roll = rng.random_range(0..100);
                let cancel = std::sync::Arc::new(tokio::sync::Notify::new());
                if roll < 8 {
                    opts.cancel = Some(CancelAt::Signal(cancel.clone()));
                    let delay = Duration::from_millis(rng.random_range(0..150));
                    let cancel = cancel.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        cancel.notify_one();
                    });
                } else if roll < 12 {
                    // Reset mid-stream: the Solve is cancelled once the upload is done.
                    opts.cancel = Some(CancelAt::AfterUpload);
                }
                let result = client.build(opts).await;
                let outcome = if result.cancelled {
                    Outcome::Cancelled
                } else if result.ok() {
                    Outcome::Ok {
                        build_ref: result.build_ref.clone(),
                    }
                } else {
                    Outcome::Failed {
                        build_ref: result.build_ref.clone(),
                        calls: result.errors().into_iter().cloned().collect(),
                    }
                };
                outcomes.lock().unwrap().push(outcome);
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    injector.await.expect("injector");

    // After the faults: everything still works, and the registry empties after the linger.
    let after = client.build(BuildOpts::buildctl()).await;
    assert!(after.ok(), "a build after the soak: {:#?}", after.errors());
    // Every entry expires by the unbound expiry (8 s) at the latest; sweep until then.
    let linger_started = std::time::Instant::now();
    let mut left = router.registry.len();
    while left != (0, 0) && linger_started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        router.registry.sweep();
        left = router.registry.len();
    }
    eprintln!(
        "soak: registry empty {:.1} s after the last build",
        linger_started.elapsed().as_secs_f64()
    );
    let running = router.registry.running_builds();

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let mut ok = 0;
    let mut cancelled = 0;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut imprecise = Vec::new();
    let mut hangs = Vec::new();
    let mut refs = Vec::new();
    for o in &outcomes {
        match o {
            Outcome::Ok { build_ref } => {
                ok += 1;
                refs.push(build_ref.clone());
            }
            Outcome::Cancelled => cancelled += 1,
            Outcome::Failed { build_ref, calls } => {
                refs.push(build_ref.clone());
                for call in calls {
                    if call.code == Code::DeadlineExceeded
                        && call.message.contains("client gave up")
                    {
                        hangs.push((build_ref.clone(), call.clone()));
                        continue;
                    }
                    // The frontend's calls the client cancelled after its Solve failed.
                    if call.message.contains("cancelled by the client") {
                        continue;
                    }
                    let key = format!("{:?}: {}", call.code, shape(&call.message));
                    *failures.entry(key).or_default() += 1;
                    if !precise(call) {
                        imprecise.push((build_ref.clone(), call.clone()));
                    }
                }
            }
        }
    }

    // Misrouting: a call of a build reached a daemon address other than the one that got its
    // Solve (or two daemons got its Solve). The router's lookups for a ref it does not know
    // (a Status or history call whose Solve never reached a daemon: asked of every daemon, by
    // design) are not routing; they are counted apart.
    let slots = slots.lock().unwrap();
    let mut misrouted = Vec::new();
    let mut never_placed = 0;
    for r in &refs {
        let mut at: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (i, slot) in slots.iter().enumerate() {
            for counters in &slot.counters {
                at.entry(i).or_default().extend(
                    counters
                        .methods_for(r)
                        .into_iter()
                        .filter(|m| m != "ListenBuildHistory"),
                );
            }
        }
        at.retain(|_, methods| !methods.is_empty());
        let solved: Vec<usize> = at
            .iter()
            .filter(|(_, m)| m.iter().any(|m| m == "Solve"))
            .map(|(i, _)| *i)
            .collect();
        match solved.as_slice() {
            [] => never_placed += 1,
            [home] if at.keys().all(|i| i == home) => {}
            _ => misrouted.push((r.clone(), at)),
        }
    }
    let rss_end = rss_mib();

    eprintln!(
        "soak: {} builds in {:.1} s ({:.0} builds/s): {ok} ok, {cancelled} cancelled by their client, {} failed",
        outcomes.len(),
        elapsed.as_secs_f64(),
        outcomes.len() as f64 / elapsed.as_secs_f64(),
        outcomes.len() - ok - cancelled
    );
    eprintln!("soak: faults injected: {:?}", faults.lock().unwrap());
    eprintln!(
        "soak: RSS (MiB) by builds started (the fakes' counters grow with every build too): {:?}",
        rss_samples
            .lock()
            .unwrap()
            .iter()
            .map(|(n, mib)| format!("{n}: {mib:.1}"))
            .collect::<Vec<_>>()
    );
    eprintln!("soak: failed calls by status: {failures:#?}");
    eprintln!(
        "soak: misrouted {}, hangs {}, imprecise {}, registry left {:?} (+{} running), RSS {:.1} -> {:.1} MiB; {never_placed} failed builds never reached a daemon",
        misrouted.len(),
        hangs.len(),
        imprecise.len(),
        left,
        running.len(),
        rss_start,
        rss_end
    );
    assert_eq!(outcomes.len(), builds);
    assert!(misrouted.is_empty(), "misrouted builds: {misrouted:?}");
    assert!(hangs.is_empty(), "builds that hung: {hangs:#?}");
    assert!(
        imprecise.is_empty(),
        "failures without a precise cause: {imprecise:#?}"
    );
    assert_eq!(left, (0, 0), "registry entries left after the linger");
    assert!(
        running.is_empty(),
        "builds still counted running: {running:?}"
    );
    assert!(
        ok * 2 > outcomes.len(),
        "most builds succeed despite the faults ({ok} of {})",
        outcomes.len()
    );
    assert!(
        rss_end < rss_start + 64.0 + rss_start * 0.25,
        "resident memory grew from {rss_start:.1} MiB to {rss_end:.1} MiB"
    );
}

/// A failure message with its refs, ports and numbers blanked, to group like failures.
fn shape(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut last_digit = false;
    for word in message.split(' ') {
        let bare = word.trim_end_matches([':', ',', ')']);
        let word = if bare.len() == 25 && bare.chars().all(|c| c.is_ascii_alphanumeric()) {
            "REF"
        } else {
            word
        };
        for c in word.chars() {
            if c.is_ascii_digit() {
                if !last_digit {
                    out.push('N');
                }
                last_digit = true;
            } else {
                out.push(c);
                last_digit = false;
            }
        }
        out.push(' ');
    }
    out.chars().take(160).collect()
}
