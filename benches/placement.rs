//! Criterion benchmarks of one placement decision (filled in below).
fn main() {}
