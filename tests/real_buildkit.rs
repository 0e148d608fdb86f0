//! End to end over the real BuildKit: three real buildkitd on 127.0.0.1, the real router binary,
//! and the real buildctl and buildx. Each test asserts what a user would notice: exit status,
//! output files, and which daemon ran a build (`buildctl debug histories` on each daemon).
//!
//! The peers are installed by `scripts/install-buildkit.sh` (`.ci/run` calls it). Without them
//! each test prints why and skips; under `CI=true` it fails instead.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use support::real::{
    run_dockerfile, Clients, Context, Daemon, History, Output, Peers, RouterProcess,
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Tests over real daemons run one at a time: each starts several daemons, and two cores do not
/// run two such pools well. A tokio lock, so that no std lock is held across an await.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three daemons, the router in front of them, and clients with a private configuration.
struct Pool {
    daemons: Vec<Daemon>,
    router: RouterProcess,
    clients: Clients,
    peers: Peers,
}

impl Pool {
    fn start(n: usize, router_args: &[&str]) -> Option<Pool> {
        let peers = Peers::require()?;
        let daemons: Vec<Daemon> = (0..n)
            .map(|i| Daemon::start(&peers, &format!("bk{i}")))
            .collect();
        let args: Vec<String> = router_args.iter().map(|s| s.to_string()).collect();
        let router = RouterProcess::start(&daemons.iter().collect::<Vec<_>>(), &args);
        Some(Pool {
            clients: Clients::new(&peers),
            daemons,
            router,
            peers,
        })
    }

    async fn buildctl(&self, args: &[&str]) -> Output {
        self.clients.buildctl(&self.router.url(), args).await
    }

    /// `buildctl build` of `ctx` through the router, exporting to `dest`; returns the output and
    /// the build's ref.
    async fn buildctl_build(&self, ctx: &Context, dest: &Path, extra: &[&str]) -> (Output, String) {
        let ref_file = dest.with_extension("ref");
        let out_arg = format!("type=local,dest={}", dest.display());
        let ref_arg = ref_file.display().to_string();
        let mut args = vec!["--output", &out_arg, "--ref-file", &ref_arg];
        args.extend_from_slice(extra);
        let out = self
            .clients
            .buildctl_build(&self.router.url(), &[], ctx, &args)
            .await;
        let build_ref = std::fs::read_to_string(&ref_file)
            .unwrap_or_default()
            .trim()
            .to_owned();
        (out, build_ref)
    }

    /// Every daemon's recorded builds, by daemon index.
    async fn histories(&self) -> Vec<Vec<History>> {
        let mut all = Vec::new();
        for d in &self.daemons {
            all.push(self.clients.histories(d).await);
        }
        all
    }

    /// The daemons (indices) whose history holds `build_ref`.
    async fn holders(&self, build_ref: &str) -> Vec<usize> {
        self.histories()
            .await
            .iter()
            .enumerate()
            .filter(|(_, h)| h.iter().any(|r| r.build_ref == build_ref))
            .map(|(i, _)| i)
            .collect()
    }

    /// The one daemon holding `build_ref`, asserting it is exactly one.
    async fn holder(&self, build_ref: &str) -> usize {
        let holders = self.holders(build_ref).await;
        assert_eq!(
            holders.len(),
            1,
            "build {build_ref} must be recorded by exactly one daemon, found {holders:?}"
        );
        holders[0]
    }

    /// The record of `build_ref` on daemon `index`, once the build has ended there (30 s).
    async fn completed_record(&self, index: usize, build_ref: &str) -> History {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let h = self.clients.histories(&self.daemons[index]).await;
                if let Some(r) = h
                    .into_iter()
                    .find(|r| r.build_ref == build_ref && r.completed)
                {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("daemon {index} did not end build {build_ref} within 30 s"))
    }

    /// `buildx create` of a remote builder named `pool` for the router.
    async fn buildx_builder(&self) {
        self.clients
            .buildx_builder("pool", &self.router.url(), None)
            .await;
    }

    /// Builds with explicit affinity keys until every daemon holds at least one build.
    async fn spread_builds(&self, ctx: &Context, out: &Path) -> Vec<String> {
        let mut refs = Vec::new();
        for i in 0..40 {
            let key = format!("build-arg:BUILDKIT_ROUTER_KEY=project-{i}");
            let n = format!("build-arg:N={i}");
            let (o, r) = self
                .buildctl_build(
                    ctx,
                    &out.join(format!("s{i}")),
                    &["--opt", &key, "--opt", &n],
                )
                .await;
            o.assert_ok();
            refs.push(r);
            let covered = self
                .histories()
                .await
                .iter()
                .filter(|h| !h.is_empty())
                .count();
            if covered == self.daemons.len() {
                return refs;
            }
        }
        panic!(
            "40 keyed builds did not reach all {} daemons",
            self.daemons.len()
        );
    }
}

/// A Dockerfile whose RUN step writes `$N` (a build arg) to /out/n.
fn numbered_dockerfile() -> String {
    "FROM scratch\nCOPY busybox /bin/busybox\nARG N=0\n\
     RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox mkdir -p /out && echo n=$N > /out/n\"]\n"
        .to_owned()
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildctl_builds_sequential_and_sixteen_concurrent_each_on_one_daemon() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(3, &[]) else {
        return;
    };
    let ctx = Context::new(&pool.peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();

    // Sequential builds naming their project (an explicit affinity key, as a CI build's
    // vcs:source would): placed at once, so their Sessions pass through the router as they came.
    for i in 0..3 {
        let dest = out.path().join(format!("seq{i}"));
        let n = format!("build-arg:N={i}");
        let (o, r) = pool
            .buildctl_build(
                &ctx,
                &dest,
                &["--opt", &n, "--opt", "build-arg:BUILDKIT_ROUTER_KEY=seq"],
            )
            .await;
        o.assert_ok();
        assert_eq!(read(dest.join("out/n")), format!("n={i}\n"));
        pool.holder(&r).await;
    }
    let passed_through = |log: &str| log.matches("session passed through to its backend").count();
    assert_eq!(
        passed_through(&pool.router.log()),
        3,
        "each keyed build's Session passed through"
    );

    let builds = (0..16).map(|i| {
        let pool = &pool;
        let ctx = &ctx;
        let dest = out.path().join(format!("par{i}"));
        async move {
            let n = format!("build-arg:N=p{i}");
            let (o, r) = pool.buildctl_build(ctx, &dest, &["--opt", &n]).await;
            (i, dest, o, r)
        }
    });
    let results = futures_util::future::join_all(builds).await;
    let histories = pool.histories().await;
    let mut per_daemon = vec![0; pool.daemons.len()];
    for (i, dest, o, r) in &results {
        o.assert_ok();
        assert_eq!(read(dest.join("out/n")), format!("n=p{i}\n"));
        let holders: Vec<usize> = histories
            .iter()
            .enumerate()
            .filter(|(_, h)| {
                h.iter()
                    .any(|x| &x.build_ref == r && x.error_code.is_none())
            })
            .map(|(d, _)| d)
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "build {r} ran on exactly one daemon: {holders:?}"
        );
        per_daemon[holders[0]] += 1;
    }
    assert_eq!(per_daemon.iter().sum::<usize>(), 16);
    // Keyless: the router read each Dockerfile through the Session for the content key, so
    // those Sessions were held and relayed, never passed through.
    assert_eq!(
        passed_through(&pool.router.log()),
        3,
        "keyless builds' Sessions are relayed"
    );
    assert!(
        per_daemon.iter().filter(|&&n| n > 0).count() >= 2,
        "16 concurrent keyless builds spread over the pool: {per_daemon:?}"
    );
    // No daemon recorded a failed build: nothing was misrouted.
    for (d, h) in histories.iter().enumerate() {
        let failed: Vec<_> = h.iter().filter(|x| x.error_code.is_some()).collect();
        assert!(
            failed.is_empty(),
            "daemon {d} recorded failures: {failed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildx_build_and_bake_with_the_remote_driver() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(3, &[]) else {
        return;
    };
    pool.buildx_builder().await;
    let ctx = Context::new(&pool.peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();

    // buildx build (remote driver): its probe build, then the real one.
    let dest = out.path().join("x");
    let meta = out.path().join("x.json");
    pool.clients
        .buildx(&[
            "build",
            "--builder",
            "pool",
            "--build-arg",
            "N=x",
            "--metadata-file",
            meta.to_str().unwrap(),
            "-o",
            &format!("type=local,dest={}", dest.display()),
            ctx.path(),
        ])
        .await
        .assert_ok();
    assert_eq!(read(dest.join("out/n")), "n=x\n");
    let meta: serde_json::Value = serde_json::from_str(&read(&meta)).unwrap();
    let build_ref = buildx_ref(&meta);
    pool.holder(&build_ref).await;

    // bake: two targets sharing one local context (and its shared Session).
    let hcl = format!(
        r#"group "default" {{ targets = ["a", "b"] }}
target "a" {{
  context = "{ctx}"
  args = {{ N = "a" }}
  output = ["type=local,dest={out}/a"]
}}
target "b" {{
  context = "{ctx}"
  args = {{ N = "b" }}
  output = ["type=local,dest={out}/b"]
}}
"#,
        ctx = ctx.path(),
        out = out.path().display()
    );
    let bake_file = out.path().join("docker-bake.hcl");
    std::fs::write(&bake_file, hcl).unwrap();
    let meta = out.path().join("bake.json");
    pool.clients
        .buildx(&[
            "bake",
            "--builder",
            "pool",
            "-f",
            bake_file.to_str().unwrap(),
            "--metadata-file",
            meta.to_str().unwrap(),
            // bake asks before it reads or writes outside the working directory.
            "--allow",
            &format!("fs={}", ctx.path()),
            "--allow",
            &format!("fs={}", out.path().display()),
        ])
        .await
        .assert_ok();
    assert_eq!(read(out.path().join("a/out/n")), "n=a\n");
    assert_eq!(read(out.path().join("b/out/n")), "n=b\n");
    let meta: serde_json::Value = serde_json::from_str(&read(&meta)).unwrap();
    let (a, b) = (buildx_ref(&meta["a"]), buildx_ref(&meta["b"]));
    assert_eq!(
        pool.holder(&a).await,
        pool.holder(&b).await,
        "bake targets sharing a context run on one daemon"
    );
}

/// The build ref in buildx's metadata file (`buildx.build.ref` is `builder/node/ref`).
fn buildx_ref(meta: &serde_json::Value) -> String {
    let full = meta["buildx.build.ref"]
        .as_str()
        .unwrap_or_else(|| panic!("no buildx.build.ref in {meta}"));
    full.rsplit('/').next().unwrap().to_owned()
}

/// Starts a buildctl build whose RUN step sleeps, and returns once the step runs.
async fn start_sleeping_build(
    pool: &Pool,
    ctx: &Context,
    dest: &Path,
    extra: &[&str],
) -> SleepingBuild {
    let known = router_builds(pool);
    let url = pool.router.url();
    let out_arg = format!("type=local,dest={}", dest.display());
    let mut rest = vec!["--output", &out_arg];
    rest.extend_from_slice(extra);
    let args = ctx.build_args(&["--addr", &url], &rest);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = pool
        .clients
        .command(&pool.peers.buildctl, &args)
        .spawn()
        .expect("start buildctl");
    // buildctl's plain progress prints the RUN step's own output; the script echoes "running".
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let wait = async {
        while let Some(line) = lines.next_line().await.expect("read progress") {
            let started = line.contains("running");
            seen.push(line);
            if started {
                return true;
            }
        }
        false
    };
    let started = tokio::time::timeout(Duration::from_secs(60), wait).await;
    assert!(
        matches!(started, Ok(true)),
        "the build's RUN step did not start: {}",
        seen.join("\n")
    );
    // Keep draining stderr so that buildctl never blocks on a full pipe, and keep it.
    let stderr = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line);
        }
        seen.join("\n")
    });
    // buildctl writes --ref-file only at the end: the router's /status names the running build.
    let new: Vec<String> = router_builds(pool)
        .into_iter()
        .filter(|r| !known.contains(r))
        .collect();
    assert_eq!(
        new.len(),
        1,
        "one new build in the router's /status: {new:?}"
    );
    SleepingBuild {
        child,
        build_ref: new.into_iter().next().unwrap(),
        stderr,
    }
}

/// A buildctl build whose RUN step is running.
struct SleepingBuild {
    child: tokio::process::Child,
    build_ref: String,
    /// buildctl's whole progress output, once it exits.
    stderr: tokio::task::JoinHandle<String>,
}

/// The refs of the builds the router runs now (buildx probes excluded).
fn router_builds(pool: &Pool) -> HashSet<String> {
    let status = pool.router.status().expect("router /status");
    status["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["internal"] != serde_json::Value::Bool(true))
        .filter_map(|b| b["build_ref"].as_str().map(str::to_owned))
        .collect()
}

fn sleeping_dockerfile(seconds: u32) -> String {
    run_dockerfile(&format!(
        "echo running; /bin/busybox sleep {seconds}; /bin/busybox mkdir -p /out; echo done > /out/done"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_build_is_recorded_cancelled_and_the_next_build_works() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(3, &[]) else {
        return;
    };
    let ctx = Context::new(&pool.peers, &sleeping_dockerfile(60), &[]);
    let out = tempfile::tempdir().unwrap();
    let SleepingBuild {
        mut child,
        build_ref,
        ..
    } = start_sleeping_build(&pool, &ctx, &out.path().join("c"), &[]).await;
    // Ctrl-C, as a user or a CI job timeout would.
    let pid = child.id().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("buildctl exits after Ctrl-C")
        .unwrap();
    assert!(!status.success(), "a cancelled build exits non-zero");

    // The daemon that ran it records it as cancelled (code 1, CANCELLED), and only that one.
    let holder = pool.holder(&build_ref).await;
    let record = pool.completed_record(holder, &build_ref).await;
    assert_eq!(
        record.error_code,
        Some(1),
        "recorded as cancelled: {record:?}"
    );

    let ok = Context::new(&pool.peers, &numbered_dockerfile(), &[]);
    let dest = out.path().join("after");
    let (o, r) = pool.buildctl_build(&ok, &dest, &[]).await;
    o.assert_ok();
    assert_eq!(read(dest.join("out/n")), "n=0\n");
    pool.holder(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn du_prune_and_history_cover_every_daemon() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(3, &[]) else {
        return;
    };
    pool.buildx_builder().await;
    let ctx = Context::new(&pool.peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();
    let refs = pool.spread_builds(&ctx, out.path()).await;

    // buildctl du through the router lists every daemon's records.
    let ids = |o: &Output| -> HashSet<String> {
        let v: serde_json::Value = serde_json::from_str(o.stdout.trim())
            .unwrap_or_else(|e| panic!("du output is not JSON ({e}): {}", o.stdout));
        // An empty daemon prints `null`.
        v.as_array()
            .into_iter()
            .flatten()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let routed = ids(pool
        .buildctl(&["du", "--format", "{{json .}}"])
        .await
        .assert_ok());
    let mut direct = HashSet::new();
    let mut per_daemon = Vec::new();
    for d in &pool.daemons {
        let o = pool
            .clients
            .buildctl(&d.url(), &["du", "--format", "{{json .}}"])
            .await;
        let set = ids(o.assert_ok());
        assert!(
            !set.is_empty(),
            "every daemon holds cache after the spread builds"
        );
        per_daemon.push(set.clone());
        direct.extend(set);
    }
    assert_eq!(
        routed, direct,
        "buildctl du through the router covers every daemon"
    );

    // buildx du shows the whole pool's records too.
    let bx = pool
        .clients
        .buildx(&["du", "--builder", "pool", "--verbose"])
        .await;
    bx.assert_ok();
    for set in &per_daemon {
        assert!(
            set.iter().any(|id| bx.stdout.contains(id.as_str())),
            "buildx du lists records of every daemon:\n{}",
            bx.stdout
        );
    }

    // buildx history ls lists the builds of every daemon.
    let hist = pool
        .clients
        .buildx(&[
            "history",
            "ls",
            "--builder",
            "pool",
            "--format",
            "json",
            "--no-trunc",
        ])
        .await;
    hist.assert_ok();
    for r in &refs {
        assert!(
            hist.stdout.contains(r.as_str()),
            "history ls lists {r}:\n{}",
            hist.stdout
        );
    }

    // buildx prune -f acts on every daemon: each one's prunable records are gone.
    pool.clients
        .buildx(&["prune", "-f", "--builder", "pool"])
        .await
        .assert_ok();
    for (i, d) in pool.daemons.iter().enumerate() {
        let o = pool
            .clients
            .buildctl(&d.url(), &["du", "--format", "{{json .}}"])
            .await;
        let left = ids(o.assert_ok());
        assert!(
            left.is_disjoint(&per_daemon[i]),
            "daemon {i} still holds pruned records: {left:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_fails_only_its_own_builds() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(3, &[]) else {
        return;
    };
    let ctx = Context::new(&pool.peers, &sleeping_dockerfile(8), &[]);
    let out = tempfile::tempdir().unwrap();
    // Three running builds, each on the daemon placement picked for its key.
    let mut running = Vec::new();
    for i in 0..3 {
        let key = format!("build-arg:BUILDKIT_ROUTER_KEY=kill-{i}");
        let dest = out.path().join(format!("k{i}"));
        running.push((
            start_sleeping_build(&pool, &ctx, &dest, &["--opt", &key]).await,
            dest,
        ));
    }
    let mut holder_of = HashMap::new();
    for (b, _) in &running {
        holder_of.insert(b.build_ref.clone(), pool.holder(&b.build_ref).await);
    }
    let victim = holder_of[&running[0].0.build_ref];
    let victim_addr = pool.daemons[victim].addr.to_string();
    pool.daemons[victim].kill();

    for (mut b, dest) in running {
        let status = tokio::time::timeout(Duration::from_secs(60), b.child.wait())
            .await
            .expect("no build hangs after a daemon died")
            .unwrap();
        let stderr = b.stderr.await.unwrap();
        let r = b.build_ref;
        if holder_of[&r] == victim {
            assert!(!status.success(), "build {r} on the killed daemon fails");
            let error = stderr.lines().rfind(|l| l.contains("error"));
            eprintln!("the killed daemon's build failed with: {error:?}");
            assert!(
                stderr.contains("Unavailable") && stderr.contains(&victim_addr),
                "the error names UNAVAILABLE and the daemon {victim_addr}:\n{stderr}"
            );
        } else {
            assert!(
                status.success(),
                "build {r} on a live daemon succeeds:\n{stderr}"
            );
            assert_eq!(read(dest.join("out/done")), "done\n");
        }
    }
    // The next builds go to the survivors and succeed.
    let ok = Context::new(&pool.peers, &numbered_dockerfile(), &[]);
    for i in 0..3 {
        let key = format!("build-arg:BUILDKIT_ROUTER_KEY=kill-{i}");
        let dest = out.path().join(format!("after{i}"));
        let (o, r) = pool.buildctl_build(&ok, &dest, &["--opt", &key]).await;
        o.assert_ok();
        let holders = {
            let mut hs = Vec::new();
            for (d, daemon) in pool.daemons.iter().enumerate() {
                if d != victim
                    && pool
                        .clients
                        .histories(daemon)
                        .await
                        .iter()
                        .any(|h| h.build_ref == r)
                {
                    hs.push(d);
                }
            }
            hs
        };
        assert_eq!(holders.len(), 1, "build {r} ran on one surviving daemon");
    }
}

/// buildctl's Ctrl-C at the start of its context upload: buildctl resets the Solve and, at
/// once, half-closes its Session. Through the router the daemon must see the cancel first, as it
/// does directly: every round is recorded as cancelled (code 1, `context canceled`), never as a
/// failure on the lost session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_the_context_upload_is_recorded_as_a_cancel() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(1, &[]) else {
        return;
    };
    // A sparse 768 MiB file: read as zeros, costs no disk, takes a while to upload.
    let ctx = Context::new(&pool.peers, "FROM scratch\nCOPY big /big\n", &[]);
    std::fs::File::create(ctx.dir.path().join("big"))
        .and_then(|f| f.set_len(768 << 20))
        .expect("sparse context file");
    let url = pool.router.url();
    for round in 0..3 {
        let known = router_builds(&pool);
        // No --output: nothing is exported (the 768 MiB file would be written out in full).
        let args = ctx.build_args(&["--addr", &url], &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = pool
            .clients
            .command(&pool.peers.buildctl, &args)
            .spawn()
            .expect("start buildctl");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let uploading = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read progress") {
                // The context's vertex starts: its upload (seconds long) begins now. (Plain
                // progress does not always print a line while the transfer runs.)
                let now = line.contains("[internal] load build context");
                seen.push(line);
                if now {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(uploading, Ok(true)),
            "round {round}: the upload did not start: {}",
            seen.join("\n")
        );
        let new: Vec<String> = router_builds(&pool)
            .into_iter()
            .filter(|r| !known.contains(r))
            .collect();
        assert_eq!(new.len(), 1, "one new build: {new:?}");
        let build_ref = new[0].clone();
        let pid = child.id().expect("pid").to_string();
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("buildctl exits after Ctrl-C")
            .unwrap();
        assert!(!status.success());
        let record = pool.completed_record(0, &build_ref).await;
        eprintln!("round {round}: {record:?}");
        assert_eq!(
            (record.error_code, record.error_message.as_deref()),
            (Some(1), Some("context canceled")),
            "round {round}: recorded as a cancel"
        );
    }
}

/// The backend (`tcp://127.0.0.1:P`) the router placed `build_ref` on, from its /status.
fn placed_on(pool: &Pool, build_ref: &str) -> String {
    let status = pool.router.status().expect("router /status");
    status["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["build_ref"].as_str() == Some(build_ref))
        .and_then(|b| b["backend"].as_str())
        .unwrap_or_else(|| panic!("build {build_ref} is not in the router's /status: {status}"))
        .to_owned()
}

/// A buildkitd frozen with SIGSTOP mid-build (a hung node): the build on it ends with
/// UNAVAILABLE naming the daemon, the build and the silence, instead of hanging; a build on
/// another daemon goes on and succeeds; the next build goes elsewhere; after SIGCONT the daemon
/// rejoins, records the ended build as failed, and takes builds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_daemon_fails_only_its_own_build_and_rejoins_after_sigcont() {
    let _serial = SERIAL.lock().await;
    // One build per daemon, so the two builds run on two daemons; health checks every 2 s
    // (the 2 s timeout and 3 unanswered checks are the defaults).
    let Some(pool) = Pool::start(3, &["--max-builds-per-backend=1", "--health-interval=2s"]) else {
        return;
    };
    let long = Context::new(&pool.peers, &sleeping_dockerfile(120), &[]);
    let short = Context::new(&pool.peers, &sleeping_dockerfile(20), &[]);
    let out = tempfile::tempdir().unwrap();
    let key = "build-arg:BUILDKIT_ROUTER_KEY=frozen-home";
    let mut frozen_build =
        start_sleeping_build(&pool, &long, &out.path().join("f"), &["--opt", key]).await;
    let mut live_build = start_sleeping_build(&pool, &short, &out.path().join("l"), &[]).await;
    let victim_url = placed_on(&pool, &frozen_build.build_ref);
    assert_ne!(victim_url, placed_on(&pool, &live_build.build_ref));
    let victim = pool
        .daemons
        .iter()
        .position(|d| d.url() == victim_url)
        .expect("the victim is one of the daemons");

    let frozen_at = std::time::Instant::now();
    pool.daemons[victim].freeze();
    let status = tokio::time::timeout(Duration::from_secs(60), frozen_build.child.wait())
        .await
        .expect("the build on the frozen daemon does not hang")
        .unwrap();
    let waited = frozen_at.elapsed();
    let stderr = frozen_build.stderr.await.unwrap();
    eprintln!(
        "the frozen daemon's build ended after {waited:?} with: {:?}",
        stderr.lines().rfind(|l| l.contains("error"))
    );
    assert!(!status.success());
    let victim_addr = pool.daemons[victim].addr.to_string();
    for part in [
        "Unavailable",
        victim_addr.as_str(),
        frozen_build.build_ref.as_str(),
        "stopped answering health checks for",
    ] {
        assert!(stderr.contains(part), "{part:?} missing from:\n{stderr}");
    }

    // The other daemon's build goes on to the end.
    let status = tokio::time::timeout(Duration::from_secs(120), live_build.child.wait())
        .await
        .expect("the live build finishes")
        .unwrap();
    let live_stderr = live_build.stderr.await.unwrap();
    assert!(status.success(), "{live_stderr}");
    assert_eq!(read(out.path().join("l/out/done")), "done\n");

    // The next build goes to a live daemon, at once.
    let ok = Context::new(&pool.peers, &numbered_dockerfile(), &[]);
    let (o, next) = pool
        .buildctl_build(&ok, &out.path().join("next"), &["--opt", key])
        .await;
    o.assert_ok();
    // (The frozen daemon is never asked: it would not answer.)
    let on_live = {
        let mut found = 0;
        for (i, d) in pool.daemons.iter().enumerate() {
            if i != victim
                && pool
                    .clients
                    .histories(d)
                    .await
                    .iter()
                    .any(|h| h.build_ref == next)
            {
                found += 1;
            }
        }
        found
    };
    assert_eq!(on_live, 1, "the next build ran on a live daemon");

    // SIGCONT: the daemon rejoins within the 2 s probe backoff.
    pool.daemons[victim].thaw();
    pool.router.wait_ready(3);
    // It records the build the router ended as failed: its client's connection went away.
    let record = pool.completed_record(victim, &frozen_build.build_ref).await;
    eprintln!("the thawed daemon's record of the frozen build: {record:?}");
    assert!(record.error_code.is_some(), "{record:?}");
    // Its key's home is the thawed daemon again.
    let (o, home) = pool
        .buildctl_build(&ok, &out.path().join("home"), &["--opt", key])
        .await;
    o.assert_ok();
    assert_eq!(
        pool.holder(&home).await,
        victim,
        "the thawed daemon takes builds again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mtls_from_buildctl_and_buildx() {
    use support::tls::TestPki;
    let _serial = SERIAL.lock().await;
    let Some(peers) = Peers::require() else {
        return;
    };
    let pki = TestPki::generate();
    let certs = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let p = certs.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let ca = write("ca.pem", &pki.ca_pem);
    let server_cert = write("server.pem", &pki.server.cert_pem);
    let server_key = write("server-key.pem", &pki.server.key_pem);
    let client_cert = write("client.pem", &pki.client.cert_pem);
    let client_key = write("client-key.pem", &pki.client.key_pem);

    let daemons = [Daemon::start(&peers, "bk0"), Daemon::start(&peers, "bk1")];
    let backends: Vec<&Daemon> = daemons.iter().collect();
    let tls = RouterProcess::start(
        &backends,
        &[
            format!("--tls-cert={server_cert}"),
            format!("--tls-key={server_key}"),
        ],
    );
    let mtls = RouterProcess::start(
        &backends,
        &[
            format!("--tls-cert={server_cert}"),
            format!("--tls-key={server_key}"),
            format!("--tls-client-ca={ca}"),
        ],
    );
    let clients = Clients::new(&peers);
    let ctx = Context::new(&peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();

    for (name, router, with_cert) in [("tls", &tls, false), ("mtls", &mtls, true)] {
        // buildctl offers ALPN h2.
        let dest = format!("type=local,dest={}/{name}-buildctl", out.path().display());
        let mut args = vec!["--tlscacert", &ca, "--tlsservername", "localhost"];
        if with_cert {
            args.extend_from_slice(&["--tlscert", &client_cert, "--tlskey", &client_key]);
        }
        clients
            .buildctl_build(
                &router.url(),
                &args,
                &ctx,
                &["--opt", "build-arg:N=tls", "--output", &dest],
            )
            .await
            .assert_ok();
        assert_eq!(
            read(out.path().join(format!("{name}-buildctl/out/n"))),
            "n=tls\n"
        );

        // buildx's remote driver offers no ALPN at all.
        let mut opts = format!("cacert={ca},servername=localhost");
        if with_cert {
            opts.push_str(&format!(",cert={client_cert},key={client_key}"));
        }
        let builder = format!("{name}pool");
        clients
            .buildx_builder(&builder, &router.url(), Some(&opts))
            .await;
        let dest = out.path().join(format!("{name}-buildx"));
        clients
            .buildx(&[
                "build",
                "--builder",
                &builder,
                "--build-arg",
                "N=tlsx",
                "-o",
                &format!("type=local,dest={}", dest.display()),
                ctx.path(),
            ])
            .await
            .assert_ok();
        assert_eq!(read(dest.join("out/n")), "n=tlsx\n");
    }

    // mTLS refuses a client without a certificate.
    let dest = format!("type=local,dest={}/nocert", out.path().display());
    let refused = clients
        .buildctl_build(
            &mtls.url(),
            &[
                "--tlscacert",
                &ca,
                "--tlsservername",
                "localhost",
                "--timeout",
                "5",
            ],
            &ctx,
            &["--output", &dest],
        )
        .await;
    assert!(!refused.ok(), "mTLS refuses a client without a certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_platform_build_without_emulators_works_as_on_one_daemon() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(3, &[]) else {
        return;
    };
    pool.buildx_builder().await;
    // COPY-only: no foreign binary runs, so no emulator is needed.
    let ctx = Context::new(
        &pool.peers,
        "FROM scratch\nARG TARGETPLATFORM\nCOPY hello.txt /hello.txt\n",
        &[("hello.txt", b"hello\n")],
    );
    let out = tempfile::tempdir().unwrap();
    let tar = out.path().join("out.tar");
    pool.clients
        .buildx(&[
            "build",
            "--builder",
            "pool",
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=oci,dest={}", tar.display()),
            ctx.path(),
        ])
        .await
        .assert_ok();
    let platforms = oci_platforms(&tar);
    assert_eq!(
        platforms,
        ["linux/amd64", "linux/arm64"],
        "an OCI index with both manifests"
    );

    // buildctl, the same request.
    let tar2 = out.path().join("out2.tar");
    let oci_out = format!("type=oci,dest={}", tar2.display());
    pool.clients
        .buildctl_build(
            &pool.router.url(),
            &[],
            &ctx,
            &[
                "--opt",
                "platform=linux/amd64,linux/arm64",
                "--output",
                &oci_out,
            ],
        )
        .await
        .assert_ok();
    assert_eq!(oci_platforms(&tar2), ["linux/amd64", "linux/arm64"]);

    // An operator who asks for strict platform matching gets FAILED_PRECONDITION instead.
    let strict = RouterProcess::start(
        &pool.daemons.iter().collect::<Vec<_>>(),
        &["--strict-platforms".to_owned()],
    );
    let refused = pool
        .clients
        .buildctl_build(
            &strict.url(),
            &[],
            &ctx,
            &["--opt", "platform=linux/amd64,linux/arm64"],
        )
        .await;
    assert!(!refused.ok());
    assert!(
        refused.stderr.contains("FailedPrecondition")
            && refused.stderr.contains("platforms available"),
        "{}",
        refused.stderr
    );
    // Platform aliases name the same platform, as buildkitd reads them.
    for alias in ["linux/x86_64", "amd64", "linux/amd64/v1"] {
        strict_ok(&pool, &strict, &ctx, alias).await;
    }
}

/// Scale from zero: builds arrive at a router whose only daemon is not up yet. They wait in the
/// queue longer than the clients' own timers (10 s for the Session's inner preface, 15 s for
/// LLBBridge/Ping), showing why, and run when the daemon comes up. The hold is 20 s here;
/// `BUILDKIT_ROUTER_REAL_HOLD_SECS=120` runs the issue's two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_held_while_the_pool_is_empty_complete_when_a_daemon_starts() {
    let _serial = SERIAL.lock().await;
    let Some(peers) = Peers::require() else {
        return;
    };
    let hold = Duration::from_secs(
        std::env::var("BUILDKIT_ROUTER_REAL_HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", support::real::free_port())
        .parse()
        .unwrap();
    // No flag: the queue is on by default, and ListWorkers answers with the router's own
    // platform until a daemon is seen.
    let router = RouterProcess::start_urls(&[format!("tcp://{addr}")], &[], 0);
    let clients = Clients::new(&peers);
    clients.buildx_builder("zero", &router.url(), None).await;
    let ctx = Context::new(&peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();
    let ctl_dest = out.path().join("ctl");
    let bx_dest = out.path().join("bx");
    let ctl_out = format!("type=local,dest={}", ctl_dest.display());
    let router_url = router.url();
    let ctl_args = ["--opt", "build-arg:N=ctl", "--output", &ctl_out];
    let ctl = clients.buildctl_build(&router_url, &[], &ctx, &ctl_args);
    let bx_out = format!("type=local,dest={}", bx_dest.display());
    let bx_args = [
        "build",
        "--builder",
        "zero",
        "--build-arg",
        "N=bx",
        "-o",
        &bx_out,
        ctx.path(),
    ];
    let bx = clients.buildx(&bx_args);
    let late = async {
        // Both clients are waiting (buildctl's build, buildx's probe build) ...
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let queued = router
                    .status()
                    .ok()
                    .and_then(|s| s["builds_queued"].as_i64());
                if queued.unwrap_or(0) >= 2 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("both builds wait in the queue");
        let metrics = router.admin_get("/metrics").unwrap();
        assert!(
            metrics.contains("buildkit_router_desired_backends 1"),
            "an autoscaler is asked for a daemon"
        );
        // ... longer than their own timers, then the daemon comes up.
        tokio::time::sleep(hold).await;
        tokio::task::block_in_place(|| Daemon::start_at(&peers, "late", addr, &[]))
    };
    let (ctl, bx, _daemon) = tokio::join!(ctl, bx, late);
    ctl.assert_ok();
    bx.assert_ok();
    assert_eq!(read(ctl_dest.join("out/n")), "n=ctl\n");
    assert_eq!(read(bx_dest.join("out/n")), "n=bx\n");
    // buildctl shows the wait as a step. buildx waits in its probe build, whose progress it
    // does not print; its real build then runs at once.
    assert!(
        ctl.stderr
            .contains("[buildkit-router] waiting for a builder"),
        "the client showed why it waited:\n{}",
        ctl.stderr
    );
}

/// KEDA's view of a real build on a pool scaled to zero: the router binary discovers daemons
/// through DNS (a DNS server on 127.0.0.1 answering NXDOMAIN: no daemon), a real buildctl build
/// waits in its queue, a KEDA-like client is pushed `true` and counts the build, a real daemon
/// then "starts" (the name resolves to it), the build completes, and after the idle time the
/// push goes `false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_is_pushed_when_a_real_build_waits_on_an_empty_pool() {
    use support::dns::{Behaviour, DnsServer};
    use support::keda::{next_push, Keda};
    let _serial = SERIAL.lock().await;
    let Some(peers) = Peers::require() else {
        return;
    };
    let dns = DnsServer::start(Behaviour::NxDomain).await;
    let daemon = tokio::task::block_in_place(|| Daemon::start(&peers, "woken"));
    let scaler: std::net::SocketAddr = format!("127.0.0.1:{}", support::real::free_port())
        .parse()
        .unwrap();
    let args = [
        format!("--dns=buildkitd.test:{}", daemon.addr.port()),
        format!("--dns-server={}", dns.addr),
        "--dns-interval=200ms".to_owned(),
        format!("--scaler-listen={scaler}"),
        "--scale-to-zero-idle=2s".to_owned(),
    ];
    let router = tokio::task::block_in_place(|| RouterProcess::start_urls(&[], &args, 0));
    let mut keda = Keda::connect(scaler).await;
    let mut stream = keda.stream().await;
    assert!(!next_push(&mut stream).await, "an idle pool is inactive");
    assert_eq!(keda.metric().await, 0);

    let clients = Clients::new(&peers);
    let ctx = Context::new(&peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();
    let dest = format!("type=local,dest={}", out.path().display());
    let router_url = router.url();
    let args = ["--opt", "build-arg:N=woken", "--output", &dest];
    let started = std::time::Instant::now();
    let build = clients.buildctl_build(&router_url, &[], &ctx, &args);
    let keda_side = async {
        assert!(next_push(&mut stream).await, "a queued build is pushed");
        println!(
            "StreamIsActive pushed true {:?} after buildctl was started",
            started.elapsed()
        );
        assert_eq!(keda.metric().await, 1, "GetMetrics counts the queued build");
        assert!(keda.is_active().await);
        // KEDA starts a daemon: the name now resolves to it.
        dns.set(Behaviour::Addresses(vec!["127.0.0.1".parse().unwrap()]));
    };
    let (build, ()) = tokio::join!(build, keda_side);
    build.assert_ok();
    assert_eq!(read(out.path().join("out/n")), "n=woken\n");
    assert!(
        !next_push(&mut stream).await,
        "no build for --scale-to-zero-idle: inactive"
    );
    assert_eq!(keda.metric().await, 0);
}

/// A full pool, as the queue issue checks it: two real daemons capped at one build each, four
/// builds at once from buildctl and buildx. Two wait in the queue (scraped from /metrics while
/// they wait), show why in their progress, and run as slots free; no daemon ever runs two of
/// them at once (the daemons' own recorded start and end times); every build completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_queues_builds_and_runs_them_as_slots_free() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(2, &["--max-builds-per-backend", "1"]) else {
        return;
    };
    pool.buildx_builder().await;
    let ctx = Context::new(&pool.peers, &sleeping_dockerfile_with_arg(3), &[]);
    let out = tempfile::tempdir().unwrap();
    let url = pool.router.url();

    let ctl = |name: &'static str| {
        let dest = out.path().join(name);
        let ref_file = out.path().join(format!("{name}.ref"));
        let clients = &pool.clients;
        let (ctx, url) = (&ctx, &url);
        async move {
            let out_arg = format!("type=local,dest={}", dest.display());
            let ref_arg = ref_file.display().to_string();
            let arg = format!("build-arg:N={name}");
            let args = ["--opt", &arg, "--output", &out_arg, "--ref-file", &ref_arg];
            let output = clients.buildctl_build(url, &[], ctx, &args).await;
            (output, read(&ref_file).trim().to_owned(), dest)
        }
    };
    let bx = |name: &'static str| {
        let dest = out.path().join(name);
        let meta = out.path().join(format!("{name}.json"));
        let clients = &pool.clients;
        let ctx = &ctx;
        async move {
            let out_arg = format!("type=local,dest={}", dest.display());
            let arg = format!("N={name}");
            let args = [
                "build",
                "--builder",
                "pool",
                "--progress",
                "plain",
                "--build-arg",
                &arg,
                "--metadata-file",
                meta.to_str().unwrap(),
                "-o",
                &out_arg,
                ctx.path(),
            ];
            let output = clients.buildx(&args).await;
            let build_ref = std::fs::read_to_string(&meta)
                .ok()
                .and_then(|m| serde_json::from_str(&m).ok())
                .map(|m: serde_json::Value| buildx_ref(&m))
                .unwrap_or_default();
            (output, build_ref, dest)
        }
    };
    let scrape = async {
        // Four builds, two slots: two wait, and the metric an autoscaler reads says so.
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let metrics = pool.router.admin_get("/metrics").unwrap_or_default();
                if metrics.contains("buildkit_router_builds_queued{tenant=\"default\"} 2") {
                    return metrics;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("two builds wait in the queue")
    };
    let (a, b, c, d, metrics) =
        tokio::join!(ctl("ctl-a"), ctl("ctl-b"), bx("bx-c"), bx("bx-d"), scrape);
    assert!(
        metrics.contains("buildkit_router_desired_backends 4"),
        "an autoscaler is asked for one daemon per build (target 1):\n{metrics}"
    );
    let builds = [a, b, c, d];
    let mut shown_wait = 0;
    for (output, build_ref, dest) in &builds {
        output.assert_ok();
        assert!(!build_ref.is_empty(), "the build names its ref");
        assert_eq!(read(dest.join("out/done")), "done\n");
        if output
            .stderr
            .contains("[buildkit-router] waiting for a builder")
        {
            shown_wait += 1;
        }
    }
    assert!(
        shown_wait >= 2,
        "the two builds that waited showed why ({shown_wait} did)"
    );
    // The cap held on the daemons themselves: on each, the builds' recorded runs never overlap.
    let refs: Vec<&str> = builds.iter().map(|(_, r, _)| r.as_str()).collect();
    let mut placed = 0;
    for (i, history) in pool.histories().await.iter().enumerate() {
        let mut runs: Vec<(f64, f64)> = history
            .iter()
            .filter(|h| refs.contains(&h.build_ref.as_str()))
            .map(|h| {
                assert_eq!(h.error_code, None, "build {} failed", h.build_ref);
                (h.created_at.unwrap(), h.completed_at.unwrap())
            })
            .collect();
        placed += runs.len();
        runs.sort_by(|x, y| x.0.total_cmp(&y.0));
        for pair in runs.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1,
                "daemon bk{i} ran two builds at once despite the cap of 1: {runs:?}"
            );
        }
    }
    assert_eq!(placed, 4, "every build ran on exactly one daemon");
}

/// Like [`sleeping_dockerfile`], but the build arg `N` makes each build's RUN step its own (no
/// cache shared between them).
fn sleeping_dockerfile_with_arg(seconds: u32) -> String {
    sleeping_dockerfile(seconds)
        .replacen("COPY busybox", "ARG N\nCOPY busybox", 1)
        .replacen("echo running;", "echo running $N;", 1)
}

/// History of builds this router does not know (placed by another replica, or forgotten after
/// `--build-linger`) is found in the daemons' own histories: logs, inspect and Status work as
/// against the daemon that ran the build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_of_builds_placed_by_another_replica() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(3, &[]) else {
        return;
    };
    let ctx = Context::new(&pool.peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();
    let (o, build_ref) = pool
        .buildctl_build(
            &ctx,
            &out.path().join("a"),
            &["--opt", "build-arg:N=replica"],
        )
        .await;
    o.assert_ok();
    let holder = pool.holder(&build_ref).await;
    // A second replica over the same daemons never saw the build.
    let replica = RouterProcess::start(&pool.daemons.iter().collect::<Vec<_>>(), &[]);
    let started = std::time::Instant::now();
    let logs = pool
        .clients
        .buildctl(&replica.url(), &["debug", "logs", &build_ref])
        .await;
    logs.assert_ok();
    assert!(
        logs.stdout.contains("n=replica") || logs.stdout.contains("RUN"),
        "the build's logs:\n{}",
        logs.stdout
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "found in the daemon's history, not after the daemons' 6 s job wait: {:?}",
        started.elapsed()
    );
    pool.clients
        .buildx_builder("replica", &replica.url(), None)
        .await;
    for cmd in [["history", "inspect"], ["history", "logs"]] {
        let o = pool
            .clients
            .buildx(&[cmd[0], cmd[1], "--builder", "replica", &build_ref])
            .await;
        o.assert_ok();
    }
    // The same through the daemon directly, for comparison.
    let direct = pool
        .clients
        .buildctl(&pool.daemons[holder].url(), &["debug", "logs", &build_ref])
        .await;
    direct.assert_ok();
}

/// A build for `platform` through the strict router succeeds.
async fn strict_ok(pool: &Pool, strict: &RouterProcess, ctx: &Context, platform: &str) {
    let platform = format!("platform={platform}");
    pool.clients
        .buildctl_build(&strict.url(), &[], ctx, &["--opt", &platform])
        .await
        .assert_ok();
}

/// The platforms of the manifests in an OCI layout tarball's image index, sorted.
fn oci_platforms(tar: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("tar")
        .args([
            "-xf",
            tar.to_str().unwrap(),
            "-C",
            dir.path().to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "tar -xf {}", tar.display());
    let blob = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        serde_json::from_str(&read(dir.path().join("blobs/sha256").join(hex))).unwrap()
    };
    let layout: serde_json::Value =
        serde_json::from_str(&read(dir.path().join("index.json"))).unwrap();
    let mut manifests: Vec<serde_json::Value> = layout["manifests"].as_array().unwrap().clone();
    // index.json may point at a nested image index.
    if manifests.len() == 1
        && manifests[0]["mediaType"].as_str() == Some("application/vnd.oci.image.index.v1+json")
    {
        manifests = blob(manifests[0]["digest"].as_str().unwrap())["manifests"]
            .as_array()
            .unwrap()
            .clone();
    }
    let mut platforms: Vec<String> = manifests
        .iter()
        .filter(|m| m["platform"]["os"].as_str() != Some("unknown"))
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or("?"),
                m["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    platforms.sort();
    platforms
}

/// The README's first run: `scripts/demo.sh` starts two daemons and the router, runs a build,
/// and prints the lines to use; `scripts/demo.sh stop` ends it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_script_runs_a_build_and_stops_cleanly() {
    let _serial = SERIAL.lock().await;
    let Some(peers) = Peers::require() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("demo");
    let port = support::real::free_port();
    let admin = support::real::free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh");
    let run = |arg: Option<&str>| {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&script)
            .args(arg)
            .env("DEMO_DIR", &dir)
            .env("DEMO_PORT", port.to_string())
            .env("DEMO_ADMIN_PORT", admin.to_string())
            .env("BUILDKIT_ROUTER_BIN", env!("CARGO_BIN_EXE_buildkit-router"))
            .env("BUILDKIT_PEERS_BIN", &peers.bin)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        Clients::run_cmd(format!("scripts/demo.sh {}", arg.unwrap_or("")), cmd)
    };
    // Stop the demo even when an assertion below fails.
    struct StopOnDrop(std::path::PathBuf, u16, u16, std::path::PathBuf);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("bash")
                .arg(&self.3)
                .arg("stop")
                .env("DEMO_DIR", &self.0)
                .env("DEMO_PORT", self.1.to_string())
                .env("DEMO_ADMIN_PORT", self.2.to_string())
                .status();
        }
    }
    let _stop = StopOnDrop(dir.clone(), port, admin, script.clone());

    let started = run(None).await;
    started.assert_ok();
    assert!(
        started
            .stdout
            .contains("The demo build wrote: built through buildkit-router"),
        "{}",
        started.stdout
    );
    let addr = format!("tcp://127.0.0.1:{port}");
    assert!(
        started
            .stdout
            .contains(&format!("buildctl --addr {addr} build")),
        "{}",
        started.stdout
    );
    assert!(started.stdout.contains("stop"), "{}", started.stdout);

    // The printed endpoint serves real builds.
    let clients = Clients::new(&peers);
    let ctx = Context::new(&peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();
    let demo_out = format!("type=local,dest={}", out.path().display());
    clients
        .buildctl_build(
            &addr,
            &[],
            &ctx,
            &["--opt", "build-arg:N=demo", "--output", &demo_out],
        )
        .await
        .assert_ok();
    assert_eq!(read(out.path().join("out/n")), "n=demo\n");

    // A second demo on the same ports refuses to start instead of talking to the first one.
    let mut again = tokio::process::Command::new("bash");
    again
        .arg(&script)
        .env("DEMO_DIR", state.path().join("second"))
        .env("DEMO_PORT", port.to_string())
        .env("DEMO_ADMIN_PORT", admin.to_string())
        .env("BUILDKIT_ROUTER_BIN", env!("CARGO_BIN_EXE_buildkit-router"))
        .env("BUILDKIT_PEERS_BIN", &peers.bin)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let refused = Clients::run_cmd("a second scripts/demo.sh".into(), again).await;
    assert!(!refused.ok(), "ports in use: {}", refused.stdout);
    assert!(
        refused.stderr.contains("already in use"),
        "{}",
        refused.stderr
    );
    // The printed stop line carries the settings it was started with.
    assert!(
        started.stdout.contains(&format!("DEMO_PORT={port}")),
        "{}",
        started.stdout
    );

    run(Some("stop")).await.assert_ok();
    assert!(!dir.exists(), "stop removes the demo's state");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the router is gone after stop"
    );
}

/// The fake daemon must answer as the real one does: the same requests to both give the same
/// gRPC code and message (a ref in a message is normalised to `<ref>`). Where they differ, the
/// real daemon is right.
/// A build the router refuses itself (here a Solve over `--max-message-size`) fails at once
/// with the router's reason. buildctl used to exit 5-8 s later: its Status call waited out
/// `--ref-wait` for a Solve that never came, and buildctl then waited for the Status to go quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_the_router_refuses_fails_at_once_with_the_reason() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(1, &["--max-message-size", "65536"]) else {
        return;
    };
    let ctx = Context::new(&pool.peers, &numbered_dockerfile(), &[]);
    let out = tempfile::tempdir().unwrap();
    let huge = format!("build-arg:HUGE={}", "x".repeat(100_000));
    let started = std::time::Instant::now();
    let (o, build_ref) = pool
        .buildctl_build(&ctx, &out.path().join("refused"), &["--opt", &huge])
        .await;
    let took = started.elapsed();
    // The log line of the refusal names the build (its ref is read from the message's first
    // bytes, although the message is too large to read).
    let log = pool.router.log();
    let warned = log
        .lines()
        .find(|l| l.contains("cannot read /moby.buildkit.v1.Control/Solve request"))
        .unwrap_or_else(|| panic!("the refusal is logged: {log}"));
    assert!(!build_ref.is_empty(), "buildctl wrote its ref");
    assert!(
        warned.contains(&build_ref),
        "the refusal's log line names build {build_ref}: {warned}"
    );
    assert!(!o.status.success(), "the build is refused: {}", o.stderr);
    assert!(
        o.stderr.contains("ResourceExhausted") && o.stderr.contains("65536"),
        "buildctl shows the router's reason: {}",
        o.stderr
    );
    assert!(
        took < Duration::from_secs(4),
        "buildctl took {took:?} to exit"
    );
    assert!(
        pool.clients.histories(&pool.daemons[0]).await.is_empty(),
        "nothing reached the daemon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_daemon_answers_errors_as_the_real_one_does() {
    use buildkit_router::proto::control as pb;
    use support::client::Client;
    use support::fake_daemon::{DaemonOpts, FakeDaemon};
    let _serial = SERIAL.lock().await;
    let Some(peers) = Peers::require() else {
        return;
    };
    let real = Daemon::start(&peers, "real");
    let fake = FakeDaemon::start("fake", DaemonOpts::default()).await;
    let real_client = Client::connect(real.addr).await.expect("connect real");
    let fake_client = Client::connect(fake.addr()).await.expect("connect fake");
    let unknown = support::new_id();

    type Answer = (tonic::Code, String);
    async fn ask(c: &Client, unknown: &str) -> Vec<(&'static str, Answer)> {
        let norm = |r: Result<(), tonic::Status>| match r {
            Ok(()) => (tonic::Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().replace(unknown, "<ref>")),
        };
        let update = |pinned: bool, delete: bool| {
            c.update_build_history(pb::UpdateBuildHistoryRequest {
                r#ref: unknown.to_owned(),
                pinned,
                delete,
                ..Default::default()
            })
        };
        // In order: a fresh daemon has no history bucket until a history call opens it.
        let fresh_pin = norm(update(true, false).await);
        let fresh_delete = norm(update(false, true).await);
        let (status, ping_unknown, ping_none, history) = tokio::join!(
            c.status(unknown),
            c.bridge_ping(Some(unknown)),
            c.bridge_ping(None),
            c.listen_build_history(pb::BuildHistoryRequest {
                r#ref: unknown.to_owned(),
                early_exit: true,
                ..Default::default()
            }),
        );
        vec![
            ("UpdateBuildHistory (pin) on a fresh daemon", fresh_pin),
            (
                "UpdateBuildHistory (delete) on a fresh daemon",
                fresh_delete,
            ),
            ("Status of an unknown ref", norm(status.map(|_| ()))),
            (
                "LLBBridge/Ping of an unknown build",
                norm(ping_unknown.map(|_| ())),
            ),
            (
                "LLBBridge/Ping without a build id",
                norm(ping_none.map(|_| ())),
            ),
            (
                "ListenBuildHistory of an unknown ref",
                norm(history.map(|_| ())),
            ),
            (
                "UpdateBuildHistory (pin) of an unknown ref",
                norm(update(true, false).await),
            ),
            // Not compared: deleting an unknown ref once the bucket exists answers OK or
            // `lease "ref_<ref>": not found` depending on what the daemon did before.
        ]
    }
    let (from_real, from_fake) =
        tokio::join!(ask(&real_client, &unknown), ask(&fake_client, &unknown));
    for ((what, r), (_, f)) in from_real.iter().zip(&from_fake) {
        assert_eq!(
            f, r,
            "{what}: the fake answers {f:?}, the real daemon {r:?}"
        );
    }
}

/// A project of the content-key tests in its `round`th commit: the step to be cached (`RUN
/// ... build-step`) comes before the files that change each commit, and each commit also edits
/// its Dockerfile after that step. No image name, no cache ref, no git: nothing but the content
/// to key the build on.
fn project_dockerfile(name: &str, round: usize) -> String {
    format!(
        "# {name}, commit {round}\nFROM scratch\nCOPY busybox /bin/busybox\nWORKDIR /srv/{name}\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo build-step {name} > /srv/{name}/built\"]\n\
         COPY src.txt ./\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo commit {round}\"]\n\
         CMD [\"/srv/{name}/run\"]\n"
    )
}

/// Whether the progress (`--progress plain`) shows the vertex whose name contains `step` as
/// `CACHED`; `None` if no such vertex was printed.
fn step_cached(progress: &str, step: &str) -> Option<bool> {
    let id = progress.lines().find_map(|l| {
        let (id, rest) = l.split_once(' ')?;
        (id.starts_with('#') && rest.contains(step)).then_some(id)
    })?;
    Some(progress.lines().any(|l| l.trim() == format!("{id} CACHED")))
}

/// Rebuilds of several projects that name nothing (plain `buildctl build`, `buildx build`
/// outside git) land where their cache is: each project is keyed by its Dockerfile, which the
/// router reads through the client's FileSync. Four projects, four commits each, in turn: every
/// warm rebuild's RUN step is CACHED, with either client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_rebuilds_find_their_cache_through_the_content_key() {
    let _serial = SERIAL.lock().await;
    let Some(pool) = Pool::start(3, &[]) else {
        return;
    };
    pool.buildx_builder().await;
    const ROUNDS: usize = 4;
    for client in ["buildctl", "buildx"] {
        let projects: Vec<String> = (0..4).map(|i| format!("{client}-project-{i}")).collect();
        let dirs: Vec<tempfile::TempDir> = projects
            .iter()
            .map(|_| tempfile::tempdir().unwrap())
            .collect();
        let mut uncached = Vec::new();
        for round in 0..ROUNDS {
            for (name, dir) in projects.iter().zip(&dirs) {
                // The next commit: the Dockerfile and the sources change.
                std::fs::write(
                    dir.path().join("Dockerfile"),
                    project_dockerfile(name, round),
                )
                .unwrap();
                std::fs::write(
                    dir.path().join("src.txt"),
                    format!("{name} at commit {round}\n"),
                )
                .unwrap();
                std::fs::copy(&pool.peers.busybox, dir.path().join("busybox")).unwrap();
                let ctx = dir.path().to_str().unwrap();
                let out = if client == "buildctl" {
                    let local_ctx = format!("context={ctx}");
                    let local_df = format!("dockerfile={ctx}");
                    pool.buildctl(&[
                        "build",
                        "--frontend",
                        "dockerfile.v0",
                        "--local",
                        &local_ctx,
                        "--local",
                        &local_df,
                        "--progress",
                        "plain",
                    ])
                    .await
                } else {
                    pool.clients
                        .buildx(&["build", "--builder", "pool", "--progress", "plain", ctx])
                        .await
                };
                out.assert_ok();
                let cached = step_cached(&out.stderr, "build-step").unwrap_or_else(|| {
                    panic!(
                        "no build-step vertex in the progress of {name}:\n{}",
                        out.stderr
                    )
                });
                if round > 0 && !cached {
                    uncached.push(format!("{name} commit {round}"));
                }
            }
        }
        assert!(
            uncached.is_empty(),
            "{client}: warm rebuilds that missed their cache: {uncached:?}\nrouter log:\n{}",
            pool.router.log()
        );
    }
    // Every build was keyed by its content (buildx's probes carry no key and are not counted).
    let metrics = pool.router.admin_get("/metrics").expect("metrics");
    let series = |name: &str| support::metric_value(&metrics, name);
    assert_eq!(
        series("buildkit_router_affinity_key_source_total{source=\"content\"}"),
        2 * 4 * ROUNDS as u64
    );
    assert_eq!(
        series("buildkit_router_affinity_key_source_total{source=\"none\"}"),
        0
    );
    // What the reads cost placement (shown with --nocapture).
    let (sum, count) = metrics
        .lines()
        .fold((0.0, 0.0), |(s, c), l| match l.split_once(' ') {
            Some(("buildkit_router_content_key_read_seconds_sum", v)) => {
                (v.parse().unwrap_or(0.0), c)
            }
            Some(("buildkit_router_content_key_read_seconds_count", v)) => {
                (s, v.parse().unwrap_or(0.0))
            }
            _ => (s, c),
        });
    eprintln!(
        "content key reads: {count} taking {:.1} ms on average",
        1000.0 * sum / f64::max(count, 1.0)
    );
}
