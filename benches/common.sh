# Shared helpers of the out-of-process benchmarks (benches/peers.sh, benches/real.sh).
# Sourced, not run. Expects WORK (a scratch directory) and PIDS (an array) to exist.

log() { printf '%s\n' "$*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port name
    local i
    for i in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    log "$2 did not listen on 127.0.0.1:$1"
    exit 1
}

# Stops every process this script started (by pid), then removes WORK unless KEEP_WORKDIR is set.
cleanup_started() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -z ${KEEP_WORKDIR:-} ]]; then
        rm -rf "$WORK"
    else
        log "work directory kept: $WORK"
    fi
}

# Installs the Debian packages providing the given commands, when missing.
need_tools() { # command=package ...
    local want=() pair
    for pair in "$@"; do
        command -v "${pair%%=*}" >/dev/null || want+=("${pair#*=}")
    done
    if ((${#want[@]})); then
        log "installing: ${want[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${want[@]}"
    fi
}

TICK_US=$((1000000 / $(getconf CLK_TCK)))

# utime+stime clock ticks of the given processes and their direct children (nginx workers).
ticks() { # pid...
    local p t=0 all=()
    for p in "$@"; do
        all+=("$p")
        mapfile -t -O "${#all[@]}" all < <(pgrep -P "$p" || true)
    done
    for p in "${all[@]}"; do
        [[ -r /proc/$p/stat ]] || continue
        t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$t"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# HAProxy 2.6, mode http, h2c on both sides, in front of 127.0.0.1:$2. Sets HAPROXY_PID.
start_haproxy() { # listen-port backend-port
    cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend grpc_in
    bind 127.0.0.1:$1 proto h2
    default_backend buildkitd
backend buildkitd
    server bk0 127.0.0.1:$2 proto h2
EOF
    haproxy -c -q -f "$WORK/haproxy.cfg"
    haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
    PIDS+=($!)
    HAPROXY_PID=$!
}

# nginx, listen http2, grpc_pass to 127.0.0.1:$2 with upstream keepalive. Sets NGINX_PID.
start_nginx() { # listen-port backend-port
    mkdir -p "$WORK/nginx"
    cat >"$WORK/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    upstream buildkitd {
        server 127.0.0.1:$2;
        # Reuse upstream connections (nginx sends one stream per upstream connection at a time).
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$1 http2;
        # The default (1000) would close each h2load connection long before -n is reached.
        keepalive_requests 1000000;
        location / {
            grpc_pass grpc://buildkitd;
        }
    }
}
EOF
    nginx -t -q -c "$WORK/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx.test" || {
        cat "$WORK/nginx.test" >&2
        exit 1
    }
    nginx -c "$WORK/nginx.conf" -p "$WORK/nginx" >"$WORK/nginx.log" 2>&1 &
    PIDS+=($!)
    NGINX_PID=$!
}
