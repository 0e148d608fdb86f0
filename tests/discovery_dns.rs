//! DNS discovery with an injected resolver (and one lookup through the system resolver): the pool
//! follows additions and removals, a failed lookup keeps the last set, and the first answer (even
//! an empty one) makes the pool synced.

#[path = "support/dns.rs"]
#[allow(dead_code)]
mod dns;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildkit_router::discovery::{
    self, DiscoveryMetrics, DnsSource, DnsTarget, Resolver, Source, SystemResolver,
};
use buildkit_router::pool::{Pool, PoolSettings, PoolUpdate};
use dns::{Behaviour, DnsServer};
use tokio::sync::{mpsc, watch};

/// Answers what the test says; counts lookups so the test can wait for one to happen.
struct FakeResolver {
    answer: Mutex<Result<Vec<&'static str>, String>>,
    lookups: watch::Sender<u64>,
}

impl FakeResolver {
    fn new(answer: Result<Vec<&'static str>, String>) -> Arc<Self> {
        Arc::new(Self {
            answer: Mutex::new(answer),
            lookups: watch::Sender::new(0),
        })
    }

    fn answer(&self, answer: Result<Vec<&'static str>, String>) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Waits until `n` lookups have started in total.
    async fn wait_lookups(&self, n: u64) {
        let mut rx = self.lookups.subscribe();
        tokio::time::timeout(Duration::from_secs(600), rx.wait_for(|count| *count >= n))
            .await
            .expect("the DNS source stopped looking up")
            .expect("resolver alive");
    }

    fn lookup_count(&self) -> u64 {
        *self.lookups.borrow()
    }
}

impl Resolver for FakeResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>
    {
        assert_eq!(host, "buildkitd.ci.svc.cluster.local");
        self.lookups.send_modify(|n| *n += 1);
        let answer = self.answer.lock().unwrap().clone();
        Box::pin(async move {
            match answer {
                Ok(ips) => Ok(ips
                    .iter()
                    .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
                    .collect()),
                Err(e) => Err(io::Error::other(e)),
            }
        })
    }
}

struct Harness {
    pool: Arc<Pool>,
    rx: mpsc::Receiver<PoolUpdate>,
    metrics: DiscoveryMetrics,
}

impl Harness {
    fn start(resolver: Arc<FakeResolver>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let metrics = DiscoveryMetrics::new();
        let source = DnsSource {
            target: "buildkitd.ci.svc.cluster.local:1234"
                .parse::<DnsTarget>()
                .unwrap(),
            interval: Duration::from_secs(5),
            resolver,
            tls: None,
        };
        discovery::spawn(vec![Source::Dns(source)], tx, metrics.clone()).unwrap();
        Self {
            pool: Pool::new(PoolSettings::default()),
            rx,
            metrics,
        }
    }

    /// The next update, applied to the pool; described as `op identity...`.
    async fn next(&mut self) -> String {
        let update = tokio::time::timeout(Duration::from_secs(600), self.rx.recv())
            .await
            .expect("no discovery update")
            .expect("discovery ended");
        let described = describe(&update);
        self.pool.apply(update);
        described
    }

    fn backends(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .pool
            .snapshot()
            .backends
            .iter()
            .map(|b| format!("{}={}", b.identity(), b.address()))
            .collect();
        ids.sort();
        ids
    }
}

// Time is paused: the 5 s interval elapses as soon as everything waits, so nothing sleeps.
#[tokio::test(start_paused = true)]
async fn dns_additions_and_removals_follow() {
    let resolver = FakeResolver::new(Ok(vec!["10.0.0.1", "10.0.0.2"]));
    let mut h = Harness::start(resolver.clone());
    assert!(!h.pool.is_synced());

    assert_eq!(h.next().await, "reset 10.0.0.1:1234 10.0.0.2:1234");
    assert!(h.pool.is_synced());
    assert_eq!(
        h.backends(),
        [
            "10.0.0.1:1234=tcp://10.0.0.1:1234",
            "10.0.0.2:1234=tcp://10.0.0.2:1234"
        ]
    );

    // A pod replaced: one address goes, another comes (IPv6 too).
    resolver.answer(Ok(vec!["10.0.0.2", "fd00::3"]));
    assert_eq!(h.next().await, "remove 10.0.0.1:1234");
    assert_eq!(h.next().await, "add [fd00::3]:1234");
    assert_eq!(
        h.backends(),
        [
            "10.0.0.2:1234=tcp://10.0.0.2:1234",
            "[fd00::3]:1234=tcp://[fd00::3]:1234"
        ]
    );

    // Lookups fail for two rounds: the set is kept, each failure is counted.
    resolver.answer(Err("SERVFAIL".into()));
    let seen = resolver.lookup_count();
    resolver.wait_lookups(seen + 2).await;
    assert!(h.metrics.errors_count("dns") >= 1);
    assert_eq!(h.backends().len(), 2);

    // Back, with one address fewer: the next update is exactly that removal (nothing was sent
    // while lookups failed).
    resolver.answer(Ok(vec!["10.0.0.2"]));
    assert_eq!(h.next().await, "remove [fd00::3]:1234");
    assert_eq!(h.backends(), ["10.0.0.2:1234=tcp://10.0.0.2:1234"]);

    // Scaled to zero.
    resolver.answer(Ok(vec![]));
    assert_eq!(h.next().await, "remove 10.0.0.2:1234");
    assert!(h.backends().is_empty());

    assert_eq!(h.metrics.updates_count("dns", "reset"), 1);
    assert_eq!(h.metrics.updates_count("dns", "add"), 1);
    assert_eq!(h.metrics.updates_count("dns", "remove"), 3);
}

#[tokio::test(start_paused = true)]
async fn an_empty_first_answer_still_syncs_the_pool() {
    let resolver = FakeResolver::new(Ok(vec![]));
    let mut h = Harness::start(resolver.clone());
    assert_eq!(h.next().await, "reset ");
    assert!(h.pool.is_synced());
    resolver.answer(Ok(vec!["10.0.0.9"]));
    assert_eq!(h.next().await, "add 10.0.0.9:1234");
}

#[tokio::test(start_paused = true)]
async fn the_pool_is_not_synced_until_a_lookup_succeeds() {
    let resolver = FakeResolver::new(Err("NXDOMAIN".into()));
    let mut h = Harness::start(resolver.clone());
    resolver.wait_lookups(3).await;
    assert!(
        h.rx.try_recv().is_err(),
        "nothing sent while every lookup failed"
    );
    assert!(h.metrics.errors_count("dns") >= 2);
    resolver.answer(Ok(vec!["10.0.0.1", "10.0.0.1"]));
    assert_eq!(
        h.next().await,
        "reset 10.0.0.1:1234",
        "duplicate records are one backend"
    );
    assert!(h.pool.is_synced());
}

/// The production resolver against the machine's own: `localhost` resolves to loopback.
#[tokio::test]
async fn the_system_resolver_finds_localhost() {
    let (tx, mut rx) = mpsc::channel(4);
    let source = DnsSource::new(
        "localhost:1234".parse().unwrap(),
        Duration::from_secs(60),
        None,
    )
    .unwrap();
    discovery::spawn(vec![Source::Dns(source)], tx, DiscoveryMetrics::new()).unwrap();
    let update = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let PoolUpdate::Reset(specs) = update else {
        panic!("expected a reset, got {update:?}")
    };
    assert!(!specs.is_empty());
    for spec in specs {
        assert!(
            spec.identity == "127.0.0.1:1234" || spec.identity == "[::1]:1234",
            "unexpected {}",
            spec.identity
        );
        assert_eq!(spec.address.port, 1234);
    }
}

/// Real DNS over UDP: NXDOMAIN and an empty answer mean zero backends (a headless Service
/// scaled to zero); SERVFAIL and a timeout keep the last set (a DNS outage must not empty the
/// pool).
#[tokio::test]
async fn nxdomain_and_no_records_mean_zero_backends_but_servfail_and_timeouts_keep_the_set() {
    let mut server = DnsServer::start(Behaviour::Addresses(vec![
        "10.0.0.1".parse().unwrap(),
        "10.0.0.2".parse().unwrap(),
    ]))
    .await;
    let (tx, mut rx) = mpsc::channel(16);
    let metrics = DiscoveryMetrics::new();
    let source = DnsSource {
        target: "buildkitd.ci.svc.cluster.local:1234".parse().unwrap(),
        interval: Duration::from_millis(50),
        resolver: Arc::new(SystemResolver::with_name_servers(
            &[server.addr],
            Duration::from_millis(300),
        )),
        tls: None,
    };
    discovery::spawn(vec![Source::Dns(source)], tx, metrics.clone()).unwrap();
    assert_eq!(recv(&mut rx).await, "reset 10.0.0.1:1234 10.0.0.2:1234");

    server.answer(Behaviour::ServFail).await;
    assert!(rx.try_recv().is_err(), "SERVFAIL keeps the last set");
    server.answer(Behaviour::Silent).await;
    assert!(rx.try_recv().is_err(), "a timeout keeps the last set");
    assert!(metrics.errors_count("dns") >= 2, "failures are counted");

    server.answer(Behaviour::NxDomain).await;
    let mut gone = vec![recv(&mut rx).await, recv(&mut rx).await];
    gone.sort();
    assert_eq!(gone, ["remove 10.0.0.1:1234", "remove 10.0.0.2:1234"]);

    server
        .answer(Behaviour::Addresses(vec!["10.0.0.3".parse().unwrap()]))
        .await;
    assert_eq!(recv(&mut rx).await, "add 10.0.0.3:1234");
    server.answer(Behaviour::NoRecords).await;
    assert_eq!(recv(&mut rx).await, "remove 10.0.0.3:1234");
}

fn describe(update: &PoolUpdate) -> String {
    match update {
        PoolUpdate::Reset(specs) => {
            let mut ids: Vec<_> = specs.iter().map(|s| s.identity.clone()).collect();
            ids.sort();
            format!("reset {}", ids.join(" "))
        }
        PoolUpdate::Add(s) => format!("add {}", s.identity),
        PoolUpdate::Update(s) => format!("update {}", s.identity),
        PoolUpdate::Remove(id) => format!("remove {id}"),
    }
}

async fn recv(rx: &mut mpsc::Receiver<PoolUpdate>) -> String {
    let update = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no discovery update")
        .expect("discovery ended");
    describe(&update)
}
