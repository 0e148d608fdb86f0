//! The `content` affinity key: a key for builds that name no project.
//!
//! A plain `buildctl build --local context=. --local dockerfile=.`, a CI job exporting to a
//! tarball, a buildx build outside a git checkout: such a Solve carries no key (no
//! `vcs:source`, no image name, no cache ref, an empty session shared key), so placement would
//! put each rebuild anywhere. When no key source before `content` matched, the router reads the
//! build's Dockerfile itself, before placing it, through the client's own FileSync service in
//! the Session it holds ([`crate::session::directory`]): a `FileSync/DiffCopy` of the
//! `dockerfile` local with the metadata the daemon sends ([`filesync`]). The key is a hash of
//! what identifies the project across commits (`placement::dockerfile::fingerprint`) with the `target`
//! and `platform` attributes.
//!
//! Bounded: the read gets `--content-key-timeout` (default 500 ms) in all, waiting for the
//! Session included, and a Dockerfile over `--content-key-max-bytes` (default 256 KiB) is not
//! read. Any failure places the build as before (the next key source, else load) and says so
//! in the log and in `buildkit_router_content_key_reads_total{outcome}`. Nothing the client or
//! the daemon sees changes: the read is a stream of its own, the daemon's own reads are relayed
//! untouched, and no vertex or error is added.

pub mod filesync;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::placement::dockerfile;
use crate::placement::key::content_key;
use crate::placement::{BuildTraits, Placement};
use crate::session::Directory;
use crate::wire::SolveInfo;
use filesync::{FileRequest, ReadError, DIFFCOPY};

/// The local the Dockerfile comes from, unless `dockerfilekey` names another (dockerui).
const DOCKERFILE_LOCAL: &str = "dockerfile";
const DEFAULT_FILENAME: &str = "Dockerfile";

fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: usize = digits.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        other => return Err(format!("unknown unit {other:?} (use B, KiB or MiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Content key flags (flattened into the router's command line). The key source itself is
/// `content` in `--affinity-key-sources`.
#[derive(Debug, Clone, clap::Args)]
pub struct ContentArgs {
    /// How long placement waits for a keyless build's Dockerfile (the Session's arrival
    /// included) before placing it without a content key.
    #[arg(long, value_parser = crate::duration::parse_duration, default_value = "500ms", env = "BUILDKIT_ROUTER_CONTENT_KEY_TIMEOUT")]
    pub content_key_timeout: Duration,
    /// Largest Dockerfile read for the content key (B, KiB or MiB); a larger one is not read.
    #[arg(long, value_parser = parse_bytes, default_value = "256KiB", env = "BUILDKIT_ROUTER_CONTENT_KEY_MAX_BYTES")]
    pub content_key_max_bytes: usize,
}

impl ContentArgs {
    pub fn to_settings(&self) -> ContentSettings {
        ContentSettings {
            timeout: self.content_key_timeout,
            max_bytes: self.content_key_max_bytes,
        }
    }
}

/// Bounds of the Dockerfile read.
#[derive(Debug, Clone)]
pub struct ContentSettings {
    /// The whole read, waiting for the Session included.
    pub timeout: Duration,
    /// Largest Dockerfile read, in bytes.
    pub max_bytes: usize,
}

impl Default for ContentSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(500),
            max_bytes: 256 << 10,
        }
    }
}

/// Outcomes of content key reads (`buildkit_router_content_key_reads_total{outcome}`).
pub const OUTCOMES: [&str; 11] = [
    "ok",
    "no_session",
    "remote",
    "no_filesync",
    "refused",
    "not_found",
    "too_large",
    "malformed",
    "failed",
    "timeout",
    "empty",
];

/// `buildkit_router_content_key_reads_total{outcome}` and `..._read_seconds`.
#[derive(Debug, Clone)]
pub struct ContentMetrics {
    pub reads_total: IntCounterVec,
    pub read_seconds: Histogram,
}

impl Default for ContentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentMetrics {
    pub fn new() -> Self {
        let reads_total = IntCounterVec::new(
            Opts::new(
                "content_key_reads_total",
                "Dockerfile reads for the content affinity key, by outcome (ok, or why the build was placed without it)",
            )
            .namespace("buildkit_router"),
            &["outcome"],
        )
        .expect("valid metric definition");
        for o in OUTCOMES {
            reads_total.with_label_values(&[o]);
        }
        let read_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "content_key_read_seconds",
                "Time a build's placement waited for its content key (successful or not)",
            )
            .namespace("buildkit_router")
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )
        .expect("valid metric definition");
        Self {
            reads_total,
            read_seconds,
        }
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.reads_total.clone()))?;
        registry.register(Box::new(self.read_seconds.clone()))
    }
}

/// Why a build got no content key.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("the Solve names no session to read the {local:?} local from")]
    NoSession { local: String },
    #[error("the Dockerfile comes from a remote context ({0})")]
    Remote(String),
    #[error("session {0} did not reach this router in time")]
    SessionMissing(String),
    #[error("session {0} does not serve {DIFFCOPY}")]
    NoFileSync(String),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("the Dockerfile was not read within {0:?} (--content-key-timeout)")]
    TimedOut(Duration),
    #[error("{0} holds no Dockerfile instruction")]
    Empty(String),
}

impl ContentError {
    /// The bounded label of [`OUTCOMES`].
    pub fn kind(&self) -> &'static str {
        match self {
            ContentError::NoSession { .. } | ContentError::SessionMissing(_) => "no_session",
            ContentError::Remote(_) => "remote",
            ContentError::NoFileSync(_) => "no_filesync",
            ContentError::Read(e) => e.kind(),
            ContentError::TimedOut(_) => "timeout",
            ContentError::Empty(_) => "empty",
        }
    }
}

/// Derives content keys for Solves.
pub struct ContentKeys {
    settings: ContentSettings,
    directory: Arc<Directory>,
    metrics: ContentMetrics,
}

impl ContentKeys {
    pub fn new(
        settings: ContentSettings,
        directory: Arc<Directory>,
        metrics: ContentMetrics,
    ) -> Self {
        Self {
            settings,
            directory,
            metrics,
        }
    }

    /// What a Solve asks of placement ([`Placement::traits_for_solve`]), with the content key
    /// when placement wants one and the build is not `pinned` to a backend already (a session
    /// it names is bound: the key would not be used).
    pub async fn traits_for_solve(
        &self,
        placement: &Placement,
        solve: &SolveInfo<'_>,
        pinned: bool,
    ) -> BuildTraits {
        let mut traits = placement.traits_for_solve(solve);
        if pinned || !placement.content_wanted(solve) {
            return traits;
        }
        let started = Instant::now();
        let result = self.key_of(solve, &traits.platforms).await;
        self.metrics
            .read_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(key) => {
                self.metrics.reads_total.with_label_values(&["ok"]).inc();
                debug!(key = %key.text, elapsed = ?started.elapsed(), "content key read");
                traits.key = Some(key);
            }
            Err(error) => {
                let outcome = error.kind();
                self.metrics.reads_total.with_label_values(&[outcome]).inc();
                info!(
                    outcome,
                    %error,
                    elapsed = ?started.elapsed(),
                    fallback = traits.key_source().as_str(),
                    "no content key for this build; placing it without"
                );
            }
        }
        traits
    }

    async fn key_of(
        &self,
        solve: &SolveInfo<'_>,
        platforms: &[String],
    ) -> Result<crate::placement::AffinityKey, ContentError> {
        let attr = |k: &str| {
            solve
                .frontend_attr(k)
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let renamed = attr("dockerfilekey");
        if let Some(context) = attr("context").filter(|c| is_remote(c)) {
            if renamed.is_none() {
                return Err(ContentError::Remote(context.to_owned()));
            }
        }
        let local = renamed.unwrap_or(DOCKERFILE_LOCAL);
        let session = attr(&format!("local-sessionid:{local}"))
            .unwrap_or(solve.session)
            .to_owned();
        if session.is_empty() {
            return Err(ContentError::NoSession {
                local: local.to_owned(),
            });
        }
        let request = dockerfile_request(
            local,
            attr("filename").unwrap_or(DEFAULT_FILENAME),
            &self.settings,
        );
        let timeout = self.settings.timeout;
        let deadline = Instant::now() + timeout;
        let read = tokio::time::timeout_at(deadline, async {
            let client = self
                .directory
                .wait(&session, deadline)
                .await
                .ok_or_else(|| ContentError::SessionMissing(session.clone()))?;
            if !client.serves(DIFFCOPY) {
                return Err(ContentError::NoFileSync(session.clone()));
            }
            Ok(filesync::read_file(client.sender(), &request).await?)
        })
        .await
        .map_err(|_| ContentError::TimedOut(timeout))??;
        let text = String::from_utf8_lossy(&read.data);
        let fingerprint = dockerfile::fingerprint(&dockerfile::instructions(&text));
        if fingerprint.is_empty() {
            return Err(ContentError::Empty(read.path));
        }
        Ok(content_key(
            &fingerprint,
            attr("target").unwrap_or(""),
            platforms,
        ))
    }
}

/// A `context` attribute that the frontend fetches itself (dockerui `DetectGitContext` /
/// `DetectHTTPContext`): the Dockerfile is not in a local of the client then.
fn is_remote(context: &str) -> bool {
    context.contains("://") || context.starts_with("git@") || context.starts_with("github.com/")
}

/// The read dockerui's `load build definition from <filename>` does (buildkit v0.32.2
/// `frontend/dockerui/config.go`): followpaths `<filename>`, `<filename>.dockerignore` and, for
/// a file named `Dockerfile`, its lower-case spelling, which is also read as a fallback.
fn dockerfile_request(local: &str, filename: &str, settings: &ContentSettings) -> FileRequest {
    let mut follow_paths = vec![filename.to_owned(), format!("{filename}.dockerignore")];
    let mut wanted = vec![filename.to_owned()];
    let (dir, base) = filename.rsplit_once('/').unwrap_or(("", filename));
    if base == DEFAULT_FILENAME {
        let dir = dir
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect::<Vec<_>>()
            .join("/");
        let lower = if dir.is_empty() {
            "dockerfile".to_owned()
        } else {
            format!("{dir}/dockerfile")
        };
        follow_paths.push(lower.clone());
        wanted.push(lower);
    }
    FileRequest {
        local: local.to_owned(),
        follow_paths,
        wanted,
        max_bytes: settings.max_bytes,
        timeout: settings.timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_request_follows_dockerui() {
        let s = ContentSettings::default();
        let r = dockerfile_request("dockerfile", "Dockerfile", &s);
        assert_eq!(
            r.follow_paths,
            ["Dockerfile", "Dockerfile.dockerignore", "dockerfile"]
        );
        assert_eq!(r.wanted, ["Dockerfile", "dockerfile"]);
        let r = dockerfile_request("dockerfile", "./svc/api/Dockerfile", &s);
        assert_eq!(
            r.follow_paths,
            [
                "./svc/api/Dockerfile",
                "./svc/api/Dockerfile.dockerignore",
                "svc/api/dockerfile"
            ]
        );
        let r = dockerfile_request("df", "Dockerfile.prod", &s);
        assert_eq!(
            r.follow_paths,
            ["Dockerfile.prod", "Dockerfile.prod.dockerignore"]
        );
        assert_eq!(r.local, "df");
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("256KiB"), Ok(256 << 10));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("1GiB").is_err());
    }

    #[test]
    fn remote_contexts_are_recognised() {
        assert!(is_remote("https://github.com/moby/buildkit.git#main"));
        assert!(is_remote("git@github.com:org/repo.git"));
        assert!(!is_remote("."));
    }
}
