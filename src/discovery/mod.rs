//! Sources of backends: a static list, DNS (a headless Service, re-resolved), and Kubernetes
//! EndpointSlices. Each source turns what it sees into [`PoolUpdate`]s on a channel; the pool
//! applies them. Sources never talk to the router.
// OWNED BY THE discovery HELPER (issue 4), except `static_source` which the routing core uses.

use crate::pool::{BackendAddress, EndpointSpec, EndpointState, PoolUpdate};
use tokio::sync::mpsc;

/// Discovery flags (flattened into the router's command line). `--backend` lives in the main
/// config because it also carries per-backend TLS settings.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiscoveryArgs {}

/// Announces a fixed list of backends once (`--backend`, repeatable). Identity is the address.
pub async fn static_source(addresses: Vec<BackendAddress>, updates: mpsc::Sender<PoolUpdate>) {
    let specs = addresses
        .into_iter()
        .map(|address| EndpointSpec {
            identity: address.to_string(),
            address,
            state: EndpointState::Ready,
            zone: None,
            node: None,
        })
        .collect();
    // The pool outlives every source; a closed channel only means shutdown.
    let _ = updates.send(PoolUpdate::Reset(specs)).await;
}
