//! Every knob, with defaults, from flags or `BUILDKIT_ROUTER_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::duration::parse_duration;

/// Longest `--session-passthrough-window`: half the client's 10 s inner preface timeout
/// (x/net `http2.Server`), so a session held after it still gets the router's preface in time.
/// A session passed through near the end of a 5 s window still needs its backend's preface
/// within the other 5 s, which `--connect-timeout` (default 5 s) may use up: keep the window
/// short (the default 1 s) unless placements are slow.
pub const MAX_PASSTHROUGH_WINDOW: Duration = Duration::from_secs(5);

fn parse_passthrough_window(text: &str) -> Result<Duration, String> {
    let window = parse_duration(text)?;
    if window > MAX_PASSTHROUGH_WINDOW {
        return Err(format!(
            "{text:?} is longer than {MAX_PASSTHROUGH_WINDOW:?}: the client gives up on a Session whose inner HTTP/2 preface is 10 s late"
        ));
    }
    Ok(window)
}

/// A stateful gRPC proxy in front of a pool of buildkitd daemons.
#[derive(Debug, Parser)]
#[command(name = "buildkit-router", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunConfig,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay a workload through the real placement code and compare policies.
    Simulate(crate::placement::simulate::SimulateArgs),
    /// Print a running router's backends and active builds as a table (reads its /status).
    Status(StatusArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Admin address of the router to ask.
    #[arg(long, default_value = "127.0.0.1:9180", env = "BUILDKIT_ROUTER_ADMIN")]
    pub admin: String,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// How the router's threads share the work (docs/performance.md compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeLayout {
    /// One single-threaded runtime per worker thread; each client connection, its calls and
    /// the worker's own backend connections stay on one thread.
    ThreadPerCore,
    /// One tokio work-stealing runtime: any thread runs any task.
    WorkStealing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Settings of the router process.
#[derive(Debug, Clone, clap::Args)]
pub struct RunConfig {
    /// Address clients (buildctl, buildx) connect to.
    #[arg(long, default_value = "0.0.0.0:1234", env = "BUILDKIT_ROUTER_LISTEN")]
    pub listen: SocketAddr,
    /// Address of the admin HTTP endpoints (/metrics, /healthz, /readyz, /status).
    #[arg(
        long,
        default_value = "0.0.0.0:9180",
        env = "BUILDKIT_ROUTER_ADMIN_LISTEN"
    )]
    pub admin_listen: SocketAddr,

    /// Serve TLS with this certificate chain (PEM). Without it the listener speaks h2c.
    #[arg(long, requires = "tls_key", env = "BUILDKIT_ROUTER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert", env = "BUILDKIT_ROUTER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mTLS.
    #[arg(long, requires = "tls_cert", env = "BUILDKIT_ROUTER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// A buildkitd backend: tcp://host:port (h2c) or tls://host:port. Repeatable. Per-backend TLS
    /// settings go in the query: tls://host:1234?ca=/ca.pem&cert=/c.pem&key=/k.pem&server-name=bk
    #[arg(
        long = "backend",
        value_name = "URL",
        env = "BUILDKIT_ROUTER_BACKENDS",
        value_delimiter = ','
    )]
    pub backends: Vec<String>,
    /// CA (PEM) that signs the backends' certificates, for tls:// backends.
    #[arg(long, env = "BUILDKIT_ROUTER_BACKEND_TLS_CA")]
    pub backend_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to tls:// backends.
    #[arg(
        long,
        requires = "backend_tls_key",
        env = "BUILDKIT_ROUTER_BACKEND_TLS_CERT"
    )]
    pub backend_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --backend-tls-cert.
    #[arg(
        long,
        requires = "backend_tls_cert",
        env = "BUILDKIT_ROUTER_BACKEND_TLS_KEY"
    )]
    pub backend_tls_key: Option<PathBuf>,
    /// Server name to verify on tls:// backends (default: the backend's host).
    #[arg(long, env = "BUILDKIT_ROUTER_BACKEND_TLS_SERVER_NAME")]
    pub backend_tls_server_name: Option<String>,

    /// Most client connections served at once; further connections wait in the accept queue.
    #[arg(long, default_value_t = 4096, env = "BUILDKIT_ROUTER_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Most client connections served at once from one IP address (0: no limit). Connections
    /// past it are closed at once. Off by default: CI runners behind one NAT share an address.
    #[arg(
        long,
        default_value_t = 0,
        env = "BUILDKIT_ROUTER_MAX_CONNECTIONS_PER_IP"
    )]
    pub max_connections_per_ip: usize,
    /// How long a client gets for its TLS handshake, for its HTTP/2 preface and first frame,
    /// and to finish a header block it began; past it the connection is closed (slowloris).
    #[arg(long, value_parser = parse_duration, default_value = "10s", env = "BUILDKIT_ROUTER_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Duration,
    /// Most concurrent HTTP/2 streams per client connection.
    #[arg(
        long,
        default_value_t = 1024,
        env = "BUILDKIT_ROUTER_MAX_CONCURRENT_STREAMS"
    )]
    pub max_concurrent_streams: u32,
    /// Largest request header list accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024, env = "BUILDKIT_ROUTER_MAX_HEADER_LIST_SIZE")]
    pub max_header_list_size: u32,
    /// Largest gRPC message the router reads to route a call (BuildKit allows 16 MiB each way).
    #[arg(long, default_value_t = 16 * 1024 * 1024 + 64 * 1024, env = "BUILDKIT_ROUTER_MAX_MESSAGE_SIZE")]
    pub max_message_size: usize,
    /// Bytes shared by the first messages larger than 64 KiB that the router reads to route
    /// calls (Solve, Status, ListWorkers, Info, history), across every connection, until the
    /// backend's window takes them. A message waits for room first (one larger than this waits
    /// until it is alone); as many may wait as this holds 2.3 MiB (a 2 MiB client stream window,
    /// and the 64 KiB and 256 KiB frame the router may have read first; at least one), and the
    /// next is refused at once: such messages hold at most twice this. 0 is taken
    /// as 1 byte: every large message alone.
    #[arg(long, default_value_t = crate::routing_buffer::DEFAULT_ROUTING_BUFFER, env = "BUILDKIT_ROUTER_ROUTING_BUFFER")]
    pub routing_buffer: usize,
    /// How long a message waits for room under --routing-buffer before its call is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, value_parser = parse_duration, default_value = "30s", env = "BUILDKIT_ROUTER_ROUTING_BUFFER_WAIT")]
    pub routing_buffer_wait: Duration,

    /// How long a Control/Session waits for a Solve that names it before it is placed on its own.
    /// The router answers the session's inner connection itself while it waits, so this is not
    /// bounded by the client's 10 s preface timeout (docs/session-relay.md).
    #[arg(long, value_parser = parse_duration, default_value = "3s", env = "BUILDKIT_ROUTER_SESSION_BIND_WINDOW")]
    pub session_bind_window: Duration,
    /// How long a Control/Session may wait to be placed and still be passed through to its
    /// backend as it came (the router out of the inner connection: the cheapest path for the
    /// context upload). A session unplaced after this is answered and held by the router, then
    /// relayed. Must stay well below the client's 10 s inner preface timeout (at most 5s); 0
    /// holds every session. A session whose Dockerfile the router reads for the content key
    /// (a keyless build) is held at once, whatever the window.
    #[arg(long, value_parser = parse_passthrough_window, default_value = "1s", env = "BUILDKIT_ROUTER_SESSION_PASSTHROUGH_WINDOW")]
    pub session_passthrough_window: Duration,
    /// How long a Status or LLBBridge call for an unknown build ref waits for its Solve; past
    /// it while a Solve whose leading bytes named the ref is still being read, for at most
    /// --routing-buffer-wait more.
    #[arg(long, value_parser = parse_duration, default_value = "5s", env = "BUILDKIT_ROUTER_REF_WAIT")]
    pub ref_wait: Duration,
    /// How long a finished build's ref keeps pointing at its backend (for history/Content calls).
    #[arg(long, value_parser = parse_duration, default_value = "2m", env = "BUILDKIT_ROUTER_BUILD_LINGER")]
    pub build_linger: Duration,
    /// Backstop: any routing entry older than this is forgotten.
    #[arg(long, value_parser = parse_duration, default_value = "24h", env = "BUILDKIT_ROUTER_REGISTRY_TTL")]
    pub registry_ttl: Duration,

    /// Timeout of one TCP (+TLS, +HTTP/2) connect to a backend.
    #[arg(long, value_parser = parse_duration, default_value = "5s", env = "BUILDKIT_ROUTER_CONNECT_TIMEOUT")]
    pub connect_timeout: Duration,
    /// Interval of backend health checks (gRPC health, then ListWorkers for platforms).
    #[arg(long, value_parser = parse_duration, default_value = "10s", env = "BUILDKIT_ROUTER_HEALTH_INTERVAL")]
    pub health_interval: Duration,
    /// How long one backend health check may take. A check that fails or times out takes the
    /// backend out of placement at once (running builds go on).
    #[arg(long, value_parser = parse_duration, default_value = "2s", env = "BUILDKIT_ROUTER_HEALTH_TIMEOUT")]
    pub health_timeout: Duration,
    /// Consecutive unanswered health checks (timed out, or no connection) that declare a
    /// backend dead: every call still on it ends with UNAVAILABLE naming the backend, the build
    /// and how long it has been silent. Ejected backends are checked again from 200 ms, doubling
    /// to 2 s, so with the defaults a frozen daemon is declared dead about 7 s after its first
    /// unanswered check.
    #[arg(long, default_value_t = 3, env = "BUILDKIT_ROUTER_HEALTH_FAILURES")]
    pub health_failures: u32,

    #[command(flatten)]
    pub placement: crate::placement::PlacementArgs,
    #[command(flatten)]
    pub content: crate::content::ContentArgs,
    #[command(flatten)]
    pub queue: crate::queue::QueueArgs,
    #[command(flatten)]
    pub discovery: crate::discovery::DiscoveryArgs,
    #[command(flatten)]
    pub scaler: crate::scaler::ScalerArgs,

    /// Builds one backend should run: `desired_backends` = ceil((active + queued) / this).
    /// Never above --max-builds-per-backend: a larger value is lowered to the cap (with a warning).
    #[arg(
        long,
        default_value_t = 4,
        env = "BUILDKIT_ROUTER_TARGET_BUILDS_PER_BACKEND"
    )]
    pub target_builds_per_backend: usize,

    /// Keep the last ListWorkers/Info answers here, so that a router restarted with no backend
    /// (a pool scaled to zero) still answers `buildx create`/`inspect` as the pool would.
    #[arg(long, value_name = "DIR", env = "BUILDKIT_ROUTER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Platforms ListWorkers reports while no daemon was ever seen (e.g. `linux/amd64,linux/arm64`),
    /// so buildx works against a pool that starts at zero. Default: the router's own platform.
    #[arg(long, value_delimiter = ',', env = "BUILDKIT_ROUTER_DEFAULT_PLATFORMS")]
    pub default_platforms: Vec<String>,

    /// Threads that serve client connections. Default: the number of CPUs the process may use.
    #[arg(long, env = "BUILDKIT_ROUTER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Runtime layout: `thread-per-core` (each connection on one thread, one backend connection
    /// per thread) or `work-stealing` (tokio's multi-threaded scheduler).
    #[arg(
        long,
        value_enum,
        default_value = "thread-per-core",
        env = "BUILDKIT_ROUTER_RUNTIME"
    )]
    pub runtime: RuntimeLayout,

    /// On SIGTERM, how long in-flight builds may run before the router exits anyway.
    #[arg(long, value_parser = parse_duration, default_value = "10m", env = "BUILDKIT_ROUTER_SHUTDOWN_GRACE")]
    pub shutdown_grace: Duration,
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "plain",
        env = "BUILDKIT_ROUTER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, default_value = "info", env = "BUILDKIT_ROUTER_LOG")]
    pub log: String,
}

impl RunConfig {
    /// Defaults for embedding the router (tests, benchmarks): loopback listeners on free ports.
    pub fn for_tests() -> Self {
        let mut cfg = Cli::parse_from(["buildkit-router"]).run;
        cfg.listen = "127.0.0.1:0".parse().expect("literal address");
        cfg.admin_listen = "127.0.0.1:0".parse().expect("literal address");
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_flags_parse_on_the_router_command_line() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "buildkit-router",
            "--dns",
            "buildkitd.ci.svc:1234",
            "--dns-interval",
            "2s",
            "--kubernetes-service",
            "ci/buildkitd",
            "--kubernetes-port",
            "buildkit",
            "--discovered-backend-tls-server-name",
            "{pod}.buildkitd.ci.svc",
        ])
        .unwrap();
        let args = cli.run.discovery;
        assert_eq!(args.dns.as_deref(), Some("buildkitd.ci.svc:1234"));
        assert_eq!(args.dns_interval, Duration::from_secs(2));
        assert_eq!(args.kubernetes_service.as_deref(), Some("ci/buildkitd"));
        assert_eq!(args.kubernetes_port.as_deref(), Some("buildkit"));
        assert!(!args.discovered_backend_tls);
        let defaults = Cli::try_parse_from(["buildkit-router"])
            .unwrap()
            .run
            .discovery;
        assert_eq!(defaults.dns_interval, Duration::from_secs(5));
        assert!(defaults.dns.is_none() && defaults.kubernetes_service.is_none());
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let cfg = Cli::parse_from(["buildkit-router"]).run;
        assert_eq!(cfg.session_bind_window, Duration::from_secs(3));
        assert_eq!(cfg.session_passthrough_window, Duration::from_secs(1));
        assert_eq!(cfg.listen.port(), 1234);
        assert_eq!(cfg.placement.balance_factor, 1.25);
        assert!(cfg.max_message_size > 16 * 1024 * 1024);
    }

    #[test]
    fn a_passthrough_window_the_clients_preface_timer_cannot_cover_is_refused() {
        let window = |w: &str| {
            Cli::try_parse_from(["buildkit-router", "--session-passthrough-window", w])
                .map(|cli| cli.run.session_passthrough_window)
        };
        assert_eq!(window("0s").unwrap(), Duration::ZERO);
        assert_eq!(window("5s").unwrap(), Duration::from_secs(5));
        let error = window("6s").unwrap_err().to_string();
        assert!(error.contains("10 s late"), "{error}");
    }
}
