#!/usr/bin/env bash
# A first run on a plain machine, no cluster needed: two local buildkitd, the router in front of
# them, and one real build through the router.
#
#   scripts/demo.sh          start everything (installing the peers if missing), run one build,
#                            print the buildctl/buildx lines to use
#   scripts/demo.sh stop     stop the router and the daemons, remove their state
#
# Needs root (buildkitd runs rootful with runc), Go (to build the peers once) and cargo.
# Environment: DEMO_DIR (state, default /tmp/buildkit-router-demo), DEMO_PORT (router, default
# 1234; the daemons take the next two ports), DEMO_ADMIN_PORT (default 9180),
# BUILDKIT_ROUTER_BIN (a router binary; default: cargo build --release),
# BUILDKIT_PEERS_BIN (installed peers; default: scripts/install-buildkit.sh).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${DEMO_DIR:-/tmp/buildkit-router-demo}"
port="${DEMO_PORT:-1234}"
admin_port="${DEMO_ADMIN_PORT:-9180}"

say() { echo "demo: $*" >&2; }

stop() {
  local pidfile pid
  for pidfile in "$dir"/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      # buildkitd and the router drain on SIGTERM; give them a moment, then insist.
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  if [ -e "$dir/.buildkit-router-demo" ]; then
    # A killed buildkitd can leave overlay mounts under its root.
    { grep -o " $dir/[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$dir"
  fi
  say "stopped; $dir removed"
}

if [ "${1:-}" = "stop" ]; then
  stop
  exit 0
fi
if [ -n "${1:-}" ]; then
  echo "usage: $0 [stop]" >&2
  exit 2
fi
if [ -e "$dir/router.pid" ]; then
  say "a demo is already running in $dir; run '$0 stop' first"
  exit 1
fi

bin="${BUILDKIT_PEERS_BIN:-}"
if [ -z "$bin" ]; then
  bin=$("$root/scripts/install-buildkit.sh" | tail -n 1)
fi
router="${BUILDKIT_ROUTER_BIN:-}"
if [ -z "$router" ]; then
  say "building the router (cargo build --release)"
  (cd "$root" && cargo build --release --locked --quiet)
  router="$root/target/release/buildkit-router"
fi
export PATH="$bin:$PATH"

# Refuse to start over ports something else already serves: the demo would talk to that instead.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$port" $((port + 1)) $((port + 2)) "$admin_port"; do
  if port_in_use "$p"; then
    say "127.0.0.1:$p is already in use; pick free ports with DEMO_PORT (uses it and the next two) and DEMO_ADMIN_PORT"
    exit 1
  fi
done

mkdir -p "$dir"
touch "$dir/.buildkit-router-demo" # `stop` removes only a folder carrying this mark
trap 'say "failed; stopping what was started"; stop' ERR

# wait_for WHAT PIDFILE CMD...: retries CMD for up to 30 s while the process started for it lives.
wait_for() {
  local what=$1 pid; pid=$(cat "$2"); shift 2
  for _ in $(seq 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "$what exited; its log:"; cat "$dir/$what.log" >&2 || true
      return 1
    fi
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  say "$what did not come up; see $dir/*.log"
  return 1
}

backends=()
for i in 1 2; do
  p=$((port + i))
  setsid buildkitd --addr "tcp://127.0.0.1:$p" --root "$dir/buildkitd-$i" \
    --oci-worker=true --containerd-worker=false --oci-worker-net=host \
    --otel-socket-path="$dir/buildkitd-$i.otel.sock" \
    >"$dir/buildkitd-$i.log" 2>&1 </dev/null &
  echo $! >"$dir/buildkitd-$i.pid"
  wait_for "buildkitd-$i" "$dir/buildkitd-$i.pid" buildctl --addr "tcp://127.0.0.1:$p" debug workers
  backends+=(--backend "tcp://127.0.0.1:$p")
done

# The command that runs the router in front of real addresses, as in the README.
setsid "$router" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" "${backends[@]}" \
  >"$dir/router.log" 2>&1 </dev/null &
echo $! >"$dir/router.pid"
wait_for "router" "$dir/router.pid" buildctl --addr "tcp://127.0.0.1:$port" debug workers

# One real build through the router: FROM scratch, a static busybox for the RUN step.
ctx="$dir/context"
mkdir -p "$ctx"
busybox=/bin/busybox # Debian busybox-static: a static binary runs in FROM scratch
cp "$busybox" "$ctx/busybox"
cat >"$ctx/Dockerfile" <<'EOF'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /out && echo built through buildkit-router > /out/hello.txt"]
EOF
say "running one build through the router"
buildctl --addr "tcp://127.0.0.1:$port" build --frontend dockerfile.v0 \
  --local context="$ctx" --local dockerfile="$ctx" --output type=local,dest="$dir/out" >&2
trap - ERR

# The stop line repeats the settings this demo was started with.
stop_command="$0 stop"
for v in DEMO_DIR DEMO_PORT DEMO_ADMIN_PORT; do
  [ -n "${!v:-}" ] && stop_command="$v=${!v} $stop_command"
done

cat <<EOF

The demo build wrote: $(cat "$dir/out/out/hello.txt")

buildkit-router listens on tcp://127.0.0.1:$port in front of two buildkitd
(tcp://127.0.0.1:$((port + 1)), tcp://127.0.0.1:$((port + 2))). Logs and state: $dir

Use it:
  export PATH="$bin:\$PATH"
  buildctl --addr tcp://127.0.0.1:$port build --frontend dockerfile.v0 --local context=. --local dockerfile=.
  buildx create --name demo --driver remote tcp://127.0.0.1:$port
  buildx build --builder demo .
  buildx du --builder demo
  curl -s http://127.0.0.1:$admin_port/status; curl -s http://127.0.0.1:$admin_port/metrics

Stop everything:
  $stop_command
EOF
