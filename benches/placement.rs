//! One placement decision at 3, 30 and 300 backends (ns per decision).

use std::hint::black_box;

use buildkit_router::placement::hash::hash_str;
use buildkit_router::placement::{
    AffinityKey, BuildTraits, KeySource, Node, Placement, PlacementConfig,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

struct BenchNode {
    id: String,
    id_hash: u64,
    load: usize,
    cached: bool,
}

impl Node for BenchNode {
    fn identity(&self) -> &str {
        &self.id
    }
    fn active_builds(&self) -> usize {
        self.load
    }
    fn accepts_builds(&self) -> bool {
        true
    }
    fn capacity(&self) -> Option<usize> {
        None
    }
    fn supports_platform(&self, platform: &str) -> bool {
        platform == "linux/amd64"
    }
    fn platforms(&self) -> Vec<String> {
        vec!["linux/amd64".into()]
    }
    fn identity_hash(&self) -> u64 {
        // `cached = false` measures the trait's default, which hashes the identity each time.
        if self.cached {
            self.id_hash
        } else {
            hash_str(&self.id)
        }
    }
}

fn nodes(n: usize, cached: bool) -> Vec<BenchNode> {
    (0..n)
        .map(|i| {
            let id = format!("buildkitd-{i}.buildkitd.buildkit.svc");
            BenchNode {
                id_hash: hash_str(&id),
                id,
                // Uneven loads so that some keys spill.
                load: (i * 7) % 5,
                cached,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let placement = Placement::new(PlacementConfig::default());
    let traits: Vec<BuildTraits> = (0..64)
        .map(|i| BuildTraits {
            platforms: vec!["linux/amd64".into()],
            key: Some(AffinityKey::new(
                KeySource::Vcs,
                format!("vcs|git.example.com/org/p{i}|||Dockerfile|"),
            )),
            ..Default::default()
        })
        .collect();
    let keyless = BuildTraits {
        platforms: vec!["linux/amd64".into()],
        nonce: 12345,
        ..Default::default()
    };
    let mut g = c.benchmark_group("choose");
    for n in [3, 30, 300] {
        for (label, cached) in [("keyed", true), ("keyed_uncached_id", false)] {
            let pool = nodes(n, cached);
            let mut i = 0;
            g.bench_with_input(BenchmarkId::new(label, n), &pool, |b, pool| {
                b.iter(|| {
                    i = (i + 1) & 63;
                    black_box(placement.choose(black_box(pool), &traits[i]).unwrap())
                })
            });
        }
        let pool = nodes(n, true);
        g.bench_with_input(BenchmarkId::new("keyless", n), &pool, |b, pool| {
            b.iter(|| black_box(placement.choose(black_box(pool), &keyless).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
