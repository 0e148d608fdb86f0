//! The real BuildKit in tests: buildkitd daemons, the real router binary, and the real buildctl
//! and buildx clients, all on 127.0.0.1.
//!
//! The peers come from `scripts/install-buildkit.sh` (`.peers/bin`, or `BUILDKIT_PEERS_BIN`).
//! Without them a test prints why and skips, except under `CI=true`, where it fails: the suite
//! must never pass silently without the real daemon.
//!
//! Every daemon and router runs under a tiny `sh` supervisor that holds a pipe from the test
//! process: when the test process ends for any reason (a panic, a timeout kill), the pipe closes
//! and the supervisor kills its child and, for a daemon, unmounts and removes its `--root`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

/// How long a daemon or the router may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The real peers' binaries.
#[derive(Debug, Clone)]
pub struct Peers {
    pub bin: PathBuf,
    pub buildkitd: PathBuf,
    pub buildctl: PathBuf,
    pub buildx: PathBuf,
    pub busybox: PathBuf,
}

impl Peers {
    /// The installed peers, or `None` (after printing why) when they are missing outside CI.
    /// Panics under `CI=true`: CI installs them first, so a missing peer is a broken CI.
    pub fn require() -> Option<Peers> {
        match Peers::find() {
            Ok(p) => Some(p),
            Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("the real BuildKit peers are required in CI: {why}")
            }
            Err(why) => {
                eprintln!(
                    "SKIPPED: the real BuildKit peers are not installed ({why}); \
                     run scripts/install-buildkit.sh to run this test"
                );
                None
            }
        }
    }

    fn find() -> Result<Peers, String> {
        let bin = std::env::var_os("BUILDKIT_PEERS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".peers/bin"));
        let need = |name: &str| {
            let p = bin.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!("{} is missing", p.display()))
            }
        };
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or("no static busybox (Debian busybox-static)")?;
        if which("runc").is_none() {
            return Err("no runc on PATH (Debian runc)".into());
        }
        Ok(Peers {
            buildkitd: need("buildkitd")?,
            buildctl: need("buildctl")?,
            buildx: need("buildx")?,
            bin,
            busybox,
        })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A free port on 127.0.0.1 (bound then released; the daemon binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A child process under a supervisor shell that kills it when our end of its stdin closes.
struct Supervised {
    name: String,
    shell: Child,
    keepalive: Option<ChildStdin>,
    pid: u32,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Supervised {
    /// Starts `program args` under `sh`; `cleanup` runs in the shell after the child died.
    /// Returns once `ready(line)` matched a line of its stderr, with that line.
    fn start(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        cleanup: &str,
        ready: impl Fn(&str) -> bool + Send + 'static,
    ) -> (Supervised, String) {
        // `read` returns when the test process closes (or loses) the pipe; background jobs of a
        // non-interactive shell get /dev/null as stdin, so the child cannot eat the pipe.
        let script = format!(
            "\"$@\" 1>&2 & pid=$!; echo \"$pid\"; read _ignored; kill -9 \"$pid\" 2>/dev/null; \
             wait \"$pid\" 2>/dev/null; {cleanup}"
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut shell = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut pid_line = String::new();
        BufReader::new(shell.stdout.take().expect("stdout"))
            .read_line(&mut pid_line)
            .expect("read pid");
        let pid: u32 = pid_line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: bad pid line {pid_line:?}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = shell.stderr.take().expect("stderr");
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if ready_tx.is_some() && ready(&line) {
                    let _ = ready_tx.take().expect("once").send(line.clone());
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let supervised = Supervised {
            name: name.to_owned(),
            keepalive: shell.stdin.take(),
            shell,
            pid,
            lines,
        };
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => (supervised, line),
            Err(_) => panic!(
                "{name} did not start within {START_TIMEOUT:?}; its log:\n{}",
                supervised.log()
            ),
        }
    }

    fn log(&self) -> String {
        self.lines.lock().expect("log lock").join("\n")
    }

    fn kill(&self) {
        self.signal("-9");
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .status();
    }

    /// Ends the child (SIGKILL) and waits for the supervisor's cleanup.
    fn stop(&mut self) {
        if self.keepalive.take().is_some() {
            let _ = self.shell.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.name, self.log());
        }
    }
}

/// One real buildkitd on 127.0.0.1 with its own `--root`.
pub struct Daemon {
    pub name: String,
    pub addr: SocketAddr,
    process: Supervised,
    _root: TempDir,
}

impl Daemon {
    /// Starts buildkitd (OCI worker, host network) and returns once it listens.
    pub fn start(peers: &Peers, name: &str) -> Daemon {
        Daemon::start_with(peers, name, &[])
    }

    pub fn start_with(peers: &Peers, name: &str, extra: &[String]) -> Daemon {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Daemon::start_at(peers, name, addr, extra)
    }

    /// A daemon listening at `addr` (e.g. one a router was told about before it came up).
    pub fn start_at(peers: &Peers, name: &str, addr: SocketAddr, extra: &[String]) -> Daemon {
        let root = tempfile::Builder::new()
            .prefix(&format!("buildkitd-{name}-"))
            .tempdir()
            .expect("daemon root");
        let root_path = root.path().display().to_string();
        let mut args = vec![
            format!("--addr=tcp://{addr}"),
            format!("--root={root_path}"),
            "--oci-worker=true".into(),
            "--containerd-worker=false".into(),
            "--oci-worker-net=host".into(),
            // Each daemon its own OpenTelemetry socket (the default path is shared).
            format!("--otel-socket-path={root_path}/otel-grpc.sock"),
        ];
        args.extend_from_slice(extra);
        // A SIGKILLed daemon leaves overlay mounts under its root: unmount them (deepest first)
        // before removing the folder.
        let cleanup = format!(
            "grep -o ' {root_path}[^ ]*' /proc/self/mounts | sort -r | \
             while read -r m; do umount -l \"$m\" 2>/dev/null; done; rm -rf '{root_path}'"
        );
        let path = format!(
            "{}:{}",
            peers.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let (process, _) = Supervised::start(
            name,
            &peers.buildkitd,
            &args,
            &[("PATH", &path)],
            &cleanup,
            |line| line.contains("running server on"),
        );
        Daemon {
            name: name.to_owned(),
            addr,
            process,
            _root: root,
        }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// SIGKILL, as a crashed pod or an OOM kill.
    pub fn kill(&self) {
        self.process.kill();
    }

    /// SIGSTOP, as a hung node or a partitioned pod: the daemon answers nothing, while the
    /// kernel still accepts TCP connections into its backlog. (Containers it started keep
    /// running.) The supervisor's SIGKILL still ends it if the test fails.
    pub fn freeze(&self) {
        self.process.signal("-STOP");
    }

    /// SIGCONT: a frozen daemon carries on.
    pub fn thaw(&self) {
        self.process.signal("-CONT");
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// Debian's `docker-registry` (the CNCF distribution registry) on 127.0.0.1, storing in a
/// temporary folder, with no auth: the registry CI jobs push images and cache to.
pub struct DockerRegistry {
    pub addr: SocketAddr,
    _process: Supervised,
    _dir: TempDir,
}

impl DockerRegistry {
    /// Starts it, or `None` (after printing why) when Debian's `docker-registry` is missing
    /// outside CI (`scripts/install-buildkit.sh` installs it); panics under `CI=true`.
    pub fn start() -> Option<DockerRegistry> {
        let Some(program) = which("docker-registry") else {
            let why = "no docker-registry on PATH (Debian docker-registry)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why}");
            }
            eprintln!("SKIPPED: {why}; run scripts/install-buildkit.sh to run this test");
            return None;
        };
        let dir = tempfile::tempdir().expect("registry dir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("registry config");
        let (process, _) = Supervised::start(
            "docker-registry",
            &program,
            &["serve".to_owned(), config.display().to_string()],
            &[],
            "",
            |line| line.contains("listening on"),
        );
        Some(DockerRegistry {
            addr,
            _process: process,
            _dir: dir,
        })
    }

    /// The tags of `repository` (`GET /v2/<repository>/tags/list`), empty if it has none.
    pub fn tags(&self, repository: &str) -> Vec<String> {
        let body = http_get(self.addr, &format!("/v2/{repository}/tags/list")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect()
    }
}

/// GET `path` from `addr` over plain HTTP/1.1; the body as text.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// The real router binary in front of some daemons.
pub struct RouterProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    process: Supervised,
}

impl RouterProcess {
    /// Starts `buildkit-router` over `backends` (plus `extra` flags) and returns once it listens
    /// and reports ready.
    pub fn start(backends: &[&Daemon], extra: &[String]) -> RouterProcess {
        let urls: Vec<String> = backends.iter().map(|d| d.url()).collect();
        RouterProcess::start_urls(&urls, extra, backends.len())
    }

    /// Starts `buildkit-router` over backend `urls` and returns once it listens and sees
    /// `ready` of them ready (0: daemons that are not up yet).
    pub fn start_urls(urls: &[String], extra: &[String], ready: usize) -> RouterProcess {
        let mut args = vec![
            "--listen=127.0.0.1:0".to_owned(),
            "--admin-listen=127.0.0.1:0".to_owned(),
            "--log-format=json".to_owned(),
        ];
        for url in urls {
            args.push(format!("--backend={url}"));
        }
        args.extend_from_slice(extra);
        let (process, line) = Supervised::start(
            "buildkit-router",
            &router_bin(),
            &args,
            &[("RUST_LOG", "info")],
            "",
            |line| line.contains("buildkit-router listening"),
        );
        let event: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        let field = |k: &str| -> SocketAddr {
            event[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {line}"))
        };
        let router = RouterProcess {
            addr: field("addr"),
            admin: field("admin_addr"),
            process,
        };
        router.wait_ready(ready);
        router
    }

    /// Waits until `/status` shows `n` ready backends whose platforms the router has learned.
    pub fn wait_ready(&self, n: usize) {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let ready = self
                .status()
                .ok()
                .and_then(|s| {
                    s["backends"].as_array().map(|bs| {
                        bs.iter()
                            // Ready, and its workers' platforms learned (the first health
                            // check's ListWorkers): placement knows what it can build.
                            .filter(|b| {
                                b["state"].as_str() == Some("ready")
                                    && b["platforms"].as_array().is_some_and(|p| !p.is_empty())
                            })
                            .count()
                    })
                })
                .unwrap_or(0);
            if ready >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the router did not see {n} ready backends; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// GET an admin path (plain HTTP/1.1); the body as text.
    pub fn admin_get(&self, path: &str) -> std::io::Result<String> {
        http_get(self.admin, path)
    }

    pub fn status(&self) -> std::io::Result<serde_json::Value> {
        let body = self.admin_get("/status")?;
        serde_json::from_str(&body).map_err(std::io::Error::other)
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The router's process id (for /proc figures such as its resident memory).
    pub fn pid(&self) -> u32 {
        self.process.pid
    }
}

/// The router binary cargo built for this test (integration tests only: examples that include
/// this module have no binary to run).
pub fn router_bin() -> PathBuf {
    // BUILDKIT_ROUTER_BIN: measure another build of the router (a release binary) from a
    // debug test (tests/memory.rs).
    std::env::var_os("BUILDKIT_ROUTER_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_buildkit-router").map(PathBuf::from))
        .expect("the router binary is built for integration tests")
}

/// What a client command did.
#[derive(Debug)]
pub struct Output {
    pub what: String,
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// Panics with the command's output unless it succeeded.
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.ok(),
            "{} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs the real clients with an isolated configuration (buildx keeps its builders there).
pub struct Clients {
    pub peers: Peers,
    pub home: TempDir,
}

/// How long one client command may run before the test fails.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(240);

impl Clients {
    pub fn new(peers: &Peers) -> Clients {
        Clients {
            peers: peers.clone(),
            home: tempfile::tempdir().expect("client home"),
        }
    }

    pub fn command(&self, program: &Path, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env("DOCKER_CONFIG", self.home.path().join("docker"))
            .env("BUILDX_CONFIG", self.home.path().join("buildx"))
            .env("BUILDKIT_PROGRESS", "plain")
            .env("BUILDX_NO_DEFAULT_ATTESTATIONS", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs a prepared command to the end (bounded by [`CLIENT_TIMEOUT`]).
    pub async fn run_cmd(what: String, mut cmd: tokio::process::Command) -> Output {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let out = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish within {CLIENT_TIMEOUT:?}"))
            .expect("wait for client");
        Output {
            what,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub async fn buildctl(&self, addr: &str, args: &[&str]) -> Output {
        let mut all = vec!["--addr", addr];
        all.extend_from_slice(args);
        let what = format!("buildctl {}", all.join(" "));
        Clients::run_cmd(what, self.command(&self.peers.buildctl, &all)).await
    }

    pub async fn buildx(&self, args: &[&str]) -> Output {
        let what = format!("buildx {}", args.join(" "));
        Clients::run_cmd(what, self.command(&self.peers.buildx, args)).await
    }

    /// `buildctl [global] build --frontend dockerfile.v0 --local context=CTX --local
    /// dockerfile=CTX [args]` against `addr`.
    pub async fn buildctl_build(
        &self,
        addr: &str,
        global: &[&str],
        ctx: &Context,
        args: &[&str],
    ) -> Output {
        let all = ctx.build_args(global, args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.buildctl(addr, &all).await
    }

    /// `buildx create` of a remote-driver builder named `name` for `addr`.
    pub async fn buildx_builder(&self, name: &str, addr: &str, driver_opts: Option<&str>) {
        let mut args = vec!["create", "--name", name, "--driver", "remote"];
        if let Some(o) = driver_opts {
            args.extend_from_slice(&["--driver-opt", o]);
        }
        args.push(addr);
        self.buildx(&args).await.assert_ok();
    }

    /// The refs of the builds a daemon recorded (`buildctl debug histories`), with their status.
    pub async fn histories(&self, daemon: &Daemon) -> Vec<History> {
        let out = self
            .buildctl(
                &daemon.url(),
                &["debug", "histories", "--format", "{{json .}}"],
            )
            .await;
        out.assert_ok();
        parse_histories(&out.stdout)
    }
}

/// One build a daemon recorded.
#[derive(Debug, Clone)]
pub struct History {
    pub build_ref: String,
    /// The gRPC code of the build's error; `None` for a build that succeeded (or still runs).
    pub error_code: Option<i64>,
    pub error_message: Option<String>,
    pub completed: bool,
    /// When the daemon started and finished the build, in seconds since the Unix epoch.
    pub created_at: Option<f64>,
    pub completed_at: Option<f64>,
}

/// A `google.protobuf.Timestamp` as Go's encoding/json writes it: `{"seconds":S,"nanos":N}`.
fn timestamp_secs(v: &serde_json::Value) -> Option<f64> {
    let seconds = v.get("seconds")?.as_f64()?;
    Some(seconds + v.get("nanos").and_then(|n| n.as_f64()).unwrap_or(0.0) / 1e9)
}

/// `buildctl debug histories --format '{{json .}}'` prints one BuildHistoryEvent a line, each
/// with the `record` (Go's JSON names: `Ref`, `CompletedAt`, `error` as a google.rpc.Status).
fn parse_histories(text: &str) -> Vec<History> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a history line is not JSON ({e}): {line}"));
            let r = &v["record"];
            History {
                build_ref: r["Ref"].as_str().unwrap_or_default().to_owned(),
                error_code: r["error"]["code"].as_i64(),
                error_message: r["error"]["message"].as_str().map(str::to_owned),
                completed: !r["CompletedAt"].is_null(),
                created_at: timestamp_secs(&r["CreatedAt"]),
                completed_at: timestamp_secs(&r["CompletedAt"]),
            }
        })
        .collect()
}

/// A build context: a Dockerfile plus a static busybox for `RUN` steps in `FROM scratch`.
pub struct Context {
    pub dir: TempDir,
}

impl Context {
    /// A context whose Dockerfile is `dockerfile`; `busybox` is copied in when it is used.
    pub fn new(peers: &Peers, dockerfile: &str, files: &[(&str, &[u8])]) -> Context {
        let dir = tempfile::tempdir().expect("context dir");
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("Dockerfile");
        if dockerfile.contains("busybox") {
            std::fs::copy(&peers.busybox, dir.path().join("busybox")).expect("copy busybox");
        }
        for (name, data) in files {
            let p = dir.path().join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(p, data).expect("context file");
        }
        Context { dir }
    }

    pub fn path(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 path")
    }

    /// `[global] build --frontend dockerfile.v0 --local context=. --local dockerfile=. [args]`
    /// for this context: buildctl's arguments for a Dockerfile build.
    pub fn build_args(&self, global: &[&str], args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = global.iter().map(|s| s.to_string()).collect();
        all.extend(
            [
                "build".to_owned(),
                "--frontend".into(),
                "dockerfile.v0".into(),
                "--local".into(),
                format!("context={}", self.path()),
                "--local".into(),
                format!("dockerfile={}", self.path()),
            ]
            .into_iter()
            .chain(args.iter().map(|s| s.to_string())),
        );
        all
    }
}

/// A Dockerfile that runs `script` with busybox's sh (exec form: there is no /bin/sh in
/// `FROM scratch`) and leaves its output in /out.
pub fn run_dockerfile(script: &str) -> String {
    format!(
        "FROM scratch\nCOPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"{}\"]\n",
        script.replace('\\', "\\\\").replace('"', "\\\"")
    )
}
