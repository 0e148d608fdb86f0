//! Admission as a user sees it: who waits, who goes next, what a timeout says.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::placement::{PlacementConfig, Reason};

#[derive(Debug, Clone)]
struct N {
    id: String,
    local: usize,
    reported: Option<usize>,
    ready: bool,
    cap: Option<usize>,
    platforms: Vec<String>,
}

impl N {
    fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            local: 0,
            reported: None,
            ready: true,
            cap: None,
            platforms: Vec::new(),
        }
    }
}

impl Node for N {
    fn identity(&self) -> &str {
        &self.id
    }
    fn active_builds(&self) -> usize {
        self.local
    }
    fn accepts_builds(&self) -> bool {
        self.ready
    }
    fn capacity(&self) -> Option<usize> {
        self.cap
    }
    fn supports_platform(&self, platform: &str) -> bool {
        self.platforms.is_empty() || self.platforms.iter().any(|p| p == platform)
    }
    fn platforms(&self) -> Vec<String> {
        self.platforms.clone()
    }
    fn reported_builds(&self) -> Option<usize> {
        self.reported
    }
}

fn pool(n: usize) -> Vec<N> {
    (0..n).map(|i| N::new(format!("buildkitd-{i}"))).collect()
}

fn capped(cap: usize) -> Placement {
    Placement::new(PlacementConfig {
        max_builds_per_backend: Some(cap),
        ..PlacementConfig::default()
    })
}

fn keyed(k: &str) -> BuildTraits {
    BuildTraits {
        key: Some(AffinityKey::new(
            KeySource::Explicit,
            format!("explicit|{k}"),
        )),
        ..BuildTraits::default()
    }
}

fn keyless(nonce: u64) -> BuildTraits {
    BuildTraits {
        nonce,
        ..BuildTraits::default()
    }
}

/// A key whose home among `nodes` is `want`.
fn key_homed_at(p: &Placement, nodes: &[N], want: usize, salt: &str) -> BuildTraits {
    (0..)
        .map(|i| keyed(&format!("{salt}-{i}")))
        .find(|t| p.home(nodes, t) == Some(want))
        .unwrap()
}

struct Run {
    t0: Instant,
    q: Queue<&'static str>,
    leases: HashMap<&'static str, (Lease, usize)>,
}

impl Run {
    fn new(config: QueueConfig) -> Self {
        Self {
            t0: Instant::now(),
            q: Queue::new(config),
            leases: HashMap::new(),
        }
    }
    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }
    fn push(&mut self, secs: u64, tenant: &str, traits: BuildTraits, name: &'static str) -> Ticket {
        let now = self.at(secs);
        self.q.push(now, tenant, traits, name)
    }
    /// Dispatches, counts admitted builds on their nodes, returns their names in order.
    fn dispatch(&mut self, secs: u64, p: &Placement, nodes: &mut [N]) -> Vec<&'static str> {
        let now = self.at(secs);
        let mut admitted = Vec::new();
        for o in self.q.dispatch(now, p, nodes) {
            match o {
                Outcome::Admitted {
                    payload,
                    choice,
                    lease,
                    ..
                } => {
                    assert_ne!(choice.reason, Reason::Overflow);
                    nodes[choice.index].local += 1;
                    self.leases.insert(payload, (lease, choice.index));
                    admitted.push(payload);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        admitted
    }
    /// `name` ends: its node and its tenant have one slot more.
    fn finish(&mut self, name: &str, nodes: &mut [N]) -> usize {
        let (lease, i) = self.leases.remove(name).unwrap();
        nodes[i].local -= 1;
        self.q.finish(lease);
        i
    }
}

#[test]
fn builds_wait_with_zero_backends_then_all_go_in_order_when_one_appears() {
    let p = capped(4);
    let mut r = Run::new(QueueConfig::default());
    let mut nodes: Vec<N> = Vec::new();
    let names = ["a", "b", "c", "d", "e", "f"];
    for (i, n) in names.iter().enumerate() {
        r.push(i as u64, DEFAULT_TENANT, keyed(n), n);
        assert!(r.dispatch(i as u64, &p, &mut nodes).is_empty());
    }
    assert_eq!(r.q.len(), 6);
    assert_eq!(r.q.oldest_age(r.at(100)), Some(Duration::from_secs(100)));
    // A backend that is not ready yet changes nothing.
    nodes.push(N::new("buildkitd-0"));
    nodes[0].ready = false;
    assert!(r.dispatch(60, &p, &mut nodes).is_empty());
    nodes[0].ready = true;
    // Ready: four go (its capacity), in arrival order; two keep waiting.
    assert_eq!(r.dispatch(61, &p, &mut nodes), ["a", "b", "c", "d"]);
    assert_eq!(nodes[0].local, 4);
    assert_eq!(r.q.position(Ticket(4)), Some(0));
    r.finish("b", &mut nodes);
    assert_eq!(r.dispatch(62, &p, &mut nodes), ["e"]);
    r.finish("a", &mut nodes);
    assert_eq!(r.dispatch(63, &p, &mut nodes), ["f"]);
    assert!(r.q.is_empty());
    assert_eq!(r.q.next_deadline(), None);
}

#[test]
fn capacity_is_a_hard_cap() {
    let p = capped(2);
    let mut nodes = pool(3);
    let mut r = Run::new(QueueConfig::default());
    let names: [&'static str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    for (i, n) in names.iter().enumerate() {
        // All on one key: choose would overflow onto its home; the queue holds them.
        r.push(i as u64, DEFAULT_TENANT, keyed("app"), n);
        r.dispatch(i as u64, &p, &mut nodes);
        assert!(nodes.iter().all(|n| n.local <= 2), "{nodes:?}");
    }
    assert_eq!(nodes.iter().map(|n| n.local).sum::<usize>(), 6);
    assert_eq!(r.q.len(), 4);
    // Without the queue, the same placement overflows.
    assert_eq!(
        p.choose(&nodes, &keyed("app")).unwrap().reason,
        Reason::Overflow
    );
    assert_eq!(
        p.choose_capped(&nodes, &keyed("app")),
        Err(PlacementError::AllAtCapacity { backends: 3 })
    );
    assert_eq!(
        p.choose_capped(&nodes, &keyed("app")).unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
}

#[test]
fn capped_placement_with_unequal_capacities_never_overflows() {
    let p = Placement::default();
    let mut nodes = pool(2);
    nodes[0].cap = Some(1);
    nodes[0].local = 1;
    nodes[1].cap = Some(8);
    nodes[1].local = 5;
    // choose's least loaded is the full one; choose_capped finds the one with room.
    for nonce in 0..20 {
        let c = p.choose_capped(&nodes, &keyless(nonce)).unwrap();
        assert_eq!(c.index, 1);
        assert_ne!(c.reason, Reason::Overflow);
    }
    let internal = BuildTraits {
        internal: true,
        ..BuildTraits::default()
    };
    assert_eq!(p.choose_capped(&nodes, &internal).unwrap().index, 1);
    nodes[1].local = 8;
    assert_eq!(
        p.room_for(&nodes, &internal),
        Err(PlacementError::AllAtCapacity { backends: 2 })
    );
    assert_eq!(
        p.room_for::<N>(&[], &internal),
        Err(PlacementError::NoBackend)
    );
    // The home ignores load and readiness of others, not its own readiness.
    let k = keyed("x");
    let h = p.home(&nodes, &k).unwrap();
    nodes[1 - h].ready = false;
    assert_eq!(p.home(&nodes, &k), Some(h));
    nodes[h].ready = false;
    assert_eq!(p.home(&nodes, &k), None);
    assert_eq!(p.home(&pool(2), &keyless(1)), None);
}

#[test]
fn load_counts_the_larger_of_local_and_reported_builds() {
    let p = capped(2);
    let mut nodes = pool(1);
    let mut r = Run::new(QueueConfig::default());
    // Another replica's two builds, reported by the daemon.
    nodes[0].reported = Some(2);
    r.push(0, DEFAULT_TENANT, keyed("x"), "x");
    assert!(r.dispatch(0, &p, &mut nodes).is_empty());
    assert_eq!(
        PoolState::of(&p, &nodes).to_string(),
        "0 of 1 builders free, 2 builds running of 2 slots"
    );
    nodes[0].reported = Some(1);
    assert_eq!(r.dispatch(1, &p, &mut nodes), ["x"]);
    // The daemon now reports our build too: max, not sum.
    nodes[0].reported = Some(2);
    assert_eq!(nodes[0].load(), 2);
    nodes[0].reported = Some(1);
    assert_eq!(nodes[0].load(), 1);
}

#[test]
fn tenants_are_served_round_robin() {
    let p = capped(1);
    let mut nodes = pool(1);
    let mut r = Run::new(QueueConfig::default());
    r.push(0, "busy", keyless(0), "busy0");
    assert_eq!(r.dispatch(0, &p, &mut nodes), ["busy0"]);
    for (i, n) in ["busy1", "busy2", "busy3", "busy4"].into_iter().enumerate() {
        r.push(1 + i as u64, "busy", keyless(i as u64), n);
    }
    r.push(10, "quiet", keyless(9), "quiet0");
    r.push(11, "quiet", keyless(9), "quiet1");
    assert!(r.dispatch(11, &p, &mut nodes).is_empty());
    // Four builds of busy came first, yet quiet's first build is second in line.
    assert_eq!(r.q.position(Ticket(5)), Some(1));
    let order: Vec<_> = r.q.waiting(r.at(12)).iter().map(|w| w.ticket.0).collect();
    assert_eq!(order, [1, 5, 2, 6, 3, 4]);
    let mut served = Vec::new();
    let mut last = "busy0";
    for s in 12..18 {
        r.finish(last, &mut nodes);
        let got = r.dispatch(s, &p, &mut nodes);
        assert_eq!(got.len(), 1);
        last = got[0];
        served.push(last);
    }
    assert_eq!(
        served,
        ["busy1", "quiet0", "busy2", "quiet1", "busy3", "busy4"]
    );
}

#[test]
fn within_a_tenant_first_come_first_served() {
    let p = capped(1);
    let mut nodes = pool(2);
    let mut r = Run::new(QueueConfig::default());
    let names: [&'static str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];
    for (i, n) in names.iter().enumerate() {
        r.push(i as u64, "t", keyless(i as u64), n);
    }
    assert_eq!(r.dispatch(8, &p, &mut nodes), ["a", "b"]);
    for (i, w) in r.q.waiting(r.at(9)).iter().enumerate() {
        assert_eq!(w.position, i);
        assert_eq!(r.q.position(w.ticket), Some(i));
    }
    let mut served = vec!["a", "b"];
    let mut s = 10;
    while !r.q.is_empty() {
        let done = served[served.len() - 2];
        r.finish(done, &mut nodes);
        served.extend(r.dispatch(s, &p, &mut nodes));
        s += 1;
    }
    assert_eq!(served, names);
}

#[test]
fn a_freed_slot_goes_to_the_build_whose_home_it_is() {
    let p = capped(1);
    let mut nodes = pool(3);
    let mut r = Run::new(QueueConfig::default());
    let home0 = key_homed_at(&p, &nodes, 0, "h0");
    let home1 = key_homed_at(&p, &nodes, 1, "h1");
    for (i, n) in ["x", "y", "z"].into_iter().enumerate() {
        r.push(0, "t", keyless(i as u64), n);
    }
    assert_eq!(r.dispatch(0, &p, &mut nodes).len(), 3);
    r.push(1, "t", home0.clone(), "first-home0");
    r.push(2, "t", home1.clone(), "then-home1");
    // Backend 1 frees a slot: the build whose home it is goes, ahead of the older one.
    let freed = r
        .leases
        .iter()
        .find(|(_, (_, i))| *i == 1)
        .map(|(n, _)| *n)
        .unwrap();
    r.finish(freed, &mut nodes);
    let out = r.q.dispatch(r.at(3), &p, &nodes);
    let [Outcome::Admitted {
        payload,
        choice,
        home_first,
        lease,
        ..
    }] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(
        (*payload, choice.index, choice.reason, *home_first),
        ("then-home1", 1, Reason::Affinity, true)
    );
    assert_eq!(r.q.waiting(r.at(3))[0].skips, 1);
    nodes[1].local += 1;
    let _ = lease;
    // The head's own home frees: it goes home, in strict order.
    let freed = r
        .leases
        .iter()
        .find(|(_, (_, i))| *i == 0)
        .map(|(n, _)| *n)
        .unwrap();
    r.finish(freed, &mut nodes);
    let out = r.q.dispatch(r.at(4), &p, &nodes);
    assert!(matches!(
        &out[..],
        [Outcome::Admitted {
            payload: "first-home0",
            choice: Choice {
                index: 0,
                reason: Reason::Affinity,
                ..
            },
            home_first: false,
            ..
        }]
    ));
}

#[test]
fn home_first_never_passes_a_build_more_than_max_skips_times() {
    let max_skips = 3;
    let p = capped(1);
    let mut nodes = pool(2);
    let mut r = Run::new(QueueConfig {
        max_skips,
        ..QueueConfig::default()
    });
    let home0 = key_homed_at(&p, &nodes, 0, "a");
    let home1 = key_homed_at(&p, &nodes, 1, "b");
    r.push(0, "t", home0.clone(), "run0");
    r.push(0, "t", home1.clone(), "run1");
    assert_eq!(r.dispatch(0, &p, &mut nodes).len(), 2);
    // The victim's home (0) stays busy forever; builds homed at 1 keep arriving behind it.
    r.push(1, "t", home0.clone(), "victim");
    let names: [&'static str; 8] = ["j0", "j1", "j2", "j3", "j4", "j5", "j6", "j7"];
    for n in names {
        r.push(2, "t", home1.clone(), n);
    }
    let mut served = Vec::new();
    let mut on1 = "run1";
    for s in 3..3 + max_skips as u64 + 1 {
        r.finish(on1, &mut nodes);
        let got = r.dispatch(s, &p, &mut nodes);
        assert_eq!(got.len(), 1);
        on1 = got[0];
        served.push(on1);
    }
    // Passed exactly max_skips times, then served on the slot it could use (a spill).
    assert_eq!(served, ["j0", "j1", "j2", "victim"]);
    assert_eq!(r.leases["victim"].1, 1);
    // And the order goes on from there.
    r.finish("victim", &mut nodes);
    assert_eq!(r.dispatch(9, &p, &mut nodes), ["j3"]);
}

#[test]
fn builds_that_wait_too_long_time_out_with_what_the_message_needs() {
    let p = capped(1);
    let mut nodes = pool(2);
    let mut r = Run::new(QueueConfig {
        timeout: Duration::from_secs(30 * 60),
        ..QueueConfig::default()
    });
    for (i, n) in ["r0", "r1"].into_iter().enumerate() {
        r.push(0, "t", keyless(i as u64), n);
    }
    assert_eq!(r.dispatch(0, &p, &mut nodes).len(), 2);
    r.push(10, "t", keyed("a"), "late");
    r.push(20, "u", keyed("b"), "later");
    assert_eq!(r.q.next_deadline(), Some(r.at(10 + 1800)));
    assert!(r.dispatch(1809, &p, &mut nodes).is_empty());
    let out = r.q.dispatch(r.at(1815), &p, &nodes);
    let [Outcome::TimedOut(t)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (t.payload, t.waited, t.position, t.queued, &*t.tenant),
        ("late", Duration::from_secs(1805), 0, 2, "t")
    );
    assert_eq!(t.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        t.message(),
        "buildkit-router: no builder became free after waiting 30m5s (--queue-timeout); 0 builds \
         were ahead of this one, 2 waiting in all; 0 of 2 builders free, 2 builds running of 2 slots"
    );
    assert_eq!(r.q.len(), 1);
    assert_eq!(r.q.next_deadline(), Some(r.at(20 + 1800)));
    // An empty pool is named as such.
    let out = r.q.dispatch::<N>(r.at(1820), &p, &[]);
    let [Outcome::TimedOut(t)] = &out[..] else {
        panic!("{out:?}")
    };
    assert!(t
        .message()
        .ends_with("no builder is ready (the pool is scaled to zero or restarting)"));
    assert!(r.q.is_empty());
}

#[test]
fn a_slot_at_the_deadline_still_serves_the_build() {
    let p = capped(1);
    let mut nodes = pool(1);
    let mut r = Run::new(QueueConfig {
        timeout: Duration::from_secs(60),
        ..QueueConfig::default()
    });
    r.push(0, "t", keyless(0), "run");
    r.dispatch(0, &p, &mut nodes);
    r.push(0, "t", keyless(1), "wait");
    r.finish("run", &mut nodes);
    assert_eq!(r.dispatch(75, &p, &mut nodes), ["wait"]);
}

#[test]
fn a_cancelled_build_leaves_at_once() {
    let p = capped(1);
    let mut nodes = pool(1);
    let mut r = Run::new(QueueConfig::default());
    r.push(0, "t", keyless(0), "run");
    r.dispatch(0, &p, &mut nodes);
    let a = r.push(1, "t", keyless(1), "a");
    let b = r.push(2, "u", keyless(2), "b");
    let c = r.push(3, "t", keyless(3), "c");
    assert_eq!(r.q.position(c), Some(2));
    assert_eq!(r.q.cancel(a), Some("a"));
    assert_eq!(r.q.cancel(a), None);
    assert!(!r.q.contains(a));
    // c takes tenant t's turn.
    assert_eq!(r.q.position(c), Some(0));
    assert_eq!(r.q.position(b), Some(1));
    assert_eq!(r.q.cancel(b), Some("b"));
    // Tenant u had nothing else: forgotten.
    assert_eq!(r.q.tenant_ids.len(), 1);
    r.finish("run", &mut nodes);
    assert_eq!(r.dispatch(4, &p, &mut nodes), ["c"]);
}

#[test]
fn a_tenant_at_its_cap_waits_while_others_go() {
    let p = capped(10);
    let mut nodes = pool(1);
    let mut r = Run::new(QueueConfig {
        max_builds_per_tenant: Some(2),
        ..QueueConfig::default()
    });
    for (i, n) in ["a0", "a1", "a2", "a3"].into_iter().enumerate() {
        r.push(i as u64, "a", keyless(i as u64), n);
    }
    r.push(5, "b", keyless(5), "b0");
    assert_eq!(r.dispatch(5, &p, &mut nodes), ["a0", "b0", "a1"]);
    assert_eq!(r.q.active_of("a"), 2);
    assert!(
        r.dispatch(6, &p, &mut nodes).is_empty(),
        "room, but a is at its cap"
    );
    r.finish("b0", &mut nodes);
    assert!(r.dispatch(7, &p, &mut nodes).is_empty());
    r.finish("a0", &mut nodes);
    assert_eq!(r.dispatch(8, &p, &mut nodes), ["a2"]);
    assert_eq!(r.q.active(), 2);
}

#[test]
fn builds_no_backend_can_build_are_rejected_only_with_strict_platforms() {
    let strict = Placement::new(PlacementConfig {
        max_builds_per_backend: Some(1),
        strict_platforms: true,
        ..PlacementConfig::default()
    });
    let mut nodes = pool(1);
    nodes[0].platforms = vec!["linux/amd64".into()];
    let arm = BuildTraits {
        platforms: vec!["linux/arm64".into()],
        ..keyed("arm")
    };
    let mut r = Run::new(QueueConfig::default());
    r.push(0, "t", arm.clone(), "arm");
    r.push(0, "t", keyed("amd"), "amd");
    let out = r.q.dispatch(r.at(1), &strict, &nodes);
    assert!(matches!(
        &out[..],
        [
            Outcome::Rejected {
                payload: "arm",
                error: PlacementError::NoPlatform { .. },
                ..
            },
            Outcome::Admitted { payload: "amd", .. }
        ]
    ));
    // Platforms as a preference (the default): it goes where there is room.
    let p = capped(1);
    let mut r = Run::new(QueueConfig::default());
    r.push(0, "t", arm.clone(), "arm");
    assert_eq!(r.dispatch(1, &p, &mut nodes), ["arm"]);
    // But while a backend lists its platform, it waits for that one, not for any.
    let mut nodes = pool(2);
    nodes[0].platforms = vec!["linux/amd64".into()];
    nodes[1].platforms = vec!["linux/arm64".into()];
    nodes[1].local = 1;
    r.push(2, "t", arm, "arm2");
    assert!(r.dispatch(2, &p, &mut nodes).is_empty());
    nodes[1].local = 0;
    assert_eq!(r.dispatch(3, &p, &mut nodes), ["arm2"]);
    assert_eq!(r.leases["arm2"].1, 1);
}

#[test]
fn queued_by_tenant_bounds_its_labels() {
    let mut q: Queue<()> = Queue::new(QueueConfig::default());
    let now = Instant::now();
    for (tenant, n) in [("a", 5), ("b", 3), ("c", 2), ("d", 1), ("e", 1)] {
        for _ in 0..n {
            q.push(now, tenant, keyless(0), ());
        }
    }
    let v: Vec<(String, usize)> = q
        .queued_by_tenant(2)
        .into_iter()
        .map(|(t, n)| (t.to_string(), n))
        .collect();
    assert_eq!(
        v,
        [("a".into(), 5), ("b".into(), 3), (OTHER_TENANT.into(), 4)]
    );
    assert_eq!(q.queued_by_tenant(10).len(), 5);
}

#[test]
fn desired_backends_counts_queued_builds() {
    assert_eq!(desired_backends(0, 0, 4), 0);
    assert_eq!(desired_backends(0, 1, 4), 1);
    assert_eq!(desired_backends(8, 1, 4), 3);
    assert_eq!(desired_backends(8, 0, 0), 8);
}

#[test]
fn tenants_from_keys_and_identities() {
    let k = |source, text: &str| AffinityKey::new(source, text.to_owned());
    let cases = [
        (
            k(
                KeySource::Vcs,
                "vcs|gitlab.example.com/group/sub/repo|svc/a|||",
            ),
            "gitlab.example.com/group/sub",
        ),
        (
            k(KeySource::Image, "image|registry.example/team/app"),
            "registry.example/team",
        ),
        (k(KeySource::Image, "image|alpine"), "alpine"),
        (k(KeySource::Explicit, "explicit|org/proj|x"), "org"),
        (k(KeySource::Explicit, "explicit|proj"), "proj"),
        (
            k(KeySource::Session, "session|/builds/org/proj"),
            "/builds/org",
        ),
    ];
    for (key, owner) in &cases {
        assert_eq!(key_owner(key), *owner, "{key:?}");
        assert_eq!(
            tenant_of(TenantFrom::KeyOwner, Some("cn=ci"), Some(key)),
            *owner
        );
        assert_eq!(
            tenant_of(TenantFrom::Mtls, Some("cn=ci"), Some(key)),
            "cn=ci"
        );
        assert_eq!(
            tenant_of(TenantFrom::None, Some("cn=ci"), Some(key)),
            DEFAULT_TENANT
        );
    }
    assert_eq!(tenant_of(TenantFrom::KeyOwner, None, None), DEFAULT_TENANT);
    assert_eq!(tenant_of(TenantFrom::Mtls, None, None), DEFAULT_TENANT);
}

#[test]
fn flags_and_defaults() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        q: QueueArgs,
    }
    let a = Cli::parse_from(["x"]).q;
    assert!(a.enabled);
    assert_eq!(a.queue_timeout, Duration::from_secs(1800));
    assert_eq!(a.tenant_from, TenantFrom::KeyOwner);
    assert_eq!(a.max_builds_per_tenant, None);
    assert_eq!(
        a.max_builds_per_backend(None),
        Some(DEFAULT_MAX_BUILDS_PER_BACKEND)
    );
    assert_eq!(a.max_builds_per_backend(Some(9)), Some(9));
    let a = Cli::parse_from([
        "x",
        "--queue",
        "off",
        "--queue-timeout",
        "45m",
        "--max-builds-per-tenant",
        "3",
        "--tenant-from",
        "mtls",
    ])
    .q;
    assert!(!a.enabled);
    assert_eq!(a.max_builds_per_backend(None), None);
    let c = a.to_config();
    assert_eq!(
        (c.timeout, c.max_builds_per_tenant),
        (Duration::from_secs(2700), Some(3))
    );
    assert!(Cli::try_parse_from(["x", "--queue", "maybe"]).is_err());
    assert!(Cli::try_parse_from(["x", "--tenant-from", "ip"]).is_err());
}

#[test]
fn random_operations_lose_nothing_duplicate_nothing_and_respect_every_cap() {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let cap = rng.random_range(1..4usize);
        let tenant_cap = rng.random_range(1..6usize);
        let p = capped(cap);
        let mut nodes: Vec<N> = pool(rng.random_range(0..4));
        let mut q: Queue<u64> = Queue::new(QueueConfig {
            timeout: Duration::from_secs(rng.random_range(20..200)),
            max_builds_per_tenant: Some(tenant_cap),
            max_skips: rng.random_range(0..4),
            scan_window: rng.random_range(1..50),
        });
        let t0 = Instant::now();
        let mut now = 0u64;
        let mut waiting: HashMap<u64, Ticket> = HashMap::new();
        let mut running: Vec<(u64, Lease, String)> = Vec::new();
        let mut ended: HashSet<u64> = HashSet::new();
        let mut next = 0u64;
        let tenants = ["a", "b", "c", "d"];
        for _ in 0..3000 {
            now += rng.random_range(0..5);
            match rng.random_range(0..100) {
                0..40 => {
                    let tenant = tenants[rng.random_range(0..tenants.len())];
                    let traits = if rng.random_bool(0.2) {
                        keyless(rng.random())
                    } else {
                        keyed(&format!("k{}", rng.random_range(0..12)))
                    };
                    let ticket = q.push(t0 + Duration::from_secs(now), tenant, traits, next);
                    waiting.insert(next, ticket);
                    next += 1;
                }
                40..48 if !waiting.is_empty() => {
                    let &id = waiting
                        .keys()
                        .nth(rng.random_range(0..waiting.len()))
                        .unwrap();
                    let ticket = waiting.remove(&id).unwrap();
                    assert_eq!(q.cancel(ticket), Some(id));
                    assert!(ended.insert(id));
                }
                48..75 if !running.is_empty() => {
                    let (_, lease, node) = running.swap_remove(rng.random_range(0..running.len()));
                    if let Some(n) = nodes.iter_mut().find(|n| n.id == node) {
                        n.local -= 1;
                    }
                    q.finish(lease);
                }
                75..80 => {
                    let id = format!("buildkitd-{}", rng.random_range(0..6));
                    if !nodes.iter().any(|n| n.id == id) {
                        let mut n = N::new(id.clone());
                        n.local = running.iter().filter(|r| r.2 == id).count();
                        nodes.push(n);
                    }
                }
                80..83 if !nodes.is_empty() => {
                    nodes.remove(rng.random_range(0..nodes.len()));
                }
                83..88 if !nodes.is_empty() => {
                    let k = rng.random_range(0..nodes.len());
                    nodes[k].ready = !nodes[k].ready;
                }
                88..92 if !nodes.is_empty() => {
                    let k = rng.random_range(0..nodes.len());
                    nodes[k].reported = rng.random_bool(0.7).then(|| rng.random_range(0..cap + 2));
                }
                _ => {}
            }
            let before: HashMap<String, usize> =
                nodes.iter().map(|n| (n.id.clone(), n.load())).collect();
            let mut added: HashMap<String, usize> = HashMap::new();
            for o in q.dispatch(t0 + Duration::from_secs(now), &p, &nodes) {
                let id = match o {
                    Outcome::Admitted {
                        payload,
                        choice,
                        lease,
                        ticket,
                        ..
                    } => {
                        assert_eq!(waiting.remove(&payload), Some(ticket));
                        let n = &nodes[choice.index];
                        assert!(n.accepts_builds());
                        let extra = added.entry(n.id.clone()).or_default();
                        // Below the cap, counting the daemon's report and this call's admissions.
                        assert!(before[&n.id] + *extra < cap, "seed {seed}: {nodes:?}");
                        *extra += 1;
                        running.push((payload, lease, n.id.clone()));
                        payload
                    }
                    Outcome::TimedOut(t) => {
                        assert!(t.waited >= q.config().timeout);
                        assert_eq!(waiting.remove(&t.payload), Some(t.ticket));
                        t.payload
                    }
                    Outcome::Rejected { .. } => panic!("no platforms in this test"),
                };
                assert!(ended.insert(id), "seed {seed}: {id} ended twice");
            }
            for (id, n) in added {
                if let Some(node) = nodes.iter_mut().find(|x| x.id == id) {
                    node.local += n;
                }
            }
            for n in &nodes {
                assert!(n.local <= cap, "seed {seed}: {n:?}");
            }
            // Every build is waiting, or ended exactly once; the queue agrees.
            assert_eq!(q.len(), waiting.len());
            assert_eq!(waiting.len() + ended.len(), next as usize);
            for t in tenants {
                assert!(q.active_of(t) <= tenant_cap);
            }
            assert_eq!(q.active(), running.len());
            let max_skips = q.config().max_skips;
            assert!(q.waiting(t0).iter().all(|w| w.skips <= max_skips));
            let order: Vec<Ticket> = q.waiting(t0).iter().map(|w| w.ticket).collect();
            assert_eq!(order.len(), q.len());
            for (i, t) in order.iter().enumerate() {
                assert_eq!(q.position(*t), Some(i));
            }
        }
    }
}
