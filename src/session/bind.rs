//! Binding a held Session to the backend of the Solve that names it.
//!
//! Which daemon a Session belongs to is only known once a Solve names its uuid (in `Session`,
//! `SourcePolicySession` or a `local-sessionid:*` attribute). Meanwhile the router holds it
//! ([`super::hold`] answers the inner connection itself, so the hold has no 10 s limit). A
//! Session no Solve names within the bind window is placed on its own: by its shared key, else
//! on the least loaded backend; a Solve naming it later follows it. [`bind`] is the default
//! "wait until bound" future handed to [`super::serve`]; a queue can hand in its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::placement::{Placement, PlacementError};
use crate::pool::{Backend, Pool};
use crate::registry::{KeyKind, Registry};

/// The Session headers the router reads (every header is still passed through unchanged).
pub const UUID_HEADER: &str = "x-docker-expose-session-uuid";
pub const SHARED_KEY_HEADER: &str = "x-docker-expose-session-sharedkey";

/// How a session found its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindHow {
    /// A Solve had already named it.
    Immediate,
    /// A Solve named it while it was held.
    Solve,
    /// No Solve named it within the bind window: placed on its own.
    Fallback,
}

impl BindHow {
    pub fn as_str(self) -> &'static str {
        match self {
            BindHow::Immediate => "immediate",
            BindHow::Solve => "solve",
            BindHow::Fallback => "fallback",
        }
    }
}

/// The outcome of holding a session.
pub struct Bound {
    pub backend: Arc<Backend>,
    pub how: BindHow,
    pub waited: Duration,
}

/// Holds the session `uuid` until it is bound, or places it when the bind window passes.
pub async fn bind(
    registry: &Registry,
    pool: &Pool,
    placement: &Placement,
    uuid: &str,
    shared_key: &str,
    bind_window: Duration,
) -> Result<Bound, PlacementError> {
    let started = Instant::now();
    if let Some(backend) = registry.lookup(KeyKind::Session, uuid) {
        return Ok(Bound {
            backend,
            how: BindHow::Immediate,
            waited: started.elapsed(),
        });
    }
    if let Some(backend) = registry
        .wait_bound(KeyKind::Session, uuid, bind_window)
        .await
    {
        return Ok(Bound {
            backend,
            how: BindHow::Solve,
            waited: started.elapsed(),
        });
    }
    let traits = placement.traits_for_session(shared_key);
    let (backend, placed) = registry.bind_session(uuid, || {
        let snapshot = pool.snapshot();
        let choice = placement.choose(&snapshot.backends, &traits)?;
        Ok(snapshot.backends[choice.index].clone())
    })?;
    let how = if placed {
        BindHow::Fallback
    } else {
        BindHow::Solve
    };
    if placed {
        tracing::info!(
            session = uuid,
            backend = %backend.identity(),
            "no Solve named this session within the bind window; placed it on its own"
        );
    }
    Ok(Bound {
        backend,
        how,
        waited: started.elapsed(),
    })
}
