//! The GitLab CI example (`deploy/examples/gitlab-ci.yml`), run for real: gitlab-ci-local (npm)
//! with its shell executor runs the example's `build` job in a git repository, through the real
//! router binary over two real buildkitd, pushing the image and the registry cache to a real
//! registry (Debian's `docker-registry`) on 127.0.0.1. Two pipelines, one commit apart: both
//! succeed, their tags are in the registry, and the second finds its dependency step CACHED.
//!
//! The job calls `docker buildx ...`; the machine has the real buildx but no docker CLI, so a
//! two-line `docker` on PATH hands `docker buildx` to buildx (what the docker CLI does with its
//! buildx plugin). `.ci/run` installs gitlab-ci-local (4.60.1, runs on Node 20), rsync and
//! docker-registry. Without them this test prints why and skips; under `CI=true` it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::real::{Daemon, Peers, Registry, RouterProcess};

/// gitlab-ci-local's version `.ci/run` installs (4.75 needs a newer Node than Debian's 20).
const GITLAB_CI_LOCAL_VERSION: &str = "4.60.1";
/// How long one pipeline may take (a cold daemon builds the image in seconds).
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(300);

/// gitlab-ci-local: `$GITLAB_CI_LOCAL`, else where `.ci/run` installs it, else PATH.
fn gitlab_ci_local() -> Option<PathBuf> {
    let installed = std::env::var_os("HOME").map(|home| {
        Path::new(&home).join(format!(
            ".cache/buildkit-router/gitlab-ci-local-{GITLAB_CI_LOCAL_VERSION}/node_modules/.bin/gitlab-ci-local"
        ))
    });
    let found = std::env::var_os("GITLAB_CI_LOCAL")
        .map(PathBuf::from)
        .into_iter()
        .chain(installed)
        .chain(std::env::var_os("PATH").into_iter().flat_map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("gitlab-ci-local"))
                .collect::<Vec<_>>()
        }))
        .find(|p| p.is_file());
    let rsync = Path::new("/usr/bin/rsync").is_file();
    match found {
        Some(p) if rsync => Some(p),
        _ => {
            let why = "gitlab-ci-local (npm) or rsync is not installed; .ci/run installs both";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("required in CI: {why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// A git repository holding the example pipeline and a small project to build.
struct Project {
    dir: tempfile::TempDir,
}

/// The project's Dockerfile: `FROM scratch` plus a static busybox (nothing is pulled from the
/// internet). The "dependencies" step only depends on deps.txt; the app step on app.txt.
const DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
COPY deps.txt /deps.txt
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /deps && /bin/busybox cp /deps.txt /deps/installed && /bin/busybox echo installing-dependencies"]
COPY app.txt /app.txt
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox cat /deps/installed /app.txt > /build-output"]
"#;

impl Project {
    fn new(peers: &Peers) -> Project {
        let dir = tempfile::tempdir().expect("project dir");
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/gitlab-ci.yml");
        std::fs::copy(example, dir.path().join(".gitlab-ci.yml")).expect("copy the example");
        std::fs::copy(&peers.busybox, dir.path().join("busybox")).expect("copy busybox");
        std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
        std::fs::write(dir.path().join("deps.txt"), "libfoo 1.2\n").expect("deps");
        std::fs::write(dir.path().join("app.txt"), "version 1\n").expect("app");
        // gitlab-ci-local's own state stays out of the commits.
        std::fs::write(dir.path().join(".gitignore"), ".gitlab-ci-local/\n").expect("ignore");
        let project = Project { dir };
        project.git(&["init", "--quiet", "--initial-branch=main"]);
        // CI_PROJECT_PATH (group/project) comes from the remote; nothing is ever fetched.
        project.git(&[
            "remote",
            "add",
            "origin",
            "https://gitlab.example.com/group/project.git",
        ]);
        project.commit("first commit");
        project
    }

    fn git(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(self.dir.path())
            .env("GIT_AUTHOR_NAME", "CI")
            .env("GIT_AUTHOR_EMAIL", "ci@example.com")
            .env("GIT_COMMITTER_NAME", "CI")
            .env("GIT_COMMITTER_EMAIL", "ci@example.com")
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "--quiet", "-m", message]);
        self.git(&["rev-parse", "--short=8", "HEAD"])
    }
}

/// One run of the example's `build` job; its output.
struct Pipeline {
    ok: bool,
    output: String,
}

impl Pipeline {
    /// The buildx step number (`#N`) of the RUN whose command contains `needle`.
    fn step_of(&self, needle: &str) -> Option<String> {
        self.output.lines().find_map(|line| {
            let at = line.find('#')?;
            let rest = &line[at..];
            (rest.contains("RUN") && rest.contains(needle)).then(|| {
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
    }

    fn step_cached(&self, step: &str) -> bool {
        self.output
            .lines()
            .any(|l| l.trim_end().ends_with(&format!("{step} CACHED")))
    }
}

/// Runs gitlab-ci-local with the shell executor, as a developer would on their machine.
async fn run_pipeline(
    gcl: &Path,
    project: &Project,
    peers: &Peers,
    shims: &Path,
    home: &Path,
    variables: &[(String, String)],
) -> Pipeline {
    let mut cmd = tokio::process::Command::new(gcl);
    cmd.current_dir(project.dir.path())
        .args(["--force-shell-executor", "--no-color", "build"])
        .env("HOME", home)
        .env(
            "PATH",
            format!(
                "{}:{}:{}",
                shims.display(),
                peers.bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("BUILDKIT_PROGRESS", "plain")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in variables {
        cmd.arg("--variable").arg(format!("{k}={v}"));
    }
    let out = tokio::time::timeout(PIPELINE_TIMEOUT, cmd.output())
        .await
        .expect("the pipeline finished in time")
        .expect("run gitlab-ci-local");
    Pipeline {
        ok: out.status.success(),
        output: String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gitlab_example_builds_and_pushes_through_the_router_with_a_warm_cache() {
    let Some(peers) = Peers::require() else {
        return;
    };
    let Some(gcl) = gitlab_ci_local() else { return };
    let Some(registry) = Registry::start() else {
        return;
    };
    let work = tempfile::tempdir().expect("work dir");
    let config = work.path().join("buildkitd.toml");
    std::fs::write(&config, registry.buildkitd_config()).expect("buildkitd config");
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| {
            Daemon::start_with(
                &peers,
                &format!("bk{i}"),
                &[format!("--config={}", config.display())],
            )
        })
        .collect();
    let router = RouterProcess::start(&daemons.iter().collect::<Vec<_>>(), &[]);

    // `docker buildx ...` is the buildx plugin; this machine has buildx itself.
    let shims = work.path().join("bin");
    std::fs::create_dir_all(&shims).expect("shim dir");
    let docker = shims.join("docker");
    std::fs::write(
        &docker,
        "#!/bin/sh\n[ \"$1\" = buildx ] || { echo \"docker $1: only buildx is here\" >&2; exit 1; }\nshift\nexec buildx \"$@\"\n",
    )
    .expect("docker shim");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).expect("home");

    // What GitLab would set: the project's registry (here the local one) and its credentials,
    // and where the router listens.
    let image = format!("{}/group/project", registry.addr);
    let variables = vec![
        ("BUILDKIT_ROUTER_ADDR".to_owned(), router.url()),
        ("CI_REGISTRY".to_owned(), registry.addr.to_string()),
        ("CI_REGISTRY_IMAGE".to_owned(), image.clone()),
        ("CI_REGISTRY_USER".to_owned(), "gitlab-ci-token".to_owned()),
        ("CI_REGISTRY_PASSWORD".to_owned(), "unused".to_owned()),
    ];

    let project = Project::new(&peers);
    let first_sha = project.git(&["rev-parse", "--short=8", "HEAD"]);
    let first = run_pipeline(&gcl, &project, &peers, &shims, &home, &variables).await;
    assert!(first.ok, "first pipeline failed:\n{}", first.output);
    let deps = first
        .step_of("installing-dependencies")
        .unwrap_or_else(|| panic!("no dependency RUN step in:\n{}", first.output));
    assert!(
        !first.step_cached(&deps),
        "a fresh pool has no cache for the dependency step:\n{}",
        first.output
    );

    // One commit later: only the application changed.
    std::fs::write(project.dir.path().join("app.txt"), "version 2\n").expect("app");
    let second_sha = project.commit("second commit");
    let second = run_pipeline(&gcl, &project, &peers, &shims, &home, &variables).await;
    assert!(second.ok, "second pipeline failed:\n{}", second.output);
    let deps = second
        .step_of("installing-dependencies")
        .unwrap_or_else(|| panic!("no dependency RUN step in:\n{}", second.output));
    for line in second
        .output
        .lines()
        .filter(|l| l.contains(&format!("{deps} ")))
    {
        println!("second pipeline: {line}");
    }
    assert!(
        second.step_cached(&deps),
        "the second pipeline's dependency step ({deps}) is not CACHED:\n{}",
        second.output
    );
    let app = second
        .step_of("/build-output")
        .expect("the application RUN step");
    assert!(
        !second.step_cached(&app),
        "the changed application step must run again:\n{}",
        second.output
    );

    let tags = registry.tags("group/project");
    for sha in [&first_sha, &second_sha] {
        assert!(
            tags.contains(sha),
            "image tag {sha} not in the registry: {tags:?}"
        );
    }
    let cache_tags = registry.tags("group/project/buildcache");
    assert!(
        cache_tags.iter().any(|t| t == "main"),
        "registry cache for branch main not pushed: {cache_tags:?}"
    );
    drop(router);
    drop(daemons);
}
