//! Decode cost of the request peeks the router does on every build, over real captured bytes
//! (tests/fixtures).

use std::hint::black_box;

use buildkit_router::wire::{decode_solve, decode_status_ref, parse_frame_header};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The first message of stream `stream` (connection 0) in a fixture capture.
fn fixture_message(scenario: &str, stream: u64) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/{scenario}.requests.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let record: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .find(|r| r["conn"] == 0 && r["stream"] == stream)
        .unwrap_or_else(|| panic!("{scenario}: no stream {stream}"));
    let hex = record["first_message_hex"]
        .as_str()
        .expect("a first message");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn bench_wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    let solves = [
        (
            "decode_solve/buildctl-dockerfile",
            fixture_message("buildctl-dockerfile", 3),
        ),
        (
            "decode_solve/buildctl-importcache",
            fixture_message("buildctl-dockerfile-importcache", 5),
        ),
        (
            "decode_solve/buildx-bake-target",
            fixture_message("buildx-bake", 29),
        ),
        ("decode_solve/buildx-git", fixture_message("buildx-git", 23)),
    ];
    for (name, msg) in &solves {
        group.throughput(Throughput::Bytes(msg.len() as u64));
        group.bench_function(*name, |b| b.iter(|| decode_solve(black_box(msg)).unwrap()));
    }
    // What routing does with a Solve: decode, then list the sessions to bind.
    let bake = &solves[2].1;
    group.throughput(Throughput::Bytes(bake.len() as u64));
    group.bench_function("decode_solve+session_ids/buildx-bake-target", |b| {
        b.iter(|| decode_solve(black_box(bake)).unwrap().session_ids().len())
    });

    let status = fixture_message("buildctl-dockerfile", 5);
    group.throughput(Throughput::Bytes(status.len() as u64));
    group.bench_function("decode_status_ref", |b| {
        b.iter(|| decode_status_ref(black_box(&status)).unwrap().len())
    });

    let prefix = [0u8, 0, 0, 0, 27];
    group.throughput(Throughput::Bytes(prefix.len() as u64));
    group.bench_function("parse_frame_header", |b| {
        b.iter(|| parse_frame_header(black_box(&prefix), 16 << 20).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_wire);
criterion_main!(benches);
