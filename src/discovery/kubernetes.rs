//! Kubernetes discovery: a kube-runtime watcher on the `discovery.k8s.io/v1` EndpointSlices of
//! one Service (label `kubernetes.io/service-name=<service>`).
//!
//! Per endpoint: identity = pod name (`targetRef.name`; the address when there is none), the first
//! address, the port chosen by `--kubernetes-port`, zone and node. State:
//! - terminating → draining (no new builds; running builds and their calls go on);
//! - ready and serving → ready;
//! - not ready but serving → draining;
//! - otherwise (not serving) → not a backend (the pool finishes its builds, then drops it).
//!
//! A pod appears in several slices in dual-stack clusters (one per address family) and briefly
//! while the controller moves endpoints between slices. Such entries are merged by pod name: the
//! address is the IPv4 one when there is one (then IPv6, then FQDN), and the state is the most
//! cautious one any slice reports, so a pod that one slice already calls terminating takes no new
//! builds.

use std::collections::BTreeMap;
use std::str::FromStr;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{DiscoveryMetrics, SourceSet, TlsTemplate};
use crate::pool::{BackendAddress, EndpointSpec, EndpointState};

const SOURCE: &str = "kubernetes";

/// Which port of the endpoints to use (`--kubernetes-port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSelector {
    /// The first port the EndpointSlice lists.
    First,
    /// The port with this name (the Service port's name).
    Name(String),
    /// This port number on the pod, whatever the slice lists.
    Number(u16),
}

impl FromStr for PortSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u16>() {
                Ok(port) if port != 0 => Ok(Self::Number(port)),
                _ => Err(format!("{s:?} is not a port number 1-65535")),
            };
        }
        if s.is_empty()
            || s.len() > 63
            || !s
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!("{s:?} is not a port name"));
        }
        Ok(Self::Name(s.to_string()))
    }
}

/// The `--kubernetes-service` source.
pub struct KubernetesSource {
    pub client: kube::Client,
    pub namespace: String,
    /// The Service name (the value of the `kubernetes.io/service-name` label).
    pub service: String,
    pub port: PortSelector,
    pub tls: Option<TlsTemplate>,
}

/// Watches the Service's EndpointSlices and reports the full set of endpoints after the first
/// complete list and after every change. Errors are logged and counted; the watcher retries with
/// backoff and the last set stays in force meanwhile.
pub(crate) async fn run(
    source: KubernetesSource,
    index: usize,
    tx: mpsc::Sender<SourceSet>,
    metrics: DiscoveryMetrics,
) {
    let KubernetesSource {
        client,
        namespace,
        service,
        port,
        tls,
    } = source;
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut slices = SliceSet::new(port, tls);
    info!(source = SOURCE, %namespace, %service, "watching EndpointSlices");
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = events.next() => next,
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(error)) => {
                metrics.error(SOURCE);
                let hint = if is_forbidden(&error) {
                    "; the router's service account needs get, list and watch on endpointslices.discovery.k8s.io in this namespace"
                } else {
                    ""
                };
                warn!(
                    source = SOURCE,
                    %namespace,
                    %service,
                    %error,
                    kept = slices.endpoint_count(),
                    "EndpointSlice watch failed; keeping the last known backends and retrying with backoff{hint}"
                );
                continue;
            }
            None => return, // The watcher never ends on its own.
        };
        let outcome = slices.handle(event);
        for problem in &outcome.problems {
            metrics.error(SOURCE);
            warn!(source = SOURCE, %namespace, %service, "{problem}");
        }
        if let Some(specs) = outcome.set {
            if outcome.listed {
                info!(
                    source = SOURCE,
                    %namespace,
                    %service,
                    slices = slices.slices.len(),
                    backends = specs.len(),
                    "listed EndpointSlices"
                );
            }
            if tx.send(SourceSet { index, specs }).await.is_err() {
                return;
            }
        }
    }
}

fn is_forbidden(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.is_forbidden(),
        watcher::Error::WatchError(status) => status.is_forbidden(),
        _ => false,
    }
}

/// How an endpoint's conditions rank; higher is more cautious.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Condition {
    Ready,
    Draining,
    NotServing,
}

/// Reads the conditions as the API documents them: `ready` nil is true; `serving` nil follows
/// `ready` (older clusters leave it unset); `terminating` nil is false.
fn condition(conditions: Option<&EndpointConditions>) -> Condition {
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if terminating {
        // Scale-down or rollout: running builds finish here, new ones go elsewhere. (A Service with
        // publishNotReadyAddresses reports terminating pods as ready; they still drain.)
        Condition::Draining
    } else if ready && serving {
        Condition::Ready
    } else if serving {
        Condition::Draining
    } else {
        Condition::NotServing
    }
}

/// One endpoint as one slice reports it.
#[derive(Debug, Clone)]
struct Candidate {
    identity: String,
    pod: Option<String>,
    host: String,
    port: u16,
    /// 0 IPv4, 1 IPv6, 2 FQDN: the preferred address family sorts first.
    family: u8,
    condition: Condition,
    zone: Option<String>,
    node: Option<String>,
}

/// The endpoints of one slice, or why it has none we can use.
fn parse_slice(slice: &EndpointSlice, port: &PortSelector) -> Result<Vec<Candidate>, String> {
    let name = slice.name_any();
    let endpoints = slice.endpoints.as_deref().unwrap_or_default();
    if endpoints.is_empty() {
        return Ok(Vec::new());
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => 0,
        "IPv6" => 1,
        "FQDN" => 2,
        other => {
            return Err(format!(
                "EndpointSlice {name} has addressType {other:?}; ignoring it"
            ))
        }
    };
    let ports = slice.ports.as_deref().unwrap_or_default();
    let listed = || {
        let list: Vec<String> = ports
            .iter()
            .map(|p| {
                format!(
                    "{}={}",
                    p.name.as_deref().unwrap_or(""),
                    p.port.map_or("all".into(), |n| n.to_string())
                )
            })
            .collect();
        if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        }
    };
    let number = match port {
        PortSelector::Number(n) => Some(i32::from(*n)),
        PortSelector::Name(wanted) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(wanted.as_str()))
            .map(|p| p.port)
            .ok_or_else(|| {
                format!(
                    "EndpointSlice {name} has no port named {wanted:?} (it lists: {}); fix --kubernetes-port",
                    listed()
                )
            })?,
        PortSelector::First => ports.first().and_then(|p| p.port),
    };
    let port = number
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0)
        .ok_or_else(|| {
            format!(
                "EndpointSlice {name} gives no usable port (it lists: {}); pass --kubernetes-port <name or number>",
                listed()
            )
        })?;
    let mut out = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let Some(host) = endpoint.addresses.first() else {
            continue;
        };
        let pod = endpoint
            .target_ref
            .as_ref()
            .and_then(|r| r.name.clone())
            .filter(|n| !n.is_empty());
        let identity = pod.clone().unwrap_or_else(|| {
            if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        });
        out.push(Candidate {
            identity,
            pod,
            host: host.clone(),
            port,
            family,
            condition: condition(endpoint.conditions.as_ref()),
            zone: endpoint.zone.clone(),
            node: endpoint.node_name.clone(),
        });
    }
    Ok(out)
}

/// What one watcher event changed.
#[derive(Debug, Default)]
struct Outcome {
    /// The full set of backends, once a complete list has been seen.
    set: Option<Vec<EndpointSpec>>,
    /// Whether this event completed a (re-)list.
    listed: bool,
    /// Slices that could not be used, to log and count.
    problems: Vec<String>,
}

/// The Service's slices by name, as of the last complete list plus the changes since.
struct SliceSet {
    port: PortSelector,
    tls: Option<TlsTemplate>,
    slices: BTreeMap<String, Vec<Candidate>>,
    /// Slices of a (re-)list in progress; they replace `slices` at `InitDone`.
    pending: Option<BTreeMap<String, Vec<Candidate>>>,
    synced: bool,
}

impl SliceSet {
    fn new(port: PortSelector, tls: Option<TlsTemplate>) -> Self {
        Self {
            port,
            tls,
            slices: BTreeMap::new(),
            pending: None,
            synced: false,
        }
    }

    fn endpoint_count(&self) -> usize {
        self.slices.values().map(Vec::len).sum()
    }

    fn parse(&self, slice: &EndpointSlice, problems: &mut Vec<String>) -> Vec<Candidate> {
        parse_slice(slice, &self.port).unwrap_or_else(|problem| {
            problems.push(problem);
            Vec::new()
        })
    }

    fn handle(&mut self, event: Event<EndpointSlice>) -> Outcome {
        let mut outcome = Outcome::default();
        match event {
            Event::Init => {
                debug!(source = SOURCE, "listing EndpointSlices");
                self.pending = Some(BTreeMap::new());
            }
            Event::InitApply(slice) => {
                let candidates = self.parse(&slice, &mut outcome.problems);
                self.pending
                    .get_or_insert_with(BTreeMap::new)
                    .insert(slice.name_any(), candidates);
            }
            Event::InitDone => {
                // Slices that were not re-listed are gone (deleted while the watch was down).
                self.slices = self.pending.take().unwrap_or_default();
                self.synced = true;
                outcome.listed = true;
                outcome.set = Some(self.union());
            }
            Event::Apply(slice) => {
                let candidates = self.parse(&slice, &mut outcome.problems);
                debug!(source = SOURCE, slice = %slice.name_any(), endpoints = candidates.len(), "EndpointSlice changed");
                self.slices.insert(slice.name_any(), candidates);
                outcome.set = self.synced.then(|| self.union());
            }
            Event::Delete(slice) => {
                debug!(source = SOURCE, slice = %slice.name_any(), "EndpointSlice deleted");
                self.slices.remove(&slice.name_any());
                outcome.set = self.synced.then(|| self.union());
            }
        }
        outcome
    }

    /// Every endpoint of every slice, merged by identity.
    fn union(&self) -> Vec<EndpointSpec> {
        let mut by_identity: BTreeMap<&str, Vec<&Candidate>> = BTreeMap::new();
        for candidate in self.slices.values().flatten() {
            by_identity
                .entry(candidate.identity.as_str())
                .or_default()
                .push(candidate);
        }
        let mut specs = Vec::with_capacity(by_identity.len());
        for candidates in by_identity.into_values() {
            let Some(chosen) = candidates
                .iter()
                .filter(|c| c.condition != Condition::NotServing)
                .min_by_key(|c| c.family)
            else {
                continue; // Serving nowhere: not a backend.
            };
            let state = match candidates.iter().map(|c| c.condition).max() {
                Some(Condition::Ready) => EndpointState::Ready,
                _ => EndpointState::Draining,
            };
            let mut address = BackendAddress::tcp(chosen.host.clone(), chosen.port);
            address.tls = self
                .tls
                .as_ref()
                .map(|t| t.for_endpoint(chosen.pod.as_deref(), &chosen.host));
            specs.push(EndpointSpec {
                identity: chosen.identity.clone(),
                address,
                state,
                zone: chosen.zone.clone(),
                node: chosen.node.clone(),
            });
        }
        specs
    }
}

/// The backends a Service's slices describe, as a complete list followed by every slice applied
/// again and then deleted one by one: the watcher's whole path over untrusted API objects
/// (the fuzz target `endpoint_slices`). `port` is `--kubernetes-port` (or empty for the first).
pub(crate) fn backends_from_slices(port: &str, slices: Vec<EndpointSlice>) -> Vec<EndpointSpec> {
    let port = if port.is_empty() {
        PortSelector::First
    } else {
        port.parse().unwrap_or(PortSelector::First)
    };
    let mut set = SliceSet::new(port, None);
    set.handle(Event::Init);
    for slice in &slices {
        set.handle(Event::InitApply(slice.clone()));
    }
    let listed = set.handle(Event::InitDone).set.unwrap_or_default();
    for slice in slices {
        set.handle(Event::Apply(slice.clone()));
        set.handle(Event::Delete(slice));
    }
    listed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(value: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(value).expect("valid EndpointSlice")
    }

    fn endpoint(
        pod: &str,
        ip: &str,
        ready: bool,
        serving: bool,
        terminating: bool,
    ) -> serde_json::Value {
        json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "ns"},
            "nodeName": "node-a",
            "zone": "zone-1"
        })
    }

    fn v4(name: &str, endpoints: Vec<serde_json::Value>) -> EndpointSlice {
        slice(json!({
            "metadata": {"name": name, "resourceVersion": "1"},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "grpc", "port": 1234, "protocol": "TCP"}, {"name": "debug", "port": 6060}]
        }))
    }

    fn summary(specs: &[EndpointSpec]) -> Vec<String> {
        specs
            .iter()
            .map(|s| format!("{} {} {:?}", s.identity, s.address, s.state))
            .collect()
    }

    #[test]
    fn conditions_map_to_states() {
        let c = |ready, serving, terminating| {
            condition(Some(&EndpointConditions {
                ready,
                serving,
                terminating,
            }))
        };
        assert_eq!(condition(None), Condition::Ready);
        assert_eq!(c(Some(true), Some(true), Some(false)), Condition::Ready);
        assert_eq!(
            c(Some(false), Some(true), Some(true)),
            Condition::Draining,
            "terminating, still serving"
        );
        assert_eq!(
            c(Some(false), Some(false), Some(true)),
            Condition::Draining,
            "terminating"
        );
        assert_eq!(
            c(Some(true), Some(true), Some(true)),
            Condition::Draining,
            "publishNotReadyAddresses, terminating"
        );
        assert_eq!(
            c(Some(false), Some(true), None),
            Condition::Draining,
            "not ready but serving"
        );
        assert_eq!(
            c(Some(false), Some(false), Some(false)),
            Condition::NotServing
        );
        assert_eq!(
            c(Some(false), None, None),
            Condition::NotServing,
            "serving unset follows ready"
        );
        assert_eq!(
            c(Some(true), Some(false), Some(false)),
            Condition::NotServing,
            "publishNotReadyAddresses, not ready"
        );
    }

    #[test]
    fn ports_resolve_by_name_number_or_first() {
        let s = v4("s1", vec![endpoint("bk-0", "10.0.0.1", true, true, false)]);
        let port = |sel: PortSelector| parse_slice(&s, &sel).map(|c| c[0].port);
        assert_eq!(port(PortSelector::First), Ok(1234));
        assert_eq!(port(PortSelector::Name("debug".into())), Ok(6060));
        assert_eq!(port(PortSelector::Number(4321)), Ok(4321));
        let err = port(PortSelector::Name("nope".into())).unwrap_err();
        assert!(err.contains("grpc=1234, debug=6060"), "{err}");
        assert_eq!(
            "grpc".parse::<PortSelector>(),
            Ok(PortSelector::Name("grpc".into()))
        );
        assert_eq!(
            "1234".parse::<PortSelector>(),
            Ok(PortSelector::Number(1234))
        );
        assert!("0".parse::<PortSelector>().is_err());
        assert!("99999".parse::<PortSelector>().is_err());
        assert!("Grpc".parse::<PortSelector>().is_err());
    }

    #[test]
    fn endpoints_without_a_pod_are_identified_by_address() {
        let s = slice(json!({
            "metadata": {"name": "s6"},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00::7"]}],
            "ports": [{"port": 1234}]
        }));
        let c = parse_slice(&s, &PortSelector::First).unwrap();
        assert_eq!(c[0].identity, "[fd00::7]:1234");
        assert_eq!(c[0].condition, Condition::Ready);
    }

    #[test]
    fn nothing_is_reported_before_the_first_complete_list() {
        let mut set = SliceSet::new(PortSelector::First, None);
        assert!(set.handle(Event::Init).set.is_none());
        let s = v4("s1", vec![endpoint("bk-0", "10.0.0.1", true, true, false)]);
        assert!(set.handle(Event::InitApply(s)).set.is_none());
        let outcome = set.handle(Event::InitDone);
        assert!(outcome.listed);
        assert_eq!(
            summary(&outcome.set.unwrap()),
            ["bk-0 tcp://10.0.0.1:1234 Ready"]
        );
    }

    #[test]
    fn empty_first_list_is_reported() {
        let mut set = SliceSet::new(PortSelector::First, None);
        set.handle(Event::Init);
        assert_eq!(set.handle(Event::InitDone).set.map(|s| s.len()), Some(0));
    }

    #[test]
    fn relist_replaces_the_set_and_drops_unlisted_slices() {
        let mut set = SliceSet::new(PortSelector::First, None);
        set.handle(Event::Init);
        set.handle(Event::InitApply(v4(
            "s1",
            vec![endpoint("bk-0", "10.0.0.1", true, true, false)],
        )));
        set.handle(Event::InitApply(v4(
            "s2",
            vec![endpoint("bk-1", "10.0.0.2", true, true, false)],
        )));
        set.handle(Event::InitDone);
        // Re-list after a 410: s1 is gone, s2 changed. Until InitDone the old set holds.
        set.handle(Event::Init);
        set.handle(Event::InitApply(v4(
            "s2",
            vec![endpoint("bk-1", "10.0.0.2", false, true, true)],
        )));
        assert_eq!(set.endpoint_count(), 2, "old set kept during the re-list");
        let outcome = set.handle(Event::InitDone);
        assert_eq!(
            summary(&outcome.set.unwrap()),
            ["bk-1 tcp://10.0.0.2:1234 Draining"]
        );
    }

    #[test]
    fn dual_stack_slices_merge_by_pod_preferring_ipv4_and_caution() {
        let mut set = SliceSet::new(PortSelector::Name("grpc".into()), None);
        let v6 = |endpoints| {
            slice(json!({
                "metadata": {"name": "a-v6"},
                "addressType": "IPv6",
                "endpoints": endpoints,
                "ports": [{"name": "grpc", "port": 1234}]
            }))
        };
        set.handle(Event::Init);
        set.handle(Event::InitApply(v6(vec![
            endpoint("bk-0", "fd00::1", true, true, false),
            endpoint("bk-1", "fd00::2", true, true, false),
            endpoint("bk-2", "fd00::3", false, false, false),
        ])));
        set.handle(Event::InitApply(v4(
            "z-v4",
            vec![
                endpoint("bk-0", "10.0.0.1", true, true, false),
                endpoint("bk-1", "10.0.0.2", false, true, true),
            ],
        )));
        let specs = set.handle(Event::InitDone).set.unwrap();
        assert_eq!(
            summary(&specs),
            [
                "bk-0 tcp://10.0.0.1:1234 Ready",
                "bk-1 tcp://10.0.0.2:1234 Draining",
            ],
            "bk-2 serves nowhere"
        );
        assert_eq!(specs[0].zone.as_deref(), Some("zone-1"));
        assert_eq!(specs[0].node.as_deref(), Some("node-a"));
        // The IPv4 slice goes away: the IPv6 address takes over.
        let specs = set.handle(Event::Delete(v4("z-v4", vec![]))).set.unwrap();
        assert_eq!(
            summary(&specs),
            [
                "bk-0 tcp://[fd00::1]:1234 Ready",
                "bk-1 tcp://[fd00::2]:1234 Ready"
            ]
        );
    }

    #[test]
    fn an_unusable_slice_is_reported_and_skipped() {
        let mut set = SliceSet::new(PortSelector::Name("grpc".into()), None);
        set.handle(Event::Init);
        set.handle(Event::InitDone);
        let bad = slice(json!({
            "metadata": {"name": "bad"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.9"]}],
            "ports": [{"name": "other", "port": 1}]
        }));
        let outcome = set.handle(Event::Apply(bad));
        assert_eq!(outcome.problems.len(), 1);
        assert_eq!(outcome.set.map(|s| s.len()), Some(0));
    }
}
