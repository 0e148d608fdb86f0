//! The EndpointSlice watcher against a mock Kubernetes API server on 127.0.0.1 that speaks the
//! real list+watch protocol: a list with `metadata.resourceVersion`, then
//! `?watch=true&resourceVersion=N&allowWatchBookmarks=true` streaming newline-delimited JSON
//! events (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR), 410 Gone for a too old resourceVersion,
//! label selectors. The real `Pool` follows every step; each wait is on an event, never a sleep.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildkit_router::discovery::{self, DiscoveryMetrics, KubernetesSource, PortSelector, Source};
use buildkit_router::pool::{Backend, Pool, PoolSettings};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices";
const SELECTOR: &str = "kubernetes.io/service-name=buildkitd";
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The mock API server.

/// A request the mock answered.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    List,
    Watch {
        rv: u64,
    },
    /// Answered 500 (the mock was told to fail).
    Failed,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// A watch from an older resourceVersion gets 410 Gone.
    compacted: u64,
    slices: BTreeMap<String, Value>,
    /// Every change, for watches that resume from a resourceVersion.
    log: Vec<(u64, &'static str, Value)>,
    /// Live watch streams and their label selectors.
    watchers: Vec<(Option<String>, mpsc::UnboundedSender<Bytes>)>,
    failing: bool,
}

struct MockApi {
    store: Mutex<Store>,
    seen: watch::Sender<Vec<Seen>>,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut text = serde_json::to_string(&json!({"type": kind, "object": object})).unwrap();
    text.push('\n');
    Bytes::from(text)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn matches(selector: &Option<String>, object: &Value) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').all(|term| {
        let (key, value) = term.split_once('=').expect("key=value selector");
        object["metadata"]["labels"][key].as_str() == Some(value)
    })
}

/// Decodes `a=b&c=d` with percent-escapes.
fn query(uri: &hyper::Uri) -> HashMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    };
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed())
        .unwrap()
}

impl MockApi {
    /// Starts the server; returns it and its URL.
    async fn start() -> (Arc<Self>, String) {
        let mock = Arc::new(Self {
            store: Mutex::new(Store {
                rv: 100,
                ..Default::default()
            }),
            seen: watch::Sender::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = mock.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let mock = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let mock = mock.clone();
                        async move { Ok::<_, Infallible>(mock.handle(req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (mock, url)
    }

    fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path() != PATH {
            return json_response(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
        let params = query(req.uri());
        let selector = params.get("labelSelector").cloned();
        assert_eq!(
            selector.as_deref(),
            Some(SELECTOR),
            "the watcher selects the Service's slices"
        );
        let mut store = self.store.lock().unwrap();
        if store.failing {
            self.seen.send_modify(|s| s.push(Seen::Failed));
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status(500, "InternalError", "etcdserver: request timed out"),
            );
        }
        if params.get("watch").map(String::as_str) == Some("true") {
            assert_eq!(
                params.get("allowWatchBookmarks").map(String::as_str),
                Some("true")
            );
            let rv: u64 = params["resourceVersion"]
                .parse()
                .expect("numeric resourceVersion");
            self.seen.send_modify(|s| s.push(Seen::Watch { rv }));
            let (tx, rx) = mpsc::unbounded_channel();
            if rv < store.compacted {
                // What the apiserver does: 200, then an ERROR event with a 410 Status.
                let message = format!("too old resource version: {rv} ({})", store.compacted);
                let _ = tx.send(line("ERROR", &status(410, "Expired", &message)));
            } else {
                for (event_rv, kind, object) in &store.log {
                    if *event_rv > rv && matches(&selector, object) {
                        let _ = tx.send(line(kind, object));
                    }
                }
                store.watchers.push((selector, tx));
            }
            let frames =
                UnboundedReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
            return Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(frames).boxed())
                .unwrap();
        }
        self.seen.send_modify(|s| s.push(Seen::List));
        let items: Vec<Value> = store
            .slices
            .values()
            .filter(|o| matches(&selector, o))
            .map(|o| {
                // List items carry no apiVersion/kind, as from the real apiserver.
                let mut o = o.clone();
                let map = o.as_object_mut().unwrap();
                map.remove("apiVersion");
                map.remove("kind");
                o
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                    "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
        )
    }

    fn broadcast(store: &mut Store, kind: &str, object: &Value) {
        store.watchers.retain(|(selector, tx)| {
            !matches(selector, object) || tx.send(line(kind, object)).is_ok()
        });
    }

    /// Creates or replaces a slice. `notify: false` changes it without telling live watches
    /// (an event the client missed).
    fn put(&self, mut slice: Value, notify: bool) {
        let mut store = self.store.lock().unwrap();
        store.rv += 1;
        slice["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        let name = slice["metadata"]["name"].as_str().unwrap().to_string();
        let kind = if store.slices.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.slices.insert(name, slice.clone());
        let rv = store.rv;
        store.log.push((rv, kind, slice.clone()));
        if notify {
            Self::broadcast(&mut store, kind, &slice);
        }
    }

    fn apply(&self, slice: Value) {
        self.put(slice, true);
    }

    fn delete(&self, name: &str, notify: bool) {
        let mut store = self.store.lock().unwrap();
        store.rv += 1;
        let mut slice = store.slices.remove(name).expect("slice exists");
        slice["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        let rv = store.rv;
        store.log.push((rv, "DELETED", slice.clone()));
        if notify {
            Self::broadcast(&mut store, "DELETED", &slice);
        }
    }

    /// Ends every watch stream cleanly (what an apiserver restart or load balancer does).
    fn drop_watches(&self) {
        self.store.lock().unwrap().watchers.clear();
    }

    /// Forgets history up to now: a watch from an older resourceVersion gets 410.
    fn compact(&self) {
        let mut store = self.store.lock().unwrap();
        store.compacted = store.rv;
    }

    /// Compacts, and tells every live watch `ERROR 410 Gone`, as an apiserver does when a watcher
    /// falls too far behind.
    fn expire_watches(&self) {
        let mut store = self.store.lock().unwrap();
        store.compacted = store.rv;
        let gone = line("ERROR", &status(410, "Expired", "too old resource version"));
        for (_, tx) in store.watchers.drain(..) {
            let _ = tx.send(gone.clone());
        }
    }

    /// Sends a BOOKMARK at the current resourceVersion to every live watch.
    fn bookmark(&self) -> u64 {
        let store = self.store.lock().unwrap();
        let bookmark = json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                              "metadata": {"resourceVersion": store.rv.to_string()}});
        for (_, tx) in &store.watchers {
            let _ = tx.send(line("BOOKMARK", &bookmark));
        }
        store.rv
    }

    fn set_failing(&self, failing: bool) {
        self.store.lock().unwrap().failing = failing;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.borrow().clone()
    }

    fn count(&self, what: fn(&Seen) -> bool) -> usize {
        self.seen().iter().filter(|s| what(s)).count()
    }

    /// Waits until the requests answered so far satisfy `done`.
    async fn wait_seen(&self, what: &str, done: impl Fn(&[Seen]) -> bool) {
        let mut rx = self.seen.subscribe();
        if tokio::time::timeout(WAIT, rx.wait_for(|seen| done(seen)))
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}; requests: {:?}", self.seen());
        }
    }
}

fn is_list(s: &Seen) -> bool {
    *s == Seen::List
}
fn is_watch(s: &Seen) -> bool {
    matches!(s, Seen::Watch { .. })
}
fn is_failed(s: &Seen) -> bool {
    *s == Seen::Failed
}

// ---------------------------------------------------------------------------------------------
// EndpointSlice objects.

fn endpoint(pod: &str, ip: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "targetRef": {"kind": "Pod", "name": pod, "namespace": "ns", "uid": format!("uid-{pod}")},
        "nodeName": format!("node-of-{pod}"),
        "zone": "zone-a"
    })
}

fn ready(pod: &str, ip: &str) -> Value {
    endpoint(pod, ip, true, true, false)
}

fn slice(name: &str, service: &str, address_type: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": "debug", "port": 6060, "protocol": "TCP"}, {"name": "grpc", "port": 1234, "protocol": "TCP"}]
    })
}

fn v4(name: &str, endpoints: Vec<Value>) -> Value {
    slice(name, "buildkitd", "IPv4", endpoints)
}

// ---------------------------------------------------------------------------------------------
// The router side: discovery feeding the real pool.

struct Harness {
    pool: Arc<Pool>,
    changes: watch::Receiver<u64>,
    metrics: DiscoveryMetrics,
}

impl Harness {
    async fn start(url: &str) -> Self {
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let metrics = DiscoveryMetrics::new();
        let (tx, mut rx) = mpsc::channel(16);
        let source = KubernetesSource {
            client,
            namespace: "ns".into(),
            service: "buildkitd".into(),
            port: PortSelector::Name("grpc".into()),
            tls: None,
        };
        discovery::spawn(vec![Source::Kubernetes(source)], tx, metrics.clone()).unwrap();
        let pool = Pool::new(PoolSettings::default());
        let (changed, changes) = watch::channel(0u64);
        let applier = pool.clone();
        tokio::spawn(async move {
            while let Some(update) = rx.recv().await {
                applier.apply(update);
                changed.send_modify(|n| *n += 1);
            }
        });
        Self {
            pool,
            changes,
            metrics,
        }
    }

    /// `identity=state@address zone node`, sorted.
    fn backends(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .pool
            .snapshot()
            .backends
            .iter()
            .map(|b| format!("{}={}@{}", b.identity(), b.state().as_str(), b.address()))
            .collect();
        out.sort();
        out
    }

    /// Waits until the pool holds exactly `expected`.
    async fn wait_for(&mut self, expected: &[&str]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.backends() == expected {
                return;
            }
            if tokio::time::timeout_at(deadline, self.changes.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out waiting for backends {expected:?}; the pool has {:?}",
                    self.backends()
                );
            }
        }
    }

    fn backend(&self, identity: &str) -> Arc<Backend> {
        self.pool
            .snapshot()
            .get(identity)
            .cloned()
            .expect("backend present")
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn pool_follows_add_readiness_terminating_and_delete() {
    let (mock, url) = MockApi::start().await;
    mock.apply(v4("buildkitd-abc", vec![ready("buildkitd-0", "10.0.0.1")]));
    // Another Service's slice in the same namespace is not ours.
    mock.apply(slice(
        "other-xyz",
        "other",
        "IPv4",
        vec![ready("other-0", "10.0.9.9")],
    ));

    let mut h = Harness::start(&url).await;
    assert!(!h.pool.is_synced());
    h.wait_for(&["buildkitd-0=ready@tcp://10.0.0.1:1234"]).await;
    assert!(h.pool.is_synced(), "synced after the first complete list");
    let first = h.backend("buildkitd-0");
    assert_eq!(first.zone(), Some("zone-a"));
    assert_eq!(first.node(), Some("node-of-buildkitd-0"));

    // Scale up: a second pod becomes ready.
    mock.apply(v4(
        "buildkitd-abc",
        vec![
            ready("buildkitd-0", "10.0.0.1"),
            ready("buildkitd-1", "10.0.0.2"),
        ],
    ));
    h.wait_for(&[
        "buildkitd-0=ready@tcp://10.0.0.1:1234",
        "buildkitd-1=ready@tcp://10.0.0.2:1234",
    ])
    .await;

    // A second slice (the controller splits large Services) adds a third pod.
    mock.apply(v4("buildkitd-def", vec![ready("buildkitd-2", "10.0.0.3")]));
    h.wait_for(&[
        "buildkitd-0=ready@tcp://10.0.0.1:1234",
        "buildkitd-1=ready@tcp://10.0.0.2:1234",
        "buildkitd-2=ready@tcp://10.0.0.3:1234",
    ])
    .await;

    // Readiness flip: not ready but still serving → draining.
    mock.apply(v4(
        "buildkitd-abc",
        vec![
            ready("buildkitd-0", "10.0.0.1"),
            endpoint("buildkitd-1", "10.0.0.2", false, true, false),
        ],
    ));
    h.wait_for(&[
        "buildkitd-0=ready@tcp://10.0.0.1:1234",
        "buildkitd-1=draining@tcp://10.0.0.2:1234",
        "buildkitd-2=ready@tcp://10.0.0.3:1234",
    ])
    .await;
    // Not serving at all → no longer a backend; ready again → back.
    mock.apply(v4(
        "buildkitd-abc",
        vec![
            ready("buildkitd-0", "10.0.0.1"),
            endpoint("buildkitd-1", "10.0.0.2", false, false, false),
        ],
    ));
    h.wait_for(&[
        "buildkitd-0=ready@tcp://10.0.0.1:1234",
        "buildkitd-2=ready@tcp://10.0.0.3:1234",
    ])
    .await;
    mock.apply(v4(
        "buildkitd-abc",
        vec![
            ready("buildkitd-0", "10.0.0.1"),
            ready("buildkitd-1", "10.0.0.2"),
        ],
    ));
    h.wait_for(&[
        "buildkitd-0=ready@tcp://10.0.0.1:1234",
        "buildkitd-1=ready@tcp://10.0.0.2:1234",
        "buildkitd-2=ready@tcp://10.0.0.3:1234",
    ])
    .await;

    // Scale down: buildkitd-0 is terminating (still serving its builds) → draining, the same
    // backend object (its running builds keep their connection and count).
    let build = first.start_build();
    mock.apply(v4(
        "buildkitd-abc",
        vec![
            endpoint("buildkitd-0", "10.0.0.1", false, true, true),
            ready("buildkitd-1", "10.0.0.2"),
        ],
    ));
    h.wait_for(&[
        "buildkitd-0=draining@tcp://10.0.0.1:1234",
        "buildkitd-1=ready@tcp://10.0.0.2:1234",
        "buildkitd-2=ready@tcp://10.0.0.3:1234",
    ])
    .await;
    assert!(Arc::ptr_eq(&first, &h.backend("buildkitd-0")));
    assert_eq!(first.active_builds(), 1);

    // The pod is gone from the slice; then a whole slice is deleted.
    mock.apply(v4("buildkitd-abc", vec![ready("buildkitd-1", "10.0.0.2")]));
    h.wait_for(&[
        "buildkitd-1=ready@tcp://10.0.0.2:1234",
        "buildkitd-2=ready@tcp://10.0.0.3:1234",
    ])
    .await;
    assert_eq!(first.state().as_str(), "gone");
    assert_eq!(
        build.backend().active_builds(),
        1,
        "a removed backend still counts its running build"
    );
    drop(build);
    mock.delete("buildkitd-def", true);
    h.wait_for(&["buildkitd-1=ready@tcp://10.0.0.2:1234"]).await;
    mock.delete("buildkitd-abc", true);
    h.wait_for(&[]).await;

    assert_eq!(
        mock.count(is_list),
        1,
        "one list, then one watch throughout: {:?}",
        mock.seen()
    );
    assert_eq!(mock.count(is_watch), 1);
    assert_eq!(h.metrics.updates_count("kubernetes", "reset"), 1);
    assert_eq!(h.metrics.updates_count("kubernetes", "add"), 3);
    assert_eq!(h.metrics.updates_count("kubernetes", "remove"), 4);
    assert_eq!(h.metrics.updates_count("kubernetes", "update"), 2);
    assert_eq!(h.metrics.errors_count("kubernetes"), 0);
}

#[tokio::test]
async fn dual_stack_slices_give_one_backend_per_pod() {
    let (mock, url) = MockApi::start().await;
    mock.apply(slice(
        "buildkitd-v6",
        "buildkitd",
        "IPv6",
        vec![ready("buildkitd-0", "fd00::1")],
    ));
    let mut h = Harness::start(&url).await;
    h.wait_for(&["buildkitd-0=ready@tcp://[fd00::1]:1234"])
        .await;
    // The IPv4 slice appears: same pod, IPv4 address preferred.
    mock.apply(v4("buildkitd-v4", vec![ready("buildkitd-0", "10.0.0.1")]));
    h.wait_for(&["buildkitd-0=ready@tcp://10.0.0.1:1234"]).await;
    // One family's slice already says terminating: the pod drains.
    mock.apply(slice(
        "buildkitd-v6",
        "buildkitd",
        "IPv6",
        vec![endpoint("buildkitd-0", "fd00::1", false, true, true)],
    ));
    h.wait_for(&["buildkitd-0=draining@tcp://10.0.0.1:1234"])
        .await;
}

#[tokio::test]
async fn a_dropped_or_failing_watch_keeps_the_set_and_resumes() {
    let (mock, url) = MockApi::start().await;
    mock.apply(v4("buildkitd-abc", vec![ready("buildkitd-0", "10.0.0.1")]));
    let mut h = Harness::start(&url).await;
    h.wait_for(&["buildkitd-0=ready@tcp://10.0.0.1:1234"]).await;
    mock.wait_seen("the first watch", |s| s.iter().any(is_watch))
        .await;

    // The watch connection ends: the watcher re-watches from its resourceVersion, no re-list.
    mock.drop_watches();
    mock.wait_seen("a second watch", |s| {
        s.iter().filter(|s| is_watch(s)).count() == 2
    })
    .await;
    assert_eq!(mock.count(is_list), 1);
    assert_eq!(h.backends(), ["buildkitd-0=ready@tcp://10.0.0.1:1234"]);
    mock.apply(v4(
        "buildkitd-abc",
        vec![
            ready("buildkitd-0", "10.0.0.1"),
            ready("buildkitd-1", "10.0.0.2"),
        ],
    ));
    h.wait_for(&[
        "buildkitd-0=ready@tcp://10.0.0.1:1234",
        "buildkitd-1=ready@tcp://10.0.0.2:1234",
    ])
    .await;

    // The API server fails (500) and the watch is gone: the set is kept while the watcher
    // retries with backoff; every failure is counted. A second failed request means the first
    // error went through the source (the watcher only retries after yielding it).
    mock.set_failing(true);
    mock.drop_watches();
    mock.wait_seen("two failed requests", |s| {
        s.iter().filter(|s| is_failed(s)).count() >= 2
    })
    .await;
    assert!(h.metrics.errors_count("kubernetes") >= 1);
    assert_eq!(
        h.backends(),
        [
            "buildkitd-0=ready@tcp://10.0.0.1:1234",
            "buildkitd-1=ready@tcp://10.0.0.2:1234"
        ],
        "the last known set is kept while the API server fails"
    );
    // A change happens while the router cannot see it…
    mock.put(
        v4(
            "buildkitd-ghi",
            vec![
                ready("buildkitd-1", "10.0.0.2"),
                ready("buildkitd-2", "10.0.0.3"),
            ],
        ),
        false,
    );
    mock.delete("buildkitd-abc", false);
    // …and arrives when the watch resumes from the last resourceVersion it saw.
    mock.set_failing(false);
    h.wait_for(&[
        "buildkitd-1=ready@tcp://10.0.0.2:1234",
        "buildkitd-2=ready@tcp://10.0.0.3:1234",
    ])
    .await;
    assert_eq!(
        mock.count(is_list),
        1,
        "resumed without a re-list: {:?}",
        mock.seen()
    );
    assert_eq!(h.metrics.updates_count("kubernetes", "reset"), 1);
}

#[tokio::test]
async fn gone_forces_a_relist_that_replaces_the_set() {
    let (mock, url) = MockApi::start().await;
    mock.apply(v4("buildkitd-abc", vec![ready("buildkitd-0", "10.0.0.1")]));
    mock.apply(v4("buildkitd-def", vec![ready("buildkitd-1", "10.0.0.2")]));
    let mut h = Harness::start(&url).await;
    h.wait_for(&[
        "buildkitd-0=ready@tcp://10.0.0.1:1234",
        "buildkitd-1=ready@tcp://10.0.0.2:1234",
    ])
    .await;
    mock.wait_seen("the first watch", |s| s.iter().any(is_watch))
        .await;

    // Changes the watch never delivers, then ERROR 410 on the live watch: the watcher must
    // re-list, and the re-list's full set replaces the old one (buildkitd-0's slice is gone).
    mock.delete("buildkitd-abc", false);
    mock.put(
        v4(
            "buildkitd-def",
            vec![
                endpoint("buildkitd-1", "10.0.0.2", false, true, true),
                ready("buildkitd-2", "10.0.0.3"),
            ],
        ),
        false,
    );
    mock.expire_watches();
    h.wait_for(&[
        "buildkitd-1=draining@tcp://10.0.0.2:1234",
        "buildkitd-2=ready@tcp://10.0.0.3:1234",
    ])
    .await;
    assert_eq!(mock.count(is_list), 2, "{:?}", mock.seen());
    assert!(h.metrics.errors_count("kubernetes") >= 1);
    mock.wait_seen("a watch after the re-list", |s| {
        s.last().is_some_and(is_watch)
    })
    .await;

    // Watch resumed from a resourceVersion that was compacted meanwhile: the apiserver answers
    // the new watch with ERROR 410 and the watcher re-lists again.
    mock.delete("buildkitd-def", false);
    mock.put(
        v4("buildkitd-jkl", vec![ready("buildkitd-3", "10.0.0.4")]),
        false,
    );
    mock.compact();
    mock.drop_watches();
    h.wait_for(&["buildkitd-3=ready@tcp://10.0.0.4:1234"]).await;
    assert_eq!(mock.count(is_list), 3, "{:?}", mock.seen());
    assert_eq!(
        h.metrics.updates_count("kubernetes", "reset"),
        1,
        "re-lists become deltas, not resets"
    );
}

#[tokio::test]
async fn bookmarks_move_the_resume_point() {
    let (mock, url) = MockApi::start().await;
    mock.apply(v4("buildkitd-abc", vec![ready("buildkitd-0", "10.0.0.1")]));
    let mut h = Harness::start(&url).await;
    h.wait_for(&["buildkitd-0=ready@tcp://10.0.0.1:1234"]).await;
    mock.wait_seen("the first watch", |s| s.iter().any(is_watch))
        .await;

    // Other Services' slices move the resourceVersion; our watch sees only a BOOKMARK.
    mock.apply(slice(
        "other-xyz",
        "other",
        "IPv4",
        vec![ready("other-0", "10.0.9.9")],
    ));
    mock.apply(slice(
        "other-xyz",
        "other",
        "IPv4",
        vec![ready("other-1", "10.0.9.8")],
    ));
    let bookmarked = mock.bookmark();
    mock.compact();
    mock.drop_watches();
    // The re-watch starts at the bookmark, which is not compacted: no 410, no re-list.
    mock.wait_seen("the re-watch", |s| {
        s.iter().filter(|s| is_watch(s)).count() == 2
    })
    .await;
    assert_eq!(mock.seen().last(), Some(&Seen::Watch { rv: bookmarked }));
    mock.apply(v4("buildkitd-abc", vec![ready("buildkitd-1", "10.0.0.2")]));
    h.wait_for(&["buildkitd-1=ready@tcp://10.0.0.2:1234"]).await;
    assert_eq!(mock.count(is_list), 1);
    assert_eq!(h.metrics.errors_count("kubernetes"), 0);
}
