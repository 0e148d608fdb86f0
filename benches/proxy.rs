//! End-to-end cost of the router, as router/direct ratios measured in the same run.
//!
//! One fake buildkitd (tests/support) is reached two ways in one process: directly, and through
//! the in-process router (`app::start`). Everything shares one 2-worker tokio runtime, so the
//! figures include the CPU the router takes away from the client and the daemon.
//!
//! - `unary_1`: one caller on one HTTP/2 connection, `Control/ListWorkers` back to back.
//! - `unary_64`: 64 concurrent callers, each on its own HTTP/2 connection (64 connections to the
//!   daemon directly; 64 client connections to the router, which multiplexes them onto its one
//!   backend connection). Criterion's time is wall time per call (1 / throughput).
//! - `tunnel_256MiB`: a buildctl-like build whose Session tunnel carries a 256 MiB context
//!   (the daemon pulls it with FileSync/DiffCopy through the tunnel); criterion reports MiB/s.
//!   Through the router this is the Session relay path (src/session/relay.rs): the router
//!   terminates the inner HTTP/2 connection on both sides and relays each inner stream, so
//!   every context byte is decoded from the outer gRPC stream, crosses two h2 connections and is
//!   framed again. Issue 8's target: relay >= 0.9x direct.
//!
//! Criterion gives means. After it, a summary pass (only under `cargo bench`) measures per-call
//! latencies with `Instant`, alternating direct and router rounds so drift hits both alike, and
//! prints p50/p99 and router/direct ratios to stderr, plus the tunnel MiB/s of every build.
//!
//! `cargo bench --bench proxy` (filter as usual, e.g. `cargo bench --bench proxy -- unary`).
#![forbid(unsafe_code)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use buildkit_router::app::{self, Running};
use buildkit_router::config::RunConfig;
use criterion::{Criterion, Throughput};
use support::client::{BuildOpts, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use tokio::runtime::Runtime;

/// Concurrent callers of the `unary_64` benchmark.
const CALLERS: usize = 64;
/// Context bytes uploaded through the Session tunnel per build under `cargo bench`.
const TUNNEL_BYTES: usize = 256 << 20;
/// Per-call latency summary: rounds per path, alternating direct and router.
const ROUNDS: usize = 6;
/// Calls per round with one caller.
const CALLS_1: usize = 1500;
/// Calls per caller per round with 64 callers (64 x 40 = 2560 calls a round).
const CALLS_64: usize = 40;
/// Tunnel builds per path in the summary pass (on top of criterion's); more with
/// `PROXY_BENCH_TUNNEL_ROUNDS` on a noisy machine.
const TUNNEL_ROUNDS: usize = 3;

fn tunnel_rounds() -> usize {
    std::env::var("PROXY_BENCH_TUNNEL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(TUNNEL_ROUNDS)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Router,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Router => "router",
        }
    }
}

/// The daemon, the router in front of it, and the clients of both paths.
struct Env {
    daemon: FakeDaemon,
    router: Running,
    /// One client (one HTTP/2 connection) per path for the single caller.
    single: [Client; 2],
    /// `CALLERS` clients per path, one connection each.
    many: [Vec<Client>; 2],
}

impl Env {
    async fn start() -> Env {
        let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
        let mut cfg = RunConfig::for_tests();
        cfg.backends = vec![daemon.url()];
        let router = app::start(cfg).await.expect("router starts");
        router.pool.wait_synced().await;
        let addrs = [daemon.addr(), router.addr];
        let connect = |addr| async move { Client::connect(addr).await.expect("connect") };
        let single = [connect(addrs[0]).await, connect(addrs[1]).await];
        let mut many = [Vec::new(), Vec::new()];
        for (i, addr) in addrs.iter().enumerate() {
            for _ in 0..CALLERS {
                many[i].push(connect(*addr).await);
            }
        }
        let env = Env {
            daemon,
            router,
            single,
            many,
        };
        // Both paths answer before anything is timed.
        for path in [Path::Direct, Path::Router] {
            env.single(path).list_workers().await.expect("ListWorkers");
            for c in env.many(path) {
                c.list_workers().await.expect("ListWorkers");
            }
        }
        env
    }

    fn idx(path: Path) -> usize {
        match path {
            Path::Direct => 0,
            Path::Router => 1,
        }
    }

    fn single(&self, path: Path) -> &Client {
        &self.single[Self::idx(path)]
    }

    fn many(&self, path: Path) -> &[Client] {
        &self.many[Self::idx(path)]
    }
}

/// `calls` ListWorkers on `client`, one after another; each call's latency is pushed to `out`.
async fn unary_loop(client: Client, calls: usize, out: &mut Vec<Duration>) {
    for _ in 0..calls {
        let t = Instant::now();
        client.list_workers().await.expect("ListWorkers");
        out.push(t.elapsed());
    }
}

/// `CALLERS` concurrent callers doing `per_caller` calls each. Returns the wall time and every
/// call's latency.
async fn unary_concurrent(clients: &[Client], per_caller: usize) -> (Duration, Vec<Duration>) {
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|client| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_caller);
                unary_loop(client, per_caller, &mut lat).await;
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(per_caller * clients.len());
    for task in tasks {
        all.extend(task.await.expect("caller task"));
    }
    (start.elapsed(), all)
}

/// One build uploading `bytes` of context through the Session tunnel. Returns its wall time.
async fn tunnel_build(client: &Client, bytes: usize) -> Duration {
    let mut opts = BuildOpts::buildctl();
    opts.context_size = bytes;
    let t = Instant::now();
    let result = client.build(opts).await;
    let elapsed = t.elapsed();
    assert!(result.ok(), "build failed: {:#?}", result.errors());
    assert!(
        result.tunnel.bytes_uploaded >= bytes as u64,
        "only {} of {bytes} context bytes went through the tunnel",
        result.tunnel.bytes_uploaded
    );
    elapsed
}

/// Every tunnel build's duration, per path, from criterion's runs and the summary pass.
type TunnelLog = Arc<Mutex<[Vec<Duration>; 2]>>;

/// CPU time this process has used so far (user + system, all threads), from /proc/self/stat.
/// Unlike wall time it barely moves with other work on the machine, so the relay's cost per
/// build reads clearly even when throughput is noisy. `None` off Linux.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

fn criterion_benches(c: &mut Criterion, rt: &Runtime, env: &Arc<Env>, tunnel: &TunnelLog) {
    let tunnel_bytes = tunnel_bytes();

    let mut g = c.benchmark_group("unary_1");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    for path in [Path::Direct, Path::Router] {
        let client = env.single(path).clone();
        g.bench_function(path.name(), |b| {
            b.to_async(rt).iter(|| {
                let client = client.clone();
                async move { client.list_workers().await.expect("ListWorkers") }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group(format!("unary_{CALLERS}"));
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    for path in [Path::Direct, Path::Router] {
        let env = env.clone();
        g.bench_function(path.name(), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let env = env.clone();
                async move {
                    let per = (iters as usize).div_ceil(CALLERS);
                    let (wall, _) = unary_concurrent(env.many(path), per).await;
                    // Time per call, scaled back to the `iters` calls criterion asked for.
                    wall.mul_f64(iters as f64 / (per * CALLERS) as f64)
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group(format!("tunnel_{}MiB", tunnel_bytes >> 20));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(tunnel_bytes as u64));
    for path in [Path::Direct, Path::Router] {
        let env = env.clone();
        let log = tunnel.clone();
        g.bench_function(path.name(), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let env = env.clone();
                let log = log.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let d = tunnel_build(env.single(path), tunnel_bytes).await;
                        log.lock().unwrap()[Env::idx(path)].push(d);
                        total += d;
                    }
                    total
                }
            })
        });
    }
    g.finish();
}

fn is_bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn tunnel_bytes() -> usize {
    match std::env::var("PROXY_BENCH_TUNNEL_MIB") {
        Ok(v) => v.parse::<usize>().expect("PROXY_BENCH_TUNNEL_MIB: MiB") << 20,
        // `cargo test --benches` runs each benchmark once: keep that quick.
        Err(_) if !is_bench_mode() => 4 << 20,
        Err(_) => TUNNEL_BYTES,
    }
}

/// The name filter criterion was given, if any (first free argument).
fn filter() -> Option<String> {
    let mut args = std::env::args().skip(1);
    let mut found = None;
    while let Some(a) = args.next() {
        if a.starts_with('-') {
            // Criterion options that take a value.
            if matches!(
                a.as_str(),
                "--save-baseline"
                    | "--baseline"
                    | "--baseline-lenient"
                    | "--load-baseline"
                    | "--color"
                    | "--profile-time"
                    | "--output-format"
                    | "--plotting-backend"
                    | "--sample-size"
                    | "--warm-up-time"
                    | "--measurement-time"
                    | "--nresamples"
                    | "--noise-threshold"
                    | "--confidence-level"
                    | "--significance-level"
                    | "--format"
            ) {
                args.next();
            }
            continue;
        }
        found = Some(a);
        break;
    }
    found
}

fn wanted(group: &str) -> bool {
    filter().is_none_or(|f| group.contains(&f) || f.contains(group))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct LatencyRow {
    label: String,
    p50: [Duration; 2],
    p99: [Duration; 2],
    mean: [Duration; 2],
    calls_per_s: [f64; 2],
    samples: usize,
}

/// Alternating rounds of `callers` x `per_caller` calls on each path.
async fn latency_rows(env: &Env, label: &str, callers: usize, per_caller: usize) -> LatencyRow {
    let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut wall = [Duration::ZERO; 2];
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [Path::Direct, Path::Router]
        } else {
            [Path::Router, Path::Direct]
        };
        for path in order {
            let i = Env::idx(path);
            if callers == 1 {
                let start = Instant::now();
                unary_loop(env.single(path).clone(), per_caller, &mut lat[i]).await;
                wall[i] += start.elapsed();
            } else {
                let (w, l) = unary_concurrent(&env.many(path)[..callers], per_caller).await;
                wall[i] += w;
                lat[i].extend(l);
            }
        }
    }
    let mut row = LatencyRow {
        label: label.to_string(),
        p50: [Duration::ZERO; 2],
        p99: [Duration::ZERO; 2],
        mean: [Duration::ZERO; 2],
        calls_per_s: [0.0; 2],
        samples: lat[0].len(),
    };
    for i in 0..2 {
        lat[i].sort_unstable();
        row.p50[i] = pct(&lat[i], 0.50);
        row.p99[i] = pct(&lat[i], 0.99);
        row.mean[i] = lat[i].iter().sum::<Duration>() / lat[i].len() as u32;
        row.calls_per_s[i] = lat[i].len() as f64 / wall[i].as_secs_f64();
    }
    row
}

fn summary(rt: &Runtime, env: &Arc<Env>, tunnel: &TunnelLog) {
    let mut rows = Vec::new();
    if wanted("unary_1") {
        rows.push(rt.block_on(latency_rows(env, "1 caller, 1 conn", 1, CALLS_1)));
    }
    if wanted(&format!("unary_{CALLERS}")) {
        rows.push(rt.block_on(latency_rows(env, "64 callers, 64 conns", CALLERS, CALLS_64)));
    }
    let tunnel_group = format!("tunnel_{}MiB", tunnel_bytes() >> 20);
    let mut cpu = [Duration::ZERO; 2];
    let mut cpu_builds = [0u32; 2];
    if wanted(&tunnel_group) {
        rt.block_on(async {
            for round in 0..tunnel_rounds() {
                let order = if round % 2 == 0 {
                    [Path::Direct, Path::Router]
                } else {
                    [Path::Router, Path::Direct]
                };
                for path in order {
                    let before = process_cpu();
                    let d = tunnel_build(env.single(path), tunnel_bytes()).await;
                    if let (Some(a), Some(b)) = (before, process_cpu()) {
                        cpu[Env::idx(path)] += b.saturating_sub(a);
                        cpu_builds[Env::idx(path)] += 1;
                    }
                    tunnel.lock().unwrap()[Env::idx(path)].push(d);
                }
            }
        });
    }

    let mut out = String::new();
    out.push_str("\n=== buildkit-router proxy benchmark: router vs direct, same run ===\n");
    out.push_str(&format!(
        "host: {} CPUs; one 2-worker tokio runtime shared by client, router and fake daemon\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    if !rows.is_empty() {
        out.push_str(&format!(
            "\nunary ListWorkers latency ({ROUNDS} alternating rounds per path)\n"
        ));
        out.push_str(&format!(
            "{:<22} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "load",
            "calls",
            "p50 dir",
            "p50 rtr",
            "p50 x",
            "p99 dir",
            "p99 rtr",
            "p99 x",
            "mean x",
            "calls/s x"
        ));
        for r in &rows {
            out.push_str(&format!(
                "{:<22} {:>7} {:>8.1}us {:>8.1}us {:>9.2}x {:>8.1}us {:>8.1}us {:>9.2}x {:>9.2}x {:>9.2}x\n",
                r.label,
                r.samples,
                us(r.p50[0]),
                us(r.p50[1]),
                us(r.p50[1]) / us(r.p50[0]),
                us(r.p99[0]),
                us(r.p99[1]),
                us(r.p99[1]) / us(r.p99[0]),
                us(r.mean[1]) / us(r.mean[0]),
                r.calls_per_s[1] / r.calls_per_s[0],
            ));
        }
        for r in &rows {
            out.push_str(&format!(
                "  {}: direct {:.0} calls/s, router {:.0} calls/s; added p50 {:+.1}us, p99 {:+.1}us\n",
                r.label,
                r.calls_per_s[0],
                r.calls_per_s[1],
                us(r.p50[1]) - us(r.p50[0]),
                us(r.p99[1]) - us(r.p99[0]),
            ));
        }
    }
    let log = tunnel.lock().unwrap();
    if !log[0].is_empty() && !log[1].is_empty() {
        let mib = tunnel_bytes() as f64 / (1 << 20) as f64;
        let rate = |ds: &[Duration]| -> (f64, f64, f64, usize) {
            let mut r: Vec<f64> = ds.iter().map(|d| mib / d.as_secs_f64()).collect();
            r.sort_by(f64::total_cmp);
            (r[r.len() / 2], r[0], r[r.len() - 1], r.len())
        };
        let d = rate(&log[0]);
        let t = rate(&log[1]);
        out.push_str(&format!(
            "\nSession tunnel, {mib:.0} MiB context per build (whole build wall time)\n"
        ));
        out.push_str(&format!(
            "{:<8} {:>7} {:>14} {:>10} {:>10}\n",
            "path", "builds", "median MiB/s", "min", "max"
        ));
        for (name, x) in [("direct", d), ("relay", t)] {
            out.push_str(&format!(
                "{:<8} {:>7} {:>14.1} {:>10.1} {:>10.1}\n",
                name, x.3, x.0, x.1, x.2
            ));
        }
        out.push_str(&format!(
            "relay/direct throughput (median): {:.2}x (target >= 0.90x)\n",
            t.0 / d.0
        ));
        if cpu_builds[0] > 0 && cpu_builds[1] > 0 {
            let per = |i: usize| cpu[i].as_secs_f64() * 1e3 / f64::from(cpu_builds[i]);
            out.push_str(&format!(
                "CPU per build, whole process (client + router + daemon), summary pass: direct {:.0} ms, relay {:.0} ms ({:.2}x); the relay path adds {:.0} ms per {mib:.0} MiB\n",
                per(0),
                per(1),
                per(1) / per(0),
                per(1) - per(0),
            ));
        }
    }
    let k = env.daemon.counters();
    out.push_str(&format!(
        "\ndaemon saw {} ListWorkers, {} context bytes, {} routing errors; router backends: {}\n",
        k.calls("ListWorkers"),
        k.bytes_uploaded(),
        k.routing_errors(),
        env.router.pool.snapshot().backends.len(),
    ));
    eprint!("{out}");
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let env = Arc::new(rt.block_on(Env::start()));
    let tunnel: TunnelLog = Arc::default();
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &rt, &env, &tunnel);
    c.final_summary();
    if is_bench_mode() && std::env::var_os("PROXY_BENCH_NO_SUMMARY").is_none() {
        summary(&rt, &env, &tunnel);
    }
}
