//! `ListWorkers` and `Info` with no backend at all: a pool scaled to zero must still let
//! `buildx create` and `buildx inspect --bootstrap` succeed, or no build ever arrives to make the
//! autoscaler grow it.
//!
//! The answers come, first that exists: the last answer a daemon gave this process; the last
//! one persisted in `--state-dir` (written whenever a daemon's answer changes, so a restarted
//! router at zero still knows its pool); an answer made from `--default-platforms`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use prost::Message;
use tracing::warn;

use crate::proto::control as pb;
use crate::wire;

pub const LIST_WORKERS: &str = "/moby.buildkit.v1.Control/ListWorkers";
pub const INFO: &str = "/moby.buildkit.v1.Control/Info";
/// `LLBBridge/Ping`: its Pong lists the daemon's capabilities. A gateway client given no caps
/// falls back to the oldest ones and then fails against a current daemon ("did not find
/// request for return reference"), so a queued build's Ping gets a real daemon's Pong.
pub const PING: &str = "/moby.buildkit.v1.frontend.LLBBridge/Ping";

/// What a router with no backend answers `ListWorkers` and `Info` with.
#[derive(Debug, Default)]
pub struct OfflineAnswers {
    state_dir: Option<PathBuf>,
    default_platforms: Vec<String>,
    /// The last framed answer of each call, as a daemon gave it.
    last: Mutex<[Option<Bytes>; 3]>,
}

fn slot(path: &str) -> usize {
    match path {
        INFO => 1,
        PING => 2,
        _ => 0,
    }
}

fn file_name(path: &str) -> &'static str {
    match path {
        INFO => "info.bin",
        PING => "pong.bin",
        _ => "list-workers.bin",
    }
}

impl OfflineAnswers {
    /// Loads what `state_dir` holds from an earlier run. Without `default_platforms`, the
    /// router's own platform stands in until a daemon answers (`linux/amd64` on x86-64), so an
    /// empty pool takes builds with no flag set.
    pub fn new(state_dir: Option<PathBuf>, default_platforms: Vec<String>) -> Self {
        let default_platforms = if default_platforms.is_empty() {
            vec![host_platform()]
        } else {
            default_platforms
        };
        let answers = Self {
            state_dir,
            default_platforms,
            last: Mutex::default(),
        };
        if let Some(dir) = &answers.state_dir {
            let mut last = answers.last.lock().expect("answers lock");
            for path in [LIST_WORKERS, INFO, PING] {
                if let Ok(bytes) = std::fs::read(dir.join(file_name(path))) {
                    last[slot(path)] = Some(Bytes::from(bytes));
                }
            }
        }
        answers
    }

    /// Keeps a daemon's framed answer to `path` (and persists it when it changed).
    pub fn remember(&self, path: &str, framed: &Bytes) {
        let changed = {
            let mut last = self.last.lock().expect("answers lock");
            let s = &mut last[slot(path)];
            let changed = s.as_ref() != Some(framed);
            *s = Some(framed.clone());
            changed
        };
        if let (true, Some(dir)) = (changed, &self.state_dir) {
            if let Err(e) = write_atomically(&dir.join(file_name(path)), framed) {
                warn!(dir = %dir.display(), error = %e, "cannot persist the {path} answer in --state-dir");
            }
        }
    }

    /// A daemon's last answer to `path` (this run's, or persisted by an earlier one).
    pub fn known(&self, path: &str) -> Option<Bytes> {
        self.last.lock().expect("answers lock")[slot(path)].clone()
    }

    /// The framed answer to `path` with no backend, if there is one.
    pub fn answer(&self, path: &str) -> Option<Bytes> {
        if let Some(known) = self.known(path) {
            return Some(known);
        }
        if path == PING {
            // The capabilities of the BuildKit release the project is tested with
            // (scripts/install-buildkit.sh), as its daemon answers.
            return Some(Bytes::from_static(PINNED_PONG));
        }
        if self.default_platforms.is_empty() {
            return None;
        }
        let message = if path == INFO {
            pb::InfoResponse {
                buildkit_version: Some(pb::BuildkitVersion {
                    package: "github.com/moby/buildkit".into(),
                    version: "unknown (no buildkitd seen yet by buildkit-router)".into(),
                    revision: String::new(),
                }),
            }
            .encode_to_vec()
        } else {
            pb::ListWorkersResponse {
                record: vec![pb::WorkerRecord {
                    id: "buildkit-router-default".into(),
                    labels: [(
                        "org.mobyproject.buildkit.worker.executor".to_owned(),
                        "oci".to_owned(),
                    )]
                    .into(),
                    platforms: self.default_platforms.iter().map(|p| platform(p)).collect(),
                }],
            }
            .encode_to_vec()
        };
        Some(wire::encode_frame(&message))
    }
}

/// A framed `PongResponse` recorded from buildkitd v0.32.2 (the pinned release).
const PINNED_PONG: &[u8] = include_bytes!("../proto/pong-buildkitd-v0.32.2.bin");

/// The platform the router runs on, as BuildKit names it.
fn host_platform() -> String {
    crate::placement::normalize_platform(&format!("linux/{}", std::env::consts::ARCH))
}

/// `linux/arm64/v8` -> Platform{OS, Architecture, Variant}.
fn platform(text: &str) -> pb::Platform {
    let mut parts = text.splitn(3, '/');
    let os = parts.next().unwrap_or_default().to_owned();
    let architecture = parts.next().unwrap_or_default().to_owned();
    let variant = parts.next().unwrap_or_default().to_owned();
    pb::Platform {
        architecture,
        os,
        variant,
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_platforms_make_a_worker_and_state_survives_a_restart() {
        let answers = OfflineAnswers::new(None, vec![]);
        let framed = answers
            .answer(LIST_WORKERS)
            .expect("the router's own platform");
        let platforms = wire::decode_worker_platforms(&framed[wire::GRPC_PREFIX_LEN..]).unwrap();
        assert_eq!(platforms, [host_platform()]);
        assert!(host_platform().starts_with("linux/") && !host_platform().contains("x86_64"));

        let answers =
            OfflineAnswers::new(None, vec!["linux/amd64".into(), "linux/arm64/v8".into()]);
        let framed = answers.answer(LIST_WORKERS).unwrap();
        let platforms = wire::decode_worker_platforms(&framed[wire::GRPC_PREFIX_LEN..]).unwrap();
        assert_eq!(platforms, ["linux/amd64", "linux/arm64/v8"]);
        assert!(answers.answer(INFO).is_some());

        let dir = tempfile::tempdir().unwrap();
        let first = OfflineAnswers::new(Some(dir.path().into()), vec![]);
        let seen = wire::encode_frame(b"\x0a\x03\x0a\x01x");
        first.remember(LIST_WORKERS, &seen);
        let restarted = OfflineAnswers::new(Some(dir.path().into()), vec!["linux/amd64".into()]);
        assert_eq!(
            restarted.answer(LIST_WORKERS),
            Some(seen),
            "a daemon's answer beats defaults"
        );
    }
}
