//! Sources of backends: a static list, DNS (a headless Service, re-resolved), and Kubernetes
//! EndpointSlices. Each source turns what it sees into [`PoolUpdate`]s on a channel; the pool
//! applies them. Sources never talk to the router.
//!
//! Every configured source reports its complete set of endpoints to one merger task. The merger
//! waits until each source has reported once, then hands the pool one [`PoolUpdate::Reset`] with
//! the union (so `/readyz` waits for the first full list of every source), and from then on only
//! the differences (`Add`, `Update`, `Remove`). A source that fails keeps its last set.
//!
//! Entry point for the router: [`run`]. Tests and embedders can build [`Source`]s themselves and
//! call [`spawn`].
//!
//! `--backend` addresses also reach the pool through this module (the static source), so every
//! backend, whatever its origin, goes through the same merger and the same `PoolUpdate`s.

mod dns;
mod kubernetes;
mod metrics;

use std::collections::BTreeMap;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::pool::{BackendAddress, BackendTls, EndpointSpec, EndpointState, PoolUpdate};

pub use dns::{DnsSource, DnsTarget, Resolver, ResolverConfigError, SystemResolver};
pub(crate) use kubernetes::backends_from_slices;
pub use kubernetes::{KubernetesSource, PortSelector};
pub use metrics::DiscoveryMetrics;

/// Discovery flags (flattened into the router's command line). `--backend` lives in the main
/// config because it also carries per-backend TLS settings.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiscoveryArgs {
    /// Discover backends from the A/AAAA records of this name (a headless Service), as
    /// name:port, e.g. buildkitd.buildkit.svc.cluster.local:1234. Re-resolved every
    /// --dns-interval; each address is one backend, identified by ip:port.
    #[arg(long, value_name = "NAME:PORT", env = "BUILDKIT_ROUTER_DNS")]
    pub dns: Option<String>,
    /// How often --dns is re-resolved.
    #[arg(long, value_parser = crate::duration::parse_duration, default_value = "5s", env = "BUILDKIT_ROUTER_DNS_INTERVAL")]
    pub dns_interval: Duration,
    /// Ask these name servers (IP:PORT, UDP; comma-separated or repeated) for --dns instead
    /// of those in /etc/resolv.conf (whose search domains then do not apply).
    #[arg(
        long,
        value_name = "IP:PORT",
        value_delimiter = ',',
        env = "BUILDKIT_ROUTER_DNS_SERVER"
    )]
    pub dns_server: Vec<std::net::SocketAddr>,

    /// Discover backends from the EndpointSlices of this Service ([namespace/]name), watched
    /// through the Kubernetes API (in-cluster service account, or kubeconfig). Needs get, list and
    /// watch on endpointslices.discovery.k8s.io in that namespace.
    #[arg(
        long,
        value_name = "[NAMESPACE/]NAME",
        env = "BUILDKIT_ROUTER_KUBERNETES_SERVICE"
    )]
    pub kubernetes_service: Option<String>,
    /// Port of the --kubernetes-service endpoints to use: a port name from the Service, or a
    /// number (the port on the pod). Default: the first port the EndpointSlice lists.
    #[arg(
        long,
        value_name = "NAME|NUMBER",
        env = "BUILDKIT_ROUTER_KUBERNETES_PORT"
    )]
    pub kubernetes_port: Option<String>,
    /// Namespace of --kubernetes-service when it does not name one. Default: the namespace of the
    /// kubeconfig context, or in a pod the service account's namespace, else "default".
    #[arg(
        long,
        value_name = "NAMESPACE",
        env = "BUILDKIT_ROUTER_KUBERNETES_NAMESPACE"
    )]
    pub kubernetes_namespace: Option<String>,

    /// Talk TLS to backends found by --dns or --kubernetes-service, with the backend TLS settings
    /// (--backend-tls-ca, --backend-tls-cert/--backend-tls-key, --backend-tls-server-name).
    /// Without it they are spoken to in h2c.
    #[arg(long, env = "BUILDKIT_ROUTER_DISCOVERED_BACKEND_TLS")]
    pub discovered_backend_tls: bool,
    /// Server name verified on each discovered backend, with `{pod}` replaced by the pod name
    /// (Kubernetes) and `{host}` by the address, e.g. `{pod}.buildkitd.buildkit.svc`. Default: the
    /// --backend-tls-server-name of the backend TLS settings. Implies --discovered-backend-tls.
    #[arg(
        long,
        value_name = "TEMPLATE",
        env = "BUILDKIT_ROUTER_DISCOVERED_BACKEND_TLS_SERVER_NAME"
    )]
    pub discovered_backend_tls_server_name: Option<String>,
}

/// How long one query to a `--dns-server` may take.
const DNS_SERVER_TIMEOUT: Duration = Duration::from_secs(3);

/// Why discovery cannot start. Each names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no backends configured: pass --backend tcp://host:port, --dns name:port, or --kubernetes-service [namespace/]name")]
    NoSource,
    #[error("--dns {value:?} is not name:port: {reason}")]
    InvalidDnsTarget { value: String, reason: String },
    #[error("--dns-interval must be more than zero")]
    InvalidDnsInterval,
    #[error("--dns: {0}")]
    DnsConfig(#[from] ResolverConfigError),
    #[error("--kubernetes-service {value:?} is not [namespace/]name: {reason}")]
    InvalidKubernetesService { value: String, reason: String },
    #[error("--kubernetes-port {value:?} is neither a port name nor a port number 1-65535")]
    InvalidKubernetesPort { value: String },
    #[error("--kubernetes-service {service:?} is in namespace {in_service:?} but --kubernetes-namespace says {flag:?}; drop one of them")]
    ConflictingNamespace {
        service: String,
        in_service: String,
        flag: String,
    },
    #[error("--kubernetes-port and --kubernetes-namespace need --kubernetes-service")]
    KubernetesFlagsWithoutService,
    #[error("cannot build a Kubernetes client (tried KUBECONFIG or ~/.kube/config, then the in-cluster service account): {0}")]
    KubernetesClient(#[source] kube::Error),
    #[error("--discovered-backend-tls needs backend TLS settings: pass --backend-tls-ca (and --backend-tls-cert/--backend-tls-key for mTLS)")]
    MissingBackendTls,
    #[error("--discovered-backend-tls-server-name {template:?} does not give a valid server name: {reason}")]
    InvalidTlsServerName { template: String, reason: String },
}

/// TLS settings for discovered backends: the caller's backend TLS settings, with the server
/// name optionally derived per endpoint from a template.
#[derive(Clone, Debug)]
pub struct TlsTemplate {
    base: BackendTls,
    server_name: Option<String>,
}

impl TlsTemplate {
    /// `server_name`: `None` keeps `base.server_name`; else `{pod}` and `{host}` are replaced per
    /// endpoint.
    pub fn new(base: BackendTls, server_name: Option<String>) -> Result<Self, DiscoveryError> {
        if let Some(template) = &server_name {
            let sample = render_server_name(template, Some("buildkitd-0"), "10.0.0.1");
            ServerName::try_from(sample).map_err(|e| DiscoveryError::InvalidTlsServerName {
                template: template.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self { base, server_name })
    }

    /// The TLS settings of one endpoint. An endpoint without a pod name whose template needs one
    /// keeps the base server name.
    pub(crate) fn for_endpoint(&self, pod: Option<&str>, host: &str) -> BackendTls {
        let mut tls = self.base.clone();
        if let Some(template) = &self.server_name {
            if pod.is_some() || !template.contains("{pod}") {
                let name = render_server_name(template, pod, host);
                match ServerName::try_from(name.clone()) {
                    Ok(server_name) => tls.server_name = server_name,
                    Err(error) => {
                        warn!(%name, %error, "discovered backend TLS server name is invalid; using the default one")
                    }
                }
            }
        }
        tls
    }
}

fn render_server_name(template: &str, pod: Option<&str>, host: &str) -> String {
    template
        .replace("{pod}", pod.unwrap_or(host))
        .replace("{host}", host)
}

/// One configured discovery source.
pub enum Source {
    /// A fixed list (`--backend`). Identity is the address, as in [`static_source`].
    Static(Vec<BackendAddress>),
    Dns(DnsSource),
    Kubernetes(KubernetesSource),
}

impl Source {
    fn label(&self) -> &'static str {
        match self {
            Source::Static(_) => "static",
            Source::Dns(_) => "dns",
            Source::Kubernetes(_) => "kubernetes",
        }
    }
}

/// Starts every source configured on the command line, plus the `--backend` list, feeding `tx`
/// (the pool's update channel). Returns once they are spawned; they run until `tx`'s receiver is
/// dropped. Must be called inside a Tokio runtime.
///
/// `tls`: the backend TLS settings (from `--backend-tls-*`), used for discovered endpoints when
/// `--discovered-backend-tls` is set. Fails on bad flags, or when a Kubernetes client cannot be
/// built.
pub async fn run(
    args: &DiscoveryArgs,
    static_backends: Vec<BackendAddress>,
    tls: Option<BackendTls>,
    tx: mpsc::Sender<PoolUpdate>,
    metrics: DiscoveryMetrics,
) -> Result<(), DiscoveryError> {
    let tls = discovered_tls(args, tls)?;
    let mut sources = Vec::new();
    if !static_backends.is_empty() {
        sources.push(Source::Static(static_backends));
    }
    if let Some(value) = &args.dns {
        if args.dns_interval.is_zero() {
            return Err(DiscoveryError::InvalidDnsInterval);
        }
        let target =
            value
                .parse::<DnsTarget>()
                .map_err(|reason| DiscoveryError::InvalidDnsTarget {
                    value: value.clone(),
                    reason,
                })?;
        let source = if args.dns_server.is_empty() {
            DnsSource::new(target, args.dns_interval, tls.clone())?
        } else {
            DnsSource {
                target,
                interval: args.dns_interval,
                resolver: std::sync::Arc::new(SystemResolver::with_name_servers(
                    &args.dns_server,
                    DNS_SERVER_TIMEOUT,
                )),
                tls: tls.clone(),
            }
        };
        sources.push(Source::Dns(source));
    }
    match &args.kubernetes_service {
        Some(value) => {
            let (namespace, service) = split_service(value)?;
            let port = match &args.kubernetes_port {
                Some(port) => port.parse::<PortSelector>().map_err(|_| {
                    DiscoveryError::InvalidKubernetesPort {
                        value: port.clone(),
                    }
                })?,
                None => PortSelector::First,
            };
            let namespace = match (namespace, &args.kubernetes_namespace) {
                (Some(ns), Some(flag)) if ns != *flag => {
                    return Err(DiscoveryError::ConflictingNamespace {
                        service: value.clone(),
                        in_service: ns,
                        flag: flag.clone(),
                    })
                }
                (Some(ns), _) => Some(ns),
                (None, flag) => flag.clone(),
            };
            let client = kube::Client::try_default()
                .await
                .map_err(DiscoveryError::KubernetesClient)?;
            let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
            sources.push(Source::Kubernetes(KubernetesSource {
                client,
                namespace,
                service,
                port,
                tls,
            }));
        }
        None if args.kubernetes_port.is_some() || args.kubernetes_namespace.is_some() => {
            return Err(DiscoveryError::KubernetesFlagsWithoutService)
        }
        None => {}
    }
    spawn(sources, tx, metrics)
}

/// The TLS template for discovered endpoints, if the flags ask for TLS.
fn discovered_tls(
    args: &DiscoveryArgs,
    tls: Option<BackendTls>,
) -> Result<Option<TlsTemplate>, DiscoveryError> {
    if !args.discovered_backend_tls && args.discovered_backend_tls_server_name.is_none() {
        return Ok(None);
    }
    let base = tls.ok_or(DiscoveryError::MissingBackendTls)?;
    TlsTemplate::new(base, args.discovered_backend_tls_server_name.clone()).map(Some)
}

/// `ns/name` or `name`; both parts must be DNS labels.
fn split_service(value: &str) -> Result<(Option<String>, String), DiscoveryError> {
    let invalid = |reason: &str| DiscoveryError::InvalidKubernetesService {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let (namespace, name) = match value.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, value),
    };
    for part in namespace.iter().chain([&name]) {
        if !is_dns_label(part) {
            return Err(invalid(&format!(
                "{part:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
            )));
        }
    }
    Ok((namespace.map(str::to_string), name.to_string()))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// One source's complete current set of endpoints, sent to the merger.
pub(crate) struct SourceSet {
    pub index: usize,
    pub specs: Vec<EndpointSpec>,
}

/// Starts `sources` and the merger that feeds `tx`. Returns once they are spawned; they run until
/// `tx`'s receiver is dropped.
pub fn spawn(
    sources: Vec<Source>,
    tx: mpsc::Sender<PoolUpdate>,
    metrics: DiscoveryMetrics,
) -> Result<(), DiscoveryError> {
    if sources.is_empty() {
        return Err(DiscoveryError::NoSource);
    }
    let labels: Vec<&'static str> = sources.iter().map(Source::label).collect();
    let (sets_tx, sets_rx) = mpsc::channel(16);
    tokio::spawn(run_merger(labels, sets_rx, tx, metrics.clone()));
    for (index, source) in sources.into_iter().enumerate() {
        let sets_tx = sets_tx.clone();
        match source {
            Source::Static(addresses) => {
                let specs = addresses.into_iter().map(static_spec).collect();
                tokio::spawn(async move {
                    let _ = sets_tx.send(SourceSet { index, specs }).await;
                });
            }
            Source::Dns(dns) => {
                tokio::spawn(dns::run(dns, index, sets_tx, metrics.clone()));
            }
            Source::Kubernetes(k8s) => {
                tokio::spawn(kubernetes::run(k8s, index, sets_tx, metrics.clone()));
            }
        }
    }
    Ok(())
}

fn static_spec(address: BackendAddress) -> EndpointSpec {
    EndpointSpec {
        identity: address.to_string(),
        address,
        state: EndpointState::Ready,
        zone: None,
        node: None,
    }
}

/// Announces a fixed list of backends once (`--backend`, repeatable). Identity is the address.
pub async fn static_source(addresses: Vec<BackendAddress>, updates: mpsc::Sender<PoolUpdate>) {
    let specs = addresses.into_iter().map(static_spec).collect();
    // The pool outlives every source; a closed channel only means shutdown.
    let _ = updates.send(PoolUpdate::Reset(specs)).await;
}

async fn run_merger(
    labels: Vec<&'static str>,
    mut sets: mpsc::Receiver<SourceSet>,
    tx: mpsc::Sender<PoolUpdate>,
    metrics: DiscoveryMetrics,
) {
    let mut merger = Merger::new(labels.clone());
    while let Some(SourceSet { index, specs }) = sets.recv().await {
        let source = labels[index];
        for update in merger.update(index, specs) {
            let op = op_name(&update);
            match &update {
                PoolUpdate::Reset(specs) => {
                    info!(
                        source,
                        backends = specs.len(),
                        "discovery: first complete list of backends"
                    )
                }
                PoolUpdate::Add(spec) | PoolUpdate::Update(spec) => info!(
                    source,
                    backend = %spec.identity,
                    address = %spec.address,
                    state = ?spec.state,
                    zone = spec.zone.as_deref().unwrap_or(""),
                    node = spec.node.as_deref().unwrap_or(""),
                    "discovery: backend {op}"
                ),
                PoolUpdate::Remove(identity) => {
                    info!(source, backend = %identity, "discovery: backend gone")
                }
            }
            metrics.update(source, op);
            if tx.send(update).await.is_err() {
                return; // The pool is gone: shutdown.
            }
        }
    }
}

fn op_name(update: &PoolUpdate) -> &'static str {
    match update {
        PoolUpdate::Reset(_) => "reset",
        PoolUpdate::Add(_) => "add",
        PoolUpdate::Update(_) => "update",
        PoolUpdate::Remove(_) => "remove",
    }
}

/// Combines the sets of several sources and computes what changed.
struct Merger {
    labels: Vec<&'static str>,
    sets: Vec<Option<Vec<EndpointSpec>>>,
    /// What the pool was last told; `None` until every source reported once.
    current: Option<BTreeMap<String, EndpointSpec>>,
}

impl Merger {
    fn new(labels: Vec<&'static str>) -> Self {
        Self {
            sets: vec![None; labels.len()],
            labels,
            current: None,
        }
    }

    /// Records `index`'s new set; returns the updates that bring the pool to the new union.
    fn update(&mut self, index: usize, specs: Vec<EndpointSpec>) -> Vec<PoolUpdate> {
        self.sets[index] = Some(specs);
        if self.sets.iter().any(Option::is_none) {
            return Vec::new();
        }
        let mut union: BTreeMap<String, (usize, EndpointSpec)> = BTreeMap::new();
        for (source, set) in self.sets.iter().enumerate() {
            for spec in set.iter().flatten() {
                match union.get(&spec.identity) {
                    // Within one source identities are unique; across sources the first wins.
                    Some((first, _)) if *first != source => warn!(
                        backend = %spec.identity,
                        kept = self.labels[*first],
                        ignored = self.labels[source],
                        "two discovery sources report the same backend identity; keeping the first"
                    ),
                    Some(_) => {}
                    None => {
                        union.insert(spec.identity.clone(), (source, spec.clone()));
                    }
                }
            }
        }
        let union: BTreeMap<String, EndpointSpec> =
            union.into_iter().map(|(k, (_, spec))| (k, spec)).collect();
        let Some(current) = self.current.as_mut() else {
            let updates = vec![PoolUpdate::Reset(union.values().cloned().collect())];
            self.current = Some(union);
            return updates;
        };
        let mut updates = Vec::new();
        for identity in current.keys() {
            if !union.contains_key(identity) {
                updates.push(PoolUpdate::Remove(identity.clone()));
            }
        }
        for (identity, spec) in &union {
            match current.get(identity) {
                None => updates.push(PoolUpdate::Add(spec.clone())),
                Some(old) if !same_spec(old, spec) => {
                    updates.push(PoolUpdate::Update(spec.clone()))
                }
                Some(_) => {}
            }
        }
        *current = union;
        updates
    }
}

fn same_spec(a: &EndpointSpec, b: &EndpointSpec) -> bool {
    a.identity == b.identity
        && a.state == b.state
        && a.zone == b.zone
        && a.node == b.node
        && a.address.host == b.address.host
        && a.address.port == b.address.port
        && a.address.tls.as_ref().map(|t| &t.server_name)
            == b.address.tls.as_ref().map(|t| &t.server_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, port: u16, state: EndpointState) -> EndpointSpec {
        EndpointSpec {
            identity: id.into(),
            address: BackendAddress::tcp("10.0.0.1", port),
            state,
            zone: None,
            node: None,
        }
    }

    fn describe(updates: &[PoolUpdate]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                PoolUpdate::Reset(specs) => {
                    format!(
                        "reset {}",
                        specs
                            .iter()
                            .map(|s| s.identity.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                }
                PoolUpdate::Add(s) => format!("add {} {:?}", s.identity, s.state),
                PoolUpdate::Update(s) => {
                    format!("update {} {:?} {}", s.identity, s.state, s.address.port)
                }
                PoolUpdate::Remove(id) => format!("remove {id}"),
            })
            .collect()
    }

    #[test]
    fn merger_waits_for_every_source_then_sends_differences() {
        let mut merger = Merger::new(vec!["static", "kubernetes"]);
        assert!(merger
            .update(1, vec![spec("b", 1, EndpointState::Ready)])
            .is_empty());
        assert_eq!(
            describe(&merger.update(0, vec![spec("a", 1, EndpointState::Ready)])),
            ["reset a,b"]
        );
        // Unchanged: nothing.
        assert!(merger
            .update(1, vec![spec("b", 1, EndpointState::Ready)])
            .is_empty());
        assert_eq!(
            describe(&merger.update(
                1,
                vec![
                    spec("b", 1, EndpointState::Draining),
                    spec("c", 1, EndpointState::Ready)
                ]
            )),
            ["update b Draining 1", "add c Ready"]
        );
        assert_eq!(
            describe(&merger.update(1, vec![spec("c", 2, EndpointState::Ready)])),
            ["remove b", "update c Ready 2"]
        );
        // An empty set from a source is a real answer: its backends go.
        assert_eq!(describe(&merger.update(1, vec![])), ["remove c"]);
    }

    #[test]
    fn merger_sends_an_empty_reset_when_the_first_list_is_empty() {
        let mut merger = Merger::new(vec!["dns"]);
        assert_eq!(describe(&merger.update(0, vec![])), ["reset "]);
    }

    #[test]
    fn first_source_wins_a_shared_identity() {
        let mut merger = Merger::new(vec!["static", "dns"]);
        merger.update(0, vec![spec("x", 1, EndpointState::Ready)]);
        let updates = merger.update(1, vec![spec("x", 2, EndpointState::Draining)]);
        match &updates[..] {
            [PoolUpdate::Reset(specs)] => {
                assert_eq!(specs.len(), 1);
                assert_eq!(specs[0].address.port, 1);
            }
            other => panic!("unexpected {:?}", describe(other)),
        }
    }

    #[test]
    fn tls_server_names_follow_the_template() {
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let base = BackendTls {
            client_config: std::sync::Arc::new(config),
            server_name: ServerName::try_from("buildkitd.ci.svc").unwrap(),
        };
        let name = |t: &TlsTemplate, pod, host| t.for_endpoint(pod, host).server_name;
        let sn = |s: &'static str| ServerName::try_from(s).unwrap();
        let plain = TlsTemplate::new(base.clone(), None).unwrap();
        assert_eq!(
            name(&plain, Some("bk-0"), "10.0.0.1"),
            sn("buildkitd.ci.svc")
        );
        let per_pod =
            TlsTemplate::new(base.clone(), Some("{pod}.buildkitd.ci.svc".into())).unwrap();
        assert_eq!(
            name(&per_pod, Some("bk-0"), "10.0.0.1"),
            sn("bk-0.buildkitd.ci.svc")
        );
        assert_eq!(
            name(&per_pod, None, "10.0.0.1"),
            sn("buildkitd.ci.svc"),
            "no pod: base name"
        );
        let by_host = TlsTemplate::new(base.clone(), Some("{host}".into())).unwrap();
        assert_eq!(name(&by_host, None, "10.0.0.1"), sn("10.0.0.1"));
        assert!(TlsTemplate::new(base, Some("bad name!".into())).is_err());
    }

    #[test]
    fn service_names_split_and_validate() {
        assert_eq!(
            split_service("buildkitd").unwrap(),
            (None, "buildkitd".to_string())
        );
        assert_eq!(
            split_service("ci/buildkitd").unwrap(),
            (Some("ci".to_string()), "buildkitd".to_string())
        );
        assert!(split_service("ci/").is_err());
        assert!(split_service("Ci/buildkitd").is_err());
        assert!(split_service("a/b/c").is_err());
    }

    #[tokio::test]
    async fn run_needs_a_source_and_valid_flags() {
        let (tx, _rx) = mpsc::channel(1);
        let args = DiscoveryArgs::default();
        let err = run(&args, vec![], None, tx.clone(), DiscoveryMetrics::new())
            .await
            .unwrap_err();
        assert!(matches!(err, DiscoveryError::NoSource), "{err}");

        let args = DiscoveryArgs {
            dns: Some("buildkitd".into()),
            dns_interval: Duration::from_secs(5),
            ..Default::default()
        };
        let err = run(&args, vec![], None, tx.clone(), DiscoveryMetrics::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, DiscoveryError::InvalidDnsTarget { .. }),
            "{err}"
        );

        let args = DiscoveryArgs {
            dns: Some("buildkitd:1234".into()),
            dns_interval: Duration::from_secs(5),
            discovered_backend_tls: true,
            ..Default::default()
        };
        let err = run(&args, vec![], None, tx.clone(), DiscoveryMetrics::new())
            .await
            .unwrap_err();
        assert!(matches!(err, DiscoveryError::MissingBackendTls), "{err}");

        let args = DiscoveryArgs {
            kubernetes_service: Some("a/buildkitd".into()),
            kubernetes_namespace: Some("b".into()),
            ..Default::default()
        };
        let err = run(&args, vec![], None, tx.clone(), DiscoveryMetrics::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, DiscoveryError::ConflictingNamespace { .. }),
            "{err}"
        );

        let args = DiscoveryArgs {
            kubernetes_port: Some("grpc".into()),
            ..Default::default()
        };
        let err = run(
            &args,
            vec![BackendAddress::tcp("h", 1)],
            None,
            tx,
            DiscoveryMetrics::new(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, DiscoveryError::KubernetesFlagsWithoutService),
            "{err}"
        );
    }

    #[tokio::test]
    async fn static_backends_arrive_as_one_reset() {
        let (tx, mut rx) = mpsc::channel(4);
        let metrics = DiscoveryMetrics::new();
        run(
            &DiscoveryArgs::default(),
            vec![BackendAddress::tcp("a", 1), BackendAddress::tcp("b", 2)],
            None,
            tx,
            metrics.clone(),
        )
        .await
        .unwrap();
        match rx.recv().await {
            Some(PoolUpdate::Reset(specs)) => {
                let ids: Vec<_> = specs.iter().map(|s| s.identity.as_str()).collect();
                assert_eq!(ids, ["tcp://a:1", "tcp://b:2"]);
            }
            other => panic!("expected a reset, got {other:?}"),
        }
        assert_eq!(metrics.updates_count("static", "reset"), 1);
    }
}
