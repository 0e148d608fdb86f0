#!/usr/bin/env bash
# Unary gRPC load through buildkit-router and its peers, as ratios against a direct connection
# measured in the same run.
#
# One fake buildkitd (examples/fake_buildkitd.rs, the test suite's fake) is driven with h2load:
#   direct   -> the fake itself
#   router   -> buildkit-router (release build)          -> fake
#   haproxy  -> HAProxy, mode http, proto h2 both sides  -> fake
#   nginx    -> nginx, listen http2, grpc_pass grpc://   -> fake
#   rtr-warn -> the same router with --log warn (diagnostic: cost of the per-call tracing span)
# Everything listens on 127.0.0.1 only. Every load run is bounded (-n requests, `timeout`).
# The targets are driven in alternating rounds so drift on a noisy machine hits them all alike.
#
# Usage: benches/peers.sh            (from the repository root; installs missing packages)
# Env:   REQUESTS (20000) CLIENTS (8) STREAMS (16) ROUNDS (3) KEEP_WORKDIR (unset)
set -euo pipefail

REQUESTS=${REQUESTS:-20000}
CLIENTS=${CLIENTS:-8}
STREAMS=${STREAMS:-16}
ROUNDS=${ROUNDS:-3}
METHOD=/moby.buildkit.v1.Control/ListWorkers
RUN_TIMEOUT=120

cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
WORK=$(mktemp -d /tmp/buildkit-router-peers.XXXXXX)
PIDS=()
trap cleanup_started EXIT
trap 'exit 130' INT TERM HUP
trap 'exit 141' PIPE

# --- tools -----------------------------------------------------------------------------------
need_tools h2load=nghttp2-client nghttp=nghttp2-client haproxy=haproxy nginx=nginx

# --- builds (release; reused when up to date) ------------------------------------------------
log "building the router and the fake daemon (release)"
cargo build --release --quiet --bin buildkit-router --example fake_buildkitd
ROUTER_BIN=$ROOT/target/release/buildkit-router
FAKE_BIN=$ROOT/target/release/examples/fake_buildkitd


# --- backend ---------------------------------------------------------------------------------
"$FAKE_BIN" >"$WORK/fake.out" 2>"$WORK/fake.err" &
PIDS+=($!)
FAKE_PID=$!
for _ in $(seq 1 100); do
    grep -q '^listening ' "$WORK/fake.out" 2>/dev/null && break
    sleep 0.1
done
BACKEND_ADDR=$(sed -n 's/^listening //p' "$WORK/fake.out")
[[ -n $BACKEND_ADDR ]] || { log "fake daemon did not start: $(cat "$WORK/fake.err")"; exit 1; }
B=${BACKEND_ADDR##*:}

# --- router ----------------------------------------------------------------------------------
R=$(free_port)
RA=$(free_port)
# Default settings (including --log info, as a user would run it).
"$ROUTER_BIN" --listen "127.0.0.1:$R" --admin-listen "127.0.0.1:$RA" \
    --backend "tcp://127.0.0.1:$B" >"$WORK/router.log" 2>&1 &
PIDS+=($!)
ROUTER_PID=$!
# A second router with --log warn: how much of the per-call cost is the tracing span that
# `--log info` (the default) turns on. Not a different product, a diagnostic.
RW=$(free_port)
RWA=$(free_port)
"$ROUTER_BIN" --listen "127.0.0.1:$RW" --admin-listen "127.0.0.1:$RWA" --log warn \
    --backend "tcp://127.0.0.1:$B" >"$WORK/router-warn.log" 2>&1 &
PIDS+=($!)
ROUTER_WARN_PID=$!

# --- HAProxy ---------------------------------------------------------------------------------
H=$(free_port)
start_haproxy "$H" "$B"

# --- nginx -----------------------------------------------------------------------------------
N=$(free_port)
start_nginx "$N" "$B"

NAMES=(direct router rtr-warn haproxy nginx)
declare -A PORT=([direct]=$B [router]=$R [rtr-warn]=$RW [haproxy]=$H [nginx]=$N)
for name in "${NAMES[@]}"; do
    wait_port "${PORT[$name]}" "$name"
done

# --- a real gRPC answer through each ---------------------------------------------------------
printf '\0\0\0\0\0' >"$WORK/body"
HDRS=(-H 'content-type: application/grpc' -H 'te: trailers')
for name in "${NAMES[@]}"; do
    url=http://127.0.0.1:${PORT[$name]}$METHOD
    out=$(timeout 10 nghttp -v --null-out "${HDRS[@]}" -d "$WORK/body" "$url" 2>&1 || true)
    if ! grep -q 'grpc-status: 0' <<<"$out"; then
        log "$name: no grpc-status 0 from $url:"
        log "$out"
        exit 1
    fi
done
log "every target answers ListWorkers with grpc-status 0"

# --- CPU accounting: user+system clock ticks of a process and its children (nginx workers) ---
declare -A PROXY_PID=([direct]="" [router]=$ROUTER_PID [rtr-warn]=$ROUTER_WARN_PID [haproxy]=$HAPROXY_PID [nginx]=$NGINX_PID)
declare -A PCPU BCPU

# --- load ------------------------------------------------------------------------------------
h2run() { # name requests logfile -> prints h2load's output
    local url=http://127.0.0.1:${PORT[$1]}$METHOD
    timeout "$RUN_TIMEOUT" h2load -n "$2" -c "$CLIENTS" -m "$STREAMS" "${HDRS[@]}" \
        -d "$WORK/body" --log-file="$3" "$url"
}

# Warm-up: connections, caches, CPU frequency.
for name in "${NAMES[@]}"; do
    h2run "$name" 2000 /dev/null >/dev/null
done

declare -A RPS LAT
for round in $(seq 1 "$ROUNDS"); do
    # Rotate the order each round.
    k=$(((round - 1) % ${#NAMES[@]}))
    order=("${NAMES[@]:k}" "${NAMES[@]:0:k}")
    for name in "${order[@]}"; do
        p0=$(ticks ${PROXY_PID[$name]}) b0=$(ticks "$FAKE_PID")
        out=$(h2run "$name" "$REQUESTS" "$WORK/$name.$round.lat")
        p1=$(ticks ${PROXY_PID[$name]}) b1=$(ticks "$FAKE_PID")
        PCPU[$name]=$((${PCPU[$name]:-0} + p1 - p0))
        BCPU[$name]=$((${BCPU[$name]:-0} + b1 - b0))
        done_ok=$(sed -n 's/^requests: .* \([0-9]*\) succeeded, \([0-9]*\) failed, \([0-9]*\) errored.*/\1 \2 \3/p' <<<"$out")
        read -r ok failed errored <<<"$done_ok"
        if [[ $ok != "$REQUESTS" ]]; then
            log "$name round $round: $ok of $REQUESTS succeeded ($failed failed, $errored errored)"
            log "$out"
            exit 1
        fi
        rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
        RPS[$name]="${RPS[$name]:-} $rps"
        cat "$WORK/$name.$round.lat" >>"$WORK/$name.lat"
        log "round $round: $name $rps req/s"
    done
done

# --- report ----------------------------------------------------------------------------------
# h2load's log: start time, status, request duration (us).
lat_stats() { # file -> "mean p50 p99" in microseconds
    cut -f3 "$1" | sort -g | awk '{a[NR]=$1; s+=$1} END {
        i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
        i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
        printf "%.0f %.0f %.0f\n", s / NR, a[i50], a[i99] }'
}

declare -A MED MEAN P50 P99
for name in "${NAMES[@]}"; do
    MED[$name]=$(median <<<"${RPS[$name]}")
    read -r MEAN[$name] P50[$name] P99[$name] < <(lat_stats "$WORK/$name.lat")
done

echo
echo "h2load -n $REQUESTS -c $CLIENTS -m $STREAMS, POST $METHOD (5-byte empty message), $ROUNDS rounds per target"
echo "host: $(nproc) CPUs; $(h2load --version | head -1); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1 | cut -d' ' -f3)"
echo
printf '%-8s %10s %8s %9s %9s %9s %7s %7s %11s %11s\n' target "req/s" "x dir" "mean us" "p50 us" "p99 us" \
    "p50 x" "p99 x" "proxy us/r" "daemon us/r"
total=$((REQUESTS * ROUNDS))
for name in "${NAMES[@]}"; do
    awk -v n="$name" -v r="${MED[$name]}" -v rd="${MED[direct]}" \
        -v m="${MEAN[$name]}" -v p5="${P50[$name]}" -v p9="${P99[$name]}" \
        -v p5d="${P50[direct]}" -v p9d="${P99[direct]}" \
        -v pc="${PCPU[$name]}" -v bc="${BCPU[$name]}" -v tick="$TICK_US" -v total="$total" \
        'BEGIN { printf "%-8s %10.0f %7.2fx %9d %9d %9d %6.2fx %6.2fx %11.1f %11.1f\n",
            n, r, r / rd, m, p5, p9, p5 / p5d, p9 / p9d, pc * tick / total, bc * tick / total }'
done
echo
echo "req/s: median of the rounds; latencies: every request of every round (h2load --log-file)."
echo "proxy us/r, daemon us/r: CPU time (user+system) the proxy (nginx: master+workers) and the fake"
echo "daemon spent per request, from /proc/PID/stat around each run ($TICK_US us ticks)."
for name in "${NAMES[@]}"; do
    echo "  $name req/s per round:${RPS[$name]}"
done
