#!/usr/bin/env bash
# Runs every fuzz target for a bounded time on the stable toolchain: builds the cargo-fuzz
# targets with the same coverage instrumentation cargo-fuzz uses (SanitizerCoverage through
# stable `-C passes` / `-C llvm-args`; no AddressSanitizer, which needs nightly), then runs each
# libFuzzer binary from the committed seeds.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# A crash (panic, failed invariant, RSS over the limit, timeout) stops the run with its input in
# fuzz/artifacts/TARGET/. Put that input in fuzz/regressions/TARGET/ (tests/fuzz_corpus.rs
# replays it on every `cargo test`) and fix the decoder.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(wire grpc_framing authority session_tunnel session_inner_h2 endpoint_slices discovery_flags)
fi

export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target}
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps RUSTFLAGS off build scripts and proc-macros (as cargo-fuzz does).
host=$(rustc -vV | sed -n 's/^host: //p')
started=$SECONDS
cargo build --release --bins --target "$host"
echo "fuzz targets built in $((SECONDS - started)) s"

failed=0
for t in "${targets[@]}"; do
  work="$CARGO_TARGET_DIR/corpus/$t"
  mkdir -p "$work" "artifacts/$t"
  seeds=()
  [ -d "corpus/$t" ] && seeds+=("corpus/$t")
  [ -d "regressions/$t" ] && seeds+=("regressions/$t")
  echo "=== $t: ${seconds} s"
  if ! "$CARGO_TARGET_DIR/$host/release/$t" \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=262144 \
      -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
      "$work" "${seeds[@]}" 2>"$CARGO_TARGET_DIR/$t.log"; then
    tail -n 40 "$CARGO_TARGET_DIR/$t.log"
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    failed=1
  else
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb|cov: " "$CARGO_TARGET_DIR/$t.log" | tail -n 3
  fi
done
exit $failed
