#!/usr/bin/env bash
# The router against the real buildkitd, as ratios against a direct connection measured in the
# same run (docs/performance.md).
#
# One real buildkitd (OCI worker, its own --root under a scratch directory) is reached:
#   direct   -> buildkitd itself
#   router   -> buildkit-router (release build, default flags: --log info)   -> buildkitd
#               (a build's Session always crosses the router's Session relay: the router
#               answers the tunnel itself, docs/session-relay.md)
#   NAME     -> other router binaries or flags, ROUTER_VARIANTS="NAME=/path/to/buildkit-router[,FLAG...]
#               ..." (before and after a change in the same run; optional)
#   haproxy  -> HAProxy 2.6, mode http, proto h2 both sides                 -> buildkitd
#   nginx    -> nginx, listen http2, grpc_pass grpc:// (upstream keepalive)   -> buildkitd
#
# Part "unary": h2load sends Control/ListWorkers (an empty request) to each target in rotating
# rounds, at 1 connection x 1 stream and at 4 connections x 16 streams. Reports the median
# req/s of the rounds, its ratio to direct, and CPU time (user+system from /proc/PID/stat) per
# call of the proxy process and of buildkitd.
#
# Part "build": a real `buildctl build` of `FROM scratch` + `COPY . /ctx` with a CONTEXT_MIB
# context of incompressible files, direct, through the router and through HAProxy
# (BUILD_PEERS=0: without it), in rotating rounds; `buildctl prune --all` before each, so every
# build uploads the whole context and copies it. Reports the median wall time, direct/router
# ratios (>= 0.95 is the target), the time of the "load build context" step (the upload itself, from buildctl's rawjson
# progress), and the router's CPU per MiB.
#
# Usage: benches/real.sh [unary|build|all]   (from the repository root, as root: buildkitd
#        needs it; installs nghttp2-client, haproxy and nginx when missing)
# Env:   BUILDKIT_PEERS_BIN (.peers/bin)  ROUNDS (5)  REQUESTS_1 (3000)  REQUESTS_64 (20000)
#        CONTEXT_MIB (512)  BUILD_ROUNDS (3)  BUILD_KEY (bench; empty: keyless)  ROUTER_BIN (built here)  ROUTER_ARGS ()
#        ROUTER_VARIANTS ()  KEEP_WORKDIR
set -euo pipefail

PART=${1:-all}
ROUNDS=${ROUNDS:-5}
REQUESTS_1=${REQUESTS_1:-3000}
REQUESTS_64=${REQUESTS_64:-20000}
CONTEXT_MIB=${CONTEXT_MIB:-512}
BUILD_ROUNDS=${BUILD_ROUNDS:-3}
ROUTER_ARGS=${ROUTER_ARGS:-}
METHOD=/moby.buildkit.v1.Control/ListWorkers
RUN_TIMEOUT=300

cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
PEERS=${BUILDKIT_PEERS_BIN:-$ROOT/.peers/bin}
for p in buildkitd buildctl; do
    [[ -x $PEERS/$p ]] || { log "$PEERS/$p is missing (scripts/install-buildkit.sh)"; exit 1; }
done
[[ $(id -u) == 0 ]] || { log "buildkitd needs root"; exit 1; }

WORK=$(mktemp -d /tmp/buildkit-router-real.XXXXXX)
PIDS=()
BK_ROOT=$WORK/buildkitd
cleanup() {
    # Routers, HAProxy and nginx first, then buildkitd and its mounts, then the files.
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    cleanup_started_daemon
    cleanup_started
}
cleanup_started_daemon() {
    local m
    if [[ -n ${BK_PID:-} ]]; then
        kill "$BK_PID" 2>/dev/null || true
        wait "$BK_PID" 2>/dev/null || true
    fi
    # buildkitd leaves overlay mounts under its root when killed: unmount them, deepest first.
    { grep -o " $BK_ROOT[^ ]*" /proc/self/mounts 2>/dev/null || true; } | sort -r |
        while read -r m; do
            umount -l "$m" 2>/dev/null || true
        done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
trap 'exit 141' PIPE

need_tools h2load=nghttp2-client nghttp=nghttp2-client haproxy=haproxy nginx=nginx time=time

if [[ -z ${ROUTER_BIN:-} ]]; then
    log "building the router (release)"
    cargo build --release --quiet --bin buildkit-router
    ROUTER_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/buildkit-router
fi

# --- buildkitd -------------------------------------------------------------------------------
B=$(free_port)
mkdir -p "$BK_ROOT"
PATH=$PEERS:$PATH "$PEERS/buildkitd" --addr "tcp://127.0.0.1:$B" --root "$BK_ROOT" \
    --oci-worker=true --containerd-worker=false --oci-worker-net=host \
    --otel-socket-path "$BK_ROOT/otel-grpc.sock" >"$WORK/buildkitd.log" 2>&1 &
BK_PID=$!
wait_port "$B" buildkitd

# --- routers, HAProxy, nginx -----------------------------------------------------------------
start_router() { # name binary extra-args...
    local name=$1 bin=$2 port admin
    shift 2
    port=$(free_port)
    admin=$(free_port)
    # shellcheck disable=SC2086
    "$bin" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --backend "tcp://127.0.0.1:$B" $ROUTER_ARGS "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    PROXY_PID[$name]=$!
    PORT[$name]=$port
}
declare -A PORT PROXY_PID
PORT[direct]=$B
PROXY_PID[direct]=""
start_router router "$ROUTER_BIN"
VARIANTS=()
for v in ${ROUTER_VARIANTS:-}; do
    IFS=, read -r -a spec <<<"${v#*=}"
    start_router "${v%%=*}" "${spec[@]}"
    VARIANTS+=("${v%%=*}")
done
PORT[haproxy]=$(free_port)
start_haproxy "${PORT[haproxy]}" "$B"
PROXY_PID[haproxy]=$HAPROXY_PID
PORT[nginx]=$(free_port)
start_nginx "${PORT[nginx]}" "$B"
PROXY_PID[nginx]=$NGINX_PID
for name in "${!PORT[@]}"; do
    wait_port "${PORT[$name]}" "$name"
done

printf '\0\0\0\0\0' >"$WORK/body"
HDRS=(-H 'content-type: application/grpc' -H 'te: trailers')
HOST_LINE="host: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); buildkitd $("$PEERS/buildkitd" --version | awk '{print $3}'); router $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo +dirty)"

# --- unary -----------------------------------------------------------------------------------
unary() {
    local targets=(direct router haproxy nginx) name out
    targets+=("${VARIANTS[@]}")
    for name in "${targets[@]}"; do
        out=$(timeout 10 nghttp -v --null-out "${HDRS[@]}" -d "$WORK/body" \
            "http://127.0.0.1:${PORT[$name]}$METHOD" 2>&1 || true)
        grep -q 'grpc-status: 0' <<<"$out" || { log "$name: no grpc-status 0:"; log "$out"; exit 1; }
    done
    declare -A RPS PCPU BCPU CALLS
    local modes=("1 1 $REQUESTS_1" "4 16 $REQUESTS_64") mode c m n round k order p0 p1 b0 b1 rps ok
    # Warm-up: connections, the router's ListWorkers cache, CPU frequency.
    for name in "${targets[@]}"; do
        timeout "$RUN_TIMEOUT" h2load -n 2000 -c 4 -m 16 "${HDRS[@]}" -d "$WORK/body" \
            "http://127.0.0.1:${PORT[$name]}$METHOD" >/dev/null
    done
    for round in $(seq 1 "$ROUNDS"); do
        k=$(((round - 1) % ${#targets[@]}))
        order=("${targets[@]:k}" "${targets[@]:0:k}")
        for mode in "${modes[@]}"; do
            read -r c m n <<<"$mode"
            for name in "${order[@]}"; do
                # shellcheck disable=SC2086
                p0=$(ticks ${PROXY_PID[$name]}) b0=$(ticks "$BK_PID")
                out=$(timeout "$RUN_TIMEOUT" h2load -n "$n" -c "$c" -m "$m" "${HDRS[@]}" \
                    -d "$WORK/body" "http://127.0.0.1:${PORT[$name]}$METHOD")
                # shellcheck disable=SC2086
                p1=$(ticks ${PROXY_PID[$name]}) b1=$(ticks "$BK_PID")
                ok=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
                [[ $ok == "$n" ]] || { log "$name ${c}x$m round $round: $ok of $n succeeded"; log "$out"; exit 1; }
                rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
                RPS[$name.$c]="${RPS[$name.$c]:-} $rps"
                PCPU[$name.$c]=$((${PCPU[$name.$c]:-0} + p1 - p0))
                BCPU[$name.$c]=$((${BCPU[$name.$c]:-0} + b1 - b0))
                CALLS[$name.$c]=$((${CALLS[$name.$c]:-0} + n))
                log "unary round $round ${c}x$m: $name $rps req/s"
            done
        done
    done
    echo
    echo "== unary: h2load POST $METHOD (empty request), real buildkitd, $ROUNDS rotating rounds"
    echo "$HOST_LINE"
    printf '%-8s %-6s %10s %8s %12s %12s\n' target conns "req/s" "x direct" "proxy us/call" "bkd us/call"
    local key med
    for mode in "${modes[@]}"; do
        read -r c m n <<<"$mode"
        local direct_med
        direct_med=$(median <<<"${RPS[direct.$c]}")
        for name in "${targets[@]}"; do
            key=$name.$c
            med=$(median <<<"${RPS[$key]}")
            awk -v t="$name" -v cm="${c}x$m" -v r="$med" -v d="$direct_med" -v pc="${PCPU[$key]}" \
                -v bc="${BCPU[$key]}" -v tick="$TICK_US" -v calls="${CALLS[$key]}" \
                'BEGIN { printf "%-8s %-6s %10.0f %7.2fx %12s %12.1f\n", t, cm, r, r / d,
                    (t == "direct" ? "-" : sprintf("%.1f", pc * tick / calls)), bc * tick / calls }'
        done
    done
    echo "req/s per round:"
    for key in "${!RPS[@]}"; do
        echo "  $key:${RPS[$key]}"
    done | sort
}

# --- build -----------------------------------------------------------------------------------
make_context() {
    local ctx=$WORK/context i files
    mkdir -p "$ctx/data"
    printf 'FROM scratch\nCOPY data /ctx/\n' >"$ctx/Dockerfile"
    # 8 MiB incompressible files (a few small ones too, as a real context has).
    files=$((CONTEXT_MIB / 8))
    for i in $(seq 1 "$files"); do
        head -c $((8 << 20)) /dev/urandom >"$ctx/data/blob$i"
    done
    for i in $(seq 1 64); do
        head -c 1000 /dev/urandom >"$ctx/data/small$i"
    done
    echo "$ctx"
}

# Seconds between the start and the end of buildctl's "load build context" vertex.
context_seconds() { # rawjson progress file
    python3 - "$1" <<'EOF'
import json, sys
from datetime import datetime
def t(s):
    s = s.rstrip("Z")
    if "." in s:
        head, frac = s.split(".")
        s = head + "." + frac[:6]
    return datetime.fromisoformat(s)
start = end = None
for line in open(sys.argv[1]):
    try:
        ev = json.loads(line)
    except ValueError:
        continue
    for v in ev.get("vertexes") or []:
        if v.get("name") == "[internal] load build context":
            if v.get("started"):
                start = t(v["started"]) if start is None else min(start, t(v["started"]))
            if v.get("completed"):
                end = t(v["completed"]) if end is None else max(end, t(v["completed"]))
print("%.3f" % ((end - start).total_seconds()) if start and end else "nan")
EOF
}

build() {
    local targets=(direct router) ctx name round k order t0 t1 p0 p1 b0 b1 secs csecs
    targets+=("${VARIANTS[@]}")
    # HAProxy carries the same build (one daemon, so stream-level forwarding works): what a
    # generic balancer that does not terminate the Session costs a build on this machine.
    # BUILD_PEERS=0 leaves it out. nginx (grpc_pass) cannot carry a build: the Session's context
    # upload is cancelled after about 1 MB.
    [[ ${BUILD_PEERS:-1} == 0 ]] || targets+=(haproxy)
    log "making a $CONTEXT_MIB MiB context"
    ctx=$(make_context)
    # BCPU: buildkitd's and buildctl's own CPU (ticks), to tell how busy the two cores were.
    declare -A WALL CTX PCPU BCPU WSUM
    local bctl=("$PEERS/buildctl")
    # BUILD_KEY names the build's project (an affinity key, as buildx's vcs:source does for a
    # build in a git checkout, the usual CI build): such a build is placed at once and its
    # Session passed through. BUILD_KEY= (empty) builds keyless: the router reads the Dockerfile
    # through the Session for the content key, so the Session is held and relayed.
    local opts=(--frontend dockerfile.v0 --local "context=$ctx" --local "dockerfile=$ctx")
    [[ -z ${BUILD_KEY-bench} ]] || opts+=(--opt "build-arg:BUILDKIT_ROUTER_KEY=${BUILD_KEY-bench}")
    # Warm-up (also checks every path builds).
    for name in "${targets[@]}"; do
        "${bctl[@]}" --addr "tcp://127.0.0.1:$B" prune --all >/dev/null
        timeout "$RUN_TIMEOUT" "${bctl[@]}" --addr "tcp://127.0.0.1:${PORT[$name]}" build "${opts[@]}" \
            --progress plain >"$WORK/warm.$name.log" 2>&1 || { log "$name: build failed"; cat "$WORK/warm.$name.log" >&2; exit 1; }
    done
    for round in $(seq 1 "$BUILD_ROUNDS"); do
        k=$(((round - 1) % ${#targets[@]}))
        order=("${targets[@]:k}" "${targets[@]:0:k}")
        for name in "${order[@]}"; do
            "${bctl[@]}" --addr "tcp://127.0.0.1:$B" prune --all >/dev/null
            sync
            # shellcheck disable=SC2086
            p0=$(ticks ${PROXY_PID[$name]}) b0=$(ticks "$BK_PID")
            t0=$(date +%s.%N)
            /usr/bin/time -f '%U %S' -o "$WORK/buildctl.cpu" \
                timeout "$RUN_TIMEOUT" "${bctl[@]}" --addr "tcp://127.0.0.1:${PORT[$name]}" build "${opts[@]}" \
                --progress rawjson 2>"$WORK/build.$name.$round.json" || {
                log "$name: build failed"
                tail -5 "$WORK/build.$name.$round.json" >&2
                exit 1
            }
            t1=$(date +%s.%N)
            # shellcheck disable=SC2086
            p1=$(ticks ${PROXY_PID[$name]}) b1=$(ticks "$BK_PID")
            BCPU[$name]=$((${BCPU[$name]:-0} + b1 - b0 + $(awk -v tick="$TICK_US" \
                '{ printf "%d", ($1 + $2) * 1000000 / tick }' "$WORK/buildctl.cpu")))
            secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
            csecs=$(context_seconds "$WORK/build.$name.$round.json")
            WALL[$name]="${WALL[$name]:-} $secs"
            WSUM[$name]=$(awk -v a="${WSUM[$name]:-0}" -v b="$secs" 'BEGIN { print a + b }')
            CTX[$name]="${CTX[$name]:-} $csecs"
            PCPU[$name]=$((${PCPU[$name]:-0} + p1 - p0))
            log "build round $round: $name ${secs}s (context ${csecs}s)"
        done
    done
    echo
    echo "== build: buildctl build, FROM scratch + COPY of a $CONTEXT_MIB MiB context, $BUILD_ROUNDS rotating rounds, prune before each"
    echo "$HOST_LINE"
    # "cores busy": CPU of buildctl, buildkitd and the proxy over the builds' wall time (2 means
    # the machine had no core to spare: every ms of proxy CPU then lengthens the build).
    printf '%-8s %10s %16s %12s %16s %14s %18s %11s\n' target "wall s" "direct/target" "context s" \
        "direct/target" "proxy CPU ms/MiB" "client+daemon CPU s" "cores busy"
    local dw dc
    dw=$(median <<<"${WALL[direct]}")
    dc=$(median <<<"${CTX[direct]}")
    for name in "${targets[@]}"; do
        awk -v t="$name" -v w="$(median <<<"${WALL[$name]}")" -v c="$(median <<<"${CTX[$name]}")" \
            -v dw="$dw" -v dc="$dc" -v pc="${PCPU[$name]}" -v tick="$TICK_US" -v mib="$CONTEXT_MIB" \
            -v n="$BUILD_ROUNDS" -v bc="${BCPU[$name]}" -v ws="${WSUM[$name]}" \
            'BEGIN { printf "%-8s %10.2f %15.3fx %12.2f %15.3fx %14s %18.2f %11.2f\n", t, w, dw / w, c, dc / c,
                (t == "direct" ? "-" : sprintf("%.3f", pc * tick / 1000 / (mib * n))),
                bc * tick / 1e6 / n, (bc + pc) * tick / 1e6 / ws }'
    done
    echo "wall s per round:"
    for name in "${targets[@]}"; do
        echo "  $name:${WALL[$name]} (context:${CTX[$name]})"
    done
}

case $PART in
unary) unary ;;
build) build ;;
all)
    unary
    build
    ;;
*)
    log "usage: $0 [unary|build|all]"
    exit 2
    ;;
esac
