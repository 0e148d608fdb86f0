//! The GitLab example (`deploy/examples/gitlab-ci.yml`), run for real: gitlab-ci-local runs the
//! file unchanged with its shell executor, through the real router over two real buildkitd, and
//! the jobs push the image and the registry cache to a real registry (Debian's
//! `docker-registry` on 127.0.0.1). Two pipelines, one commit apart: both pass, both tags are in
//! the registry, and the second pipeline's dependency step is CACHED.
//!
//! The job runs `docker buildx ...` as in the `docker:*-cli` image; here `docker` is a shim that
//! runs the pinned buildx binary (buildx is the docker CLI plugin that image ships).

mod support;

use std::path::Path;
use std::process::Command;

use support::real::{Daemon, DockerRegistry, Peers, RouterProcess};

/// The project's Dockerfile: a dependency step (slow, rarely changes) and a build step that
/// reads the source, which changes with every commit.
const DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
COPY deps.txt /deps.txt
RUN ["/bin/busybox", "sh", "-c", "echo installing dependencies; /bin/busybox sleep 1; /bin/busybox mkdir -p /deps; /bin/busybox cp /deps.txt /deps/installed"]
COPY app.txt /app.txt
RUN ["/bin/busybox", "sh", "-c", "echo building the app; /bin/busybox cat /app.txt /deps/installed > /built"]
"#;

/// `docker buildx ARGS` → `buildx ARGS`; anything else needs a daemon, which CI jobs here lack.
const DOCKER_SHIM: &str = "#!/bin/sh\n\
    if [ \"$1\" = buildx ]; then shift; exec buildx \"$@\"; fi\n\
    echo \"docker $1: only the buildx plugin is available in this job\" >&2; exit 1\n";

fn git(repo: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "user.name=CI", "-c", "user.email=ci@example.com"])
        .args(args)
        .current_dir(repo)
        .status()
        .expect("run git");
    assert!(status.success(), "git {args:?} failed");
}

/// One pipeline run: gitlab-ci-local's combined output, after asserting it passed.
fn run_pipeline(
    peers: &Peers,
    repo: &Path,
    router: &RouterProcess,
    registry: &DockerRegistry,
    shim_dir: &Path,
    home: &Path,
) -> String {
    let path = format!(
        "{}:{}:{}",
        shim_dir.display(),
        peers.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new(peers.bin.join("gitlab-ci-local"))
        .arg("--force-shell-executor")
        .args([
            "--variable",
            &format!("BUILDKIT_ROUTER_ADDR={}", router.url()),
        ])
        .args(["--variable", &format!("CI_REGISTRY={}", registry.addr)])
        // As GitLab gives every job (the registry here takes no auth; the docker CLI config the
        // job writes must still be valid).
        .args(["--variable", "CI_REGISTRY_USER=gitlab-ci-token"])
        .args(["--variable", "CI_REGISTRY_PASSWORD=job-token"])
        .current_dir(repo)
        .env("HOME", home)
        .env("PATH", path)
        .env("BUILDKIT_PROGRESS", "plain")
        .env("BUILDX_NO_DEFAULT_ATTESTATIONS", "1")
        .env("NO_COLOR", "1")
        .env("FORCE_COLOR", "0")
        .output()
        .expect("run gitlab-ci-local");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && text.contains("PASS") && text.contains("build"),
        "the pipeline failed ({}):\n{text}\n--- router log\n{}",
        output.status,
        router.log()
    );
    assert!(
        text.contains(&format!("Endpoint:         {}", router.url())),
        "the job's builder is the router:\n{text}"
    );
    assert!(
        !text.contains("invalid auth configuration"),
        "the job's registry credentials are valid:\n{text}"
    );
    text
}

/// The BuildKit step number of the step whose line contains `marker`, and whether that step
/// was CACHED (plain progress: `#7 [3/5] RUN ...`, then `#7 CACHED` or `#7 DONE`).
fn step_cached(log: &str, marker: &str) -> bool {
    let step = log
        .lines()
        .filter(|l| l.contains(marker) && l.contains(" RUN "))
        .find_map(|l| {
            let hash = l.find('#')?;
            let id: String = l[hash + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            (!id.is_empty()).then_some(id)
        })
        .unwrap_or_else(|| panic!("no RUN step with {marker:?} in the job log:\n{log}"));
    log.lines()
        .any(|l| l.trim_end().ends_with(&format!("#{step} CACHED")))
}

#[test]
fn the_gitlab_example_builds_pushes_and_reuses_its_cache_through_the_router() {
    let Some(peers) = Peers::require() else {
        return;
    };
    let Some(registry) = DockerRegistry::start() else {
        return;
    };
    assert!(
        peers.bin.join("gitlab-ci-local").is_file(),
        "gitlab-ci-local is missing from {} (scripts/install-buildkit.sh installs it)",
        peers.bin.display()
    );
    // buildkitd pushes to this registry over plain HTTP, as told by its config.
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("buildkitd.toml");
    std::fs::write(
        &config,
        format!("[registry.\"{}\"]\n  http = true\n", registry.addr),
    )
    .unwrap();
    let config_arg = format!("--config={}", config.display());
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| Daemon::start_with(&peers, &format!("ci{i}"), std::slice::from_ref(&config_arg)))
        .collect();
    let router = RouterProcess::start(&daemons.iter().collect::<Vec<_>>(), &[]);

    let shim_dir = tempfile::tempdir().unwrap();
    let shim = shim_dir.path().join("docker");
    std::fs::write(&shim, DOCKER_SHIM).unwrap();
    Command::new("chmod").arg("+x").arg(&shim).status().unwrap();

    // The project: the example pipeline unchanged, a Dockerfile, and its files.
    let repo = tempfile::tempdir().unwrap();
    let repo_path = repo.path();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/gitlab-ci.yml");
    std::fs::copy(&example, repo_path.join(".gitlab-ci.yml")).unwrap();
    std::fs::write(repo_path.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::copy(&peers.busybox, repo_path.join("busybox")).unwrap();
    std::fs::write(repo_path.join("deps.txt"), "left-pad 1.3.0\n").unwrap();
    std::fs::write(repo_path.join("app.txt"), "version 1\n").unwrap();
    git(repo_path, &["init", "-q", "-b", "main"]);
    git(
        repo_path,
        &[
            "remote",
            "add",
            "origin",
            "https://gitlab.example.com/group/project.git",
        ],
    );
    git(repo_path, &["add", "."]);
    git(repo_path, &["commit", "-q", "-m", "first"]);
    let short_sha = |repo: &Path| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=8", "HEAD"])
            .current_dir(repo)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let first_sha = short_sha(repo_path);

    // One HOME for both pipelines, as on a GitLab shell runner: the docker CLI config and
    // buildx's builder list (the first job's `router` builder) are still there for the second.
    let home = tempfile::tempdir().expect("runner home");
    let run = || {
        run_pipeline(
            &peers,
            repo_path,
            &router,
            &registry,
            shim_dir.path(),
            home.path(),
        )
    };
    let first = run();
    assert!(
        !step_cached(&first, "installing dependencies"),
        "a cold pool runs the dependency step:\n{first}"
    );
    assert!(
        registry.tags("group/project").contains(&first_sha),
        "the image tag {first_sha} is in the registry: {:?}",
        registry.tags("group/project")
    );
    assert_eq!(
        registry.tags("group/project/buildcache"),
        vec!["main".to_owned()],
        "the branch's registry cache was exported"
    );

    // One commit later: the source changed, the dependencies did not.
    std::fs::write(repo_path.join("app.txt"), "version 2\n").unwrap();
    git(repo_path, &["commit", "-q", "-am", "second"]);
    let second_sha = short_sha(repo_path);
    let second = run();
    assert!(
        step_cached(&second, "installing dependencies"),
        "the second pipeline's dependency step is CACHED:\n{second}"
    );
    assert!(
        !step_cached(&second, "building the app"),
        "the changed source is built again:\n{second}"
    );
    let tags = registry.tags("group/project");
    assert!(
        tags.contains(&first_sha) && tags.contains(&second_sha),
        "both pipelines' tags are in the registry: {tags:?}"
    );
}
