//! Renders every kustomize variant under `deploy/` with `kubectl kustomize` and checks the objects
//! fit together: least-privilege RBAC, ports/labels/selectors matching between the router, its
//! Services, the buildkitd StatefulSet and its headless Service, probes on real ports and paths,
//! autoscalers aimed at the StatefulSet with metric names the router exports, NetworkPolicy and
//! PDB selecting the right pods, and the mTLS variant mounting the Secrets its Certificates make.
//!
//! Needs `kubectl` (with its built-in kustomize) on PATH, or its path in `$KUBECTL`. Without it the
//! tests print why and pass vacuously, unless `$CI` is set, where a missing kubectl fails.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

/// Every metric the router exports (full names). The manifests, adapter rules, KEDA queries and
/// the Grafana dashboard may only use these (histograms also as `_bucket`/`_sum`/`_count`).
/// Keep in sync with src/metrics.rs; cross-check against a live router's /metrics.
const ROUTER_METRICS: &[(&str, MetricKind)] = &[
    ("buildkit_router_builds_active", MetricKind::Gauge),
    ("buildkit_router_builds_queued", MetricKind::Gauge),
    ("buildkit_router_queue_wait_seconds", MetricKind::Histogram),
    ("buildkit_router_builds_total", MetricKind::Counter),
    ("buildkit_router_builds_refused_total", MetricKind::Counter),
    (
        "buildkit_router_build_duration_seconds",
        MetricKind::Histogram,
    ),
    ("buildkit_router_placement_total", MetricKind::Counter),
    (
        "buildkit_router_affinity_key_source_total",
        MetricKind::Counter,
    ),
    ("buildkit_router_backends", MetricKind::Gauge),
    ("buildkit_router_backend_capacity", MetricKind::Gauge),
    ("buildkit_router_desired_backends", MetricKind::Gauge),
    (
        "buildkit_router_session_bind_seconds",
        MetricKind::Histogram,
    ),
    ("buildkit_router_sessions", MetricKind::Gauge),
    ("buildkit_router_sessions_placed_total", MetricKind::Counter),
    ("buildkit_router_requests_total", MetricKind::Counter),
    (
        "buildkit_router_discovery_updates_total",
        MetricKind::Counter,
    ),
    (
        "buildkit_router_discovery_errors_total",
        MetricKind::Counter,
    ),
    ("buildkit_router_connections_active", MetricKind::Gauge),
    ("buildkit_router_connections_total", MetricKind::Counter),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MetricKind {
    Gauge,
    Counter,
    Histogram,
}

/// Every long flag the router's command line really has (read from its clap definition).
fn router_flags() -> Vec<String> {
    use clap::CommandFactory;
    buildkit_router::config::Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

/// Overlays that must exist (more may; every directory under deploy/overlays is rendered).
const REQUIRED_OVERLAYS: &[&str] = &[
    "privileged",
    "mtls",
    "hpa",
    "keda",
    "keda-scale-to-zero",
    "monitoring",
];

/// Names an autoscaler may be given besides the router's own metrics: the demand the KEDA
/// scaler serves (and the prometheus-adapter rule that computes the same from Prometheus).
fn is_demand_metric(name: &str) -> bool {
    name == buildkit_router::scaler::METRIC_NAME
}

/// Files cert-manager writes into a Certificate's Secret.
const CERT_MANAGER_KEYS: &[&str] = &["tls.crt", "tls.key", "ca.crt"];

// ---------------------------------------------------------------------------------------------
// Rendering

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn kubectl() -> Option<PathBuf> {
    let candidate = std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("kubectl"));
    let works = Command::new(&candidate)
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    works.then_some(candidate)
}

/// One rendered variant: its name (e.g. `overlays/mtls`) and its objects.
struct Rendered {
    name: String,
    objects: Vec<Value>,
}

/// Renders base and every overlay once per test binary; `None` when kubectl is missing.
fn rendered() -> Option<&'static [Rendered]> {
    static RENDERED: OnceLock<Option<Vec<Rendered>>> = OnceLock::new();
    RENDERED
        .get_or_init(|| {
            let Some(kubectl) = kubectl() else {
                let message = "kubectl not found (install it or set $KUBECTL): \
                               deploy manifests NOT checked";
                if std::env::var_os("CI").is_some() {
                    panic!("{message}; CI must have kubectl");
                }
                eprintln!("SKIPPED: {message}");
                return None;
            };
            let mut variants = vec!["base".to_string()];
            let mut overlays: Vec<String> = std::fs::read_dir(deploy_dir().join("overlays"))
                .expect("deploy/overlays exists")
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("kustomization.yaml").is_file())
                .map(|e| format!("overlays/{}", e.file_name().to_string_lossy()))
                .collect();
            overlays.sort();
            for required in REQUIRED_OVERLAYS {
                assert!(
                    overlays.contains(&format!("overlays/{required}")),
                    "deploy/overlays/{required} is missing"
                );
            }
            variants.extend(overlays);
            // Render concurrently: each kubectl call is a separate process.
            let handles: Vec<_> = variants
                .into_iter()
                .map(|name| {
                    let kubectl = kubectl.clone();
                    std::thread::spawn(move || {
                        let dir = deploy_dir().join(&name);
                        let out = Command::new(&kubectl)
                            .arg("kustomize")
                            .arg(&dir)
                            .output()
                            .expect("run kubectl kustomize");
                        assert!(
                            out.status.success(),
                            "kubectl kustomize deploy/{name} failed:\n{}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        let text = String::from_utf8(out.stdout).expect("utf-8 output");
                        Rendered {
                            objects: parse_documents(&name, &text),
                            name,
                        }
                    })
                })
                .collect();
            Some(
                handles
                    .into_iter()
                    .map(|h| h.join().expect("render thread"))
                    .collect(),
            )
        })
        .as_deref()
}

fn parse_documents(name: &str, text: &str) -> Vec<Value> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document)
            .unwrap_or_else(|e| panic!("deploy/{name}: rendered YAML does not parse: {e}"));
        if !value.is_null() {
            objects.push(value);
        }
    }
    assert!(!objects.is_empty(), "deploy/{name} rendered nothing");
    objects
}

// ---------------------------------------------------------------------------------------------
// Small accessors

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}
fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}
fn namespace(o: &Value) -> &str {
    o["metadata"]["namespace"].as_str().unwrap_or_default()
}
fn of_kind<'a>(objects: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| kind(o) == k)
}
fn find<'a>(objects: &'a [Value], k: &str, ns: &str, n: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| kind(o) == k && namespace(o) == ns && name(o) == n)
}
fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
fn str_list(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}
/// `selector` (a label map) matches `labels` when every pair is present.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
/// A LabelSelector with matchLabels only (the manifests use no matchExpressions).
fn match_labels(selector: &Value, context: &str) -> BTreeMap<String, String> {
    assert!(
        selector.get("matchExpressions").is_none(),
        "{context}: use matchLabels only, so this test can check what it selects"
    );
    string_map(&selector["matchLabels"])
}
fn pod_labels(workload: &Value) -> BTreeMap<String, String> {
    string_map(&workload["spec"]["template"]["metadata"]["labels"])
}

/// `--flag value` / `--flag=value` pairs of a container's args (a flag with no value maps to "").
fn flags(args: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i];
        if let Some((flag, value)) = arg.split_once('=').filter(|_| arg.starts_with("--")) {
            out.entry(flag.to_string())
                .or_default()
                .push(value.to_string());
        } else if arg.starts_with("--") {
            let value = args.get(i + 1).filter(|v| !v.starts_with("--"));
            out.entry(arg.to_string())
                .or_default()
                .push(value.map(|v| v.to_string()).unwrap_or_default());
            if value.is_some() {
                i += 1;
            }
        }
        i += 1;
    }
    out
}
fn one_flag<'a>(flags: &'a BTreeMap<String, Vec<String>>, flag: &str, context: &str) -> &'a str {
    match flags.get(flag).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{context}: expected exactly one {flag}, found {other:?}"),
    }
}

/// Resolves a port reference (name or number) to a container port number.
fn container_port(container: &Value, port: &Value, context: &str) -> u64 {
    let ports = container["ports"].as_array().cloned().unwrap_or_default();
    let found = match port {
        Value::String(n) => ports
            .iter()
            .find(|p| p["name"].as_str() == Some(n.as_str())),
        Value::Number(n) => ports
            .iter()
            .find(|p| p["containerPort"].as_u64() == n.as_u64()),
        _ => None,
    };
    found
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| {
            panic!(
                "{context}: port {port} is not a port of container {}",
                container["name"]
            )
        })
}
/// `90s`, `10m`, `1h` or bare seconds, as the router's duration flags take them.
fn seconds(text: &str) -> u64 {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("bad duration {text:?}"));
    match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => panic!("unexpected duration unit in {text:?}"),
    }
}
fn port_of_addr(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

// ---------------------------------------------------------------------------------------------
// The pieces every variant has

struct Pool<'a> {
    router: &'a Value,
    router_container: &'a Value,
    router_flags: BTreeMap<String, Vec<String>>,
    router_labels: BTreeMap<String, String>,
    statefulset: &'a Value,
    buildkitd: &'a Value,
    buildkitd_labels: BTreeMap<String, String>,
    headless: &'a Value,
}

fn pool<'a>(r: &'a Rendered) -> Pool<'a> {
    let v = &r.name;
    let objects = &r.objects;
    let routers: Vec<(&Value, &Value)> = of_kind(objects, "Deployment")
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| {
                    str_list(&c["args"])
                        .iter()
                        .any(|a| a.starts_with("--kubernetes-service"))
                })
                .map(move |c| (d, c))
        })
        .collect();
    let [(router, router_container)] = routers[..] else {
        panic!(
            "{v}: expected one router Deployment container with --kubernetes-service, found {}",
            routers.len()
        );
    };
    let router_flags = flags(&str_list(&router_container["args"]));
    let router_labels = pod_labels(router);

    // --kubernetes-service ns/name names the real headless Service.
    let service_ref = one_flag(&router_flags, "--kubernetes-service", v);
    let (svc_ns, svc_name) = service_ref
        .split_once('/')
        .unwrap_or((namespace(router), service_ref));
    let headless = find(objects, "Service", svc_ns, svc_name).unwrap_or_else(|| {
        panic!("{v}: --kubernetes-service {service_ref} names no rendered Service")
    });
    let statefulsets: Vec<&Value> = of_kind(objects, "StatefulSet")
        .filter(|s| namespace(s) == svc_ns && s["spec"]["serviceName"].as_str() == Some(svc_name))
        .collect();
    let [statefulset] = statefulsets[..] else {
        panic!("{v}: expected one StatefulSet with serviceName {svc_name} in {svc_ns}");
    };
    let buildkitd = statefulset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "buildkitd"))
        .unwrap_or_else(|| {
            panic!(
                "{v}: StatefulSet {} has no buildkitd container",
                name(statefulset)
            )
        });
    let buildkitd_labels = pod_labels(statefulset);
    Pool {
        router,
        router_container,
        router_flags,
        router_labels,
        statefulset,
        buildkitd,
        buildkitd_labels,
        headless,
    }
}

fn each_variant(mut check: impl FnMut(&Rendered)) {
    let Some(variants) = rendered() else { return };
    for r in variants {
        check(r);
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_variant_renders_and_every_object_is_namespaced() {
    const CLUSTER_SCOPED: &[&str] = &[
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "APIService",
        "ClusterIssuer",
    ];
    each_variant(|r| {
        let mut seen = BTreeSet::new();
        for o in &r.objects {
            let id = format!("{}/{}/{}", kind(o), namespace(o), name(o));
            assert!(
                !name(o).is_empty(),
                "{}: an object without a name: {o}",
                r.name
            );
            assert!(seen.insert(id.clone()), "{}: {id} rendered twice", r.name);
            if !CLUSTER_SCOPED.contains(&kind(o)) {
                // Without a namespace `kubectl apply` would drop it wherever the context points.
                assert!(
                    !namespace(o).is_empty(),
                    "{}: {id} has no namespace",
                    r.name
                );
            }
        }
        let ns = of_kind(&r.objects, "Namespace")
            .map(name)
            .collect::<Vec<_>>();
        assert!(
            ns.contains(&"buildkit"),
            "{}: the buildkit Namespace is missing",
            r.name
        );
    });
}

#[test]
fn rbac_is_least_privilege() {
    each_variant(|r| {
        let v = &r.name;
        for k in ["ClusterRole", "ClusterRoleBinding"] {
            assert_eq!(of_kind(&r.objects, k).count(), 0, "{v}: no {k} allowed");
        }
        let p = pool(r);
        let sa = p.router["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}: the router needs its own ServiceAccount"));
        let ns = namespace(p.router);
        assert!(
            find(&r.objects, "ServiceAccount", ns, sa).is_some(),
            "{v}: ServiceAccount {sa} missing"
        );
        let bindings: Vec<&Value> = of_kind(&r.objects, "RoleBinding")
            .filter(|b| {
                b["subjects"].as_array().into_iter().flatten().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == sa
                        && s["namespace"].as_str() == Some(ns)
                })
            })
            .collect();
        assert_eq!(
            bindings.len(),
            1,
            "{v}: expected one RoleBinding for ServiceAccount {ns}/{sa}"
        );
        let binding = bindings[0];
        assert_eq!(
            namespace(binding),
            ns,
            "{v}: the RoleBinding must be in the router's namespace"
        );
        assert_eq!(
            binding["roleRef"]["kind"], "Role",
            "{v}: bind a Role, not a ClusterRole"
        );
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role = find(&r.objects, "Role", ns, role_name)
            .unwrap_or_else(|| panic!("{v}: RoleBinding points at missing Role {role_name}"));
        // The router watches the headless Service's slices, so the Role must be in its namespace.
        assert_eq!(
            namespace(role),
            namespace(p.headless),
            "{v}: Role not in the watched namespace"
        );
        let rules = role["rules"].as_array().expect("Role has rules");
        assert_eq!(rules.len(), 1, "{v}: the Role must have exactly one rule");
        let rule = &rules[0];
        assert_eq!(
            str_list(&rule["apiGroups"]),
            ["discovery.k8s.io"],
            "{v}: apiGroups"
        );
        assert_eq!(
            str_list(&rule["resources"]),
            ["endpointslices"],
            "{v}: resources"
        );
        let verbs: BTreeSet<&str> = str_list(&rule["verbs"]).into_iter().collect();
        assert_eq!(
            verbs,
            BTreeSet::from(["get", "list", "watch"]),
            "{v}: verbs"
        );
        assert!(
            rule.get("nonResourceURLs").is_none(),
            "{v}: no nonResourceURLs"
        );
        // Every Role in the variant is as narrow (no other Role grants anything else).
        for other in of_kind(&r.objects, "Role") {
            assert_eq!(
                other["rules"],
                role["rules"],
                "{v}: Role {} grants more",
                name(other)
            );
        }
    });
}

#[test]
fn router_discovery_flags_name_the_real_headless_service_and_port() {
    each_variant(|r| {
        let v = &r.name;
        let p = pool(r);
        let svc = &p.headless["spec"];
        assert_eq!(
            svc["clusterIP"], "None",
            "{v}: the buildkitd Service must be headless"
        );
        assert_eq!(
            svc["publishNotReadyAddresses"], false,
            "{v}: publishNotReadyAddresses must stay false"
        );
        assert!(
            selects(&string_map(&svc["selector"]), &p.buildkitd_labels),
            "{v}: headless Service selector does not select the StatefulSet pods"
        );
        let ss_selector = match_labels(&p.statefulset["spec"]["selector"], v);
        assert!(
            selects(&ss_selector, &p.buildkitd_labels),
            "{v}: StatefulSet selector vs template labels"
        );
        assert!(
            !selects(&ss_selector, &p.router_labels),
            "{v}: StatefulSet selector also matches router pods"
        );

        let port_ref = one_flag(&p.router_flags, "--kubernetes-port", v);
        let service_port = svc["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|sp| {
                sp["name"].as_str() == Some(port_ref)
                    || sp["port"].as_u64().map(|n| n.to_string()).as_deref() == Some(port_ref)
            })
            .unwrap_or_else(|| {
                panic!(
                    "{v}: --kubernetes-port {port_ref} is not a port of Service {}",
                    name(p.headless)
                )
            });
        assert!(
            port_ref.parse::<u16>().is_err(),
            "{v}: name the port (--kubernetes-port buildkit), EndpointSlice ports are looked up by name"
        );
        let target = service_port
            .get("targetPort")
            .unwrap_or(&service_port["port"]);
        let daemon_port = container_port(p.buildkitd, target, v);
        // buildkitd really listens there.
        let addrs = flags(&str_list(&p.buildkitd["args"]))
            .remove("--addr")
            .unwrap_or_default();
        assert!(
            addrs
                .iter()
                .any(|a| a.starts_with("tcp://") && port_of_addr(a) == daemon_port),
            "{v}: buildkitd has no --addr tcp://...:{daemon_port} ({addrs:?})"
        );
        assert!(
            addrs.iter().any(|a| a.starts_with("unix://")),
            "{v}: buildkitd needs a unix --addr for its in-pod buildctl probes ({addrs:?})"
        );
    });
}

#[test]
fn router_ports_labels_and_service_match() {
    each_variant(|r| {
        let v = &r.name;
        let p = pool(r);
        let selector = match_labels(&p.router["spec"]["selector"], v);
        assert!(
            selects(&selector, &p.router_labels),
            "{v}: router Deployment selector vs template labels"
        );
        assert!(
            !selects(&selector, &p.buildkitd_labels),
            "{v}: router selector also matches buildkitd pods"
        );
        assert!(
            p.router["spec"]["replicas"].as_u64().unwrap_or(1) >= 2,
            "{v}: run at least 2 router replicas"
        );

        let listen = port_of_addr(one_flag(&p.router_flags, "--listen", v));
        let admin = port_of_addr(one_flag(&p.router_flags, "--admin-listen", v));
        assert_eq!((listen, admin), (1234, 9180), "{v}: router listen ports");
        assert_eq!(
            container_port(p.router_container, &Value::from("grpc"), v),
            listen,
            "{v}: grpc containerPort"
        );
        assert_eq!(
            container_port(p.router_container, &Value::from("admin"), v),
            admin,
            "{v}: admin containerPort"
        );

        let services: Vec<&Value> = of_kind(&r.objects, "Service")
            .filter(|s| {
                namespace(s) == namespace(p.router)
                    && selects(&string_map(&s["spec"]["selector"]), &p.router_labels)
            })
            .collect();
        let service = services
            .iter()
            .find(|s| name(s) == "buildkit-router")
            .unwrap_or_else(|| panic!("{v}: no Service buildkit-router selecting the router pods"));
        let mut by_name = HashMap::new();
        for sp in service["spec"]["ports"].as_array().expect("Service ports") {
            let target = sp.get("targetPort").unwrap_or(&sp["port"]);
            let resolved = container_port(p.router_container, target, v);
            by_name.insert(
                sp["name"].as_str().unwrap_or_default().to_string(),
                (sp["port"].as_u64().unwrap_or(0), resolved),
            );
        }
        assert_eq!(
            by_name.get("grpc"),
            Some(&(1234, listen)),
            "{v}: Service port grpc"
        );
        assert_eq!(
            by_name.get("admin"),
            Some(&(9180, admin)),
            "{v}: Service port admin"
        );
        // No Service other than the headless one selects the builders (clients go via the router).
        for s in of_kind(&r.objects, "Service") {
            if selects(&string_map(&s["spec"]["selector"]), &p.buildkitd_labels) {
                assert_eq!(
                    name(s),
                    name(p.headless),
                    "{v}: Service {} exposes buildkitd directly",
                    name(s)
                );
            }
        }
        // Every flag the manifests pass is one the router really has.
        let known = router_flags();
        for flag in p.router_flags.keys() {
            assert!(known.contains(flag), "{v}: unknown router flag {flag}");
        }
    });
}

#[test]
fn probes_point_at_real_ports_and_admin_paths() {
    each_variant(|r| {
        let v = &r.name;
        let p = pool(r);
        let admin = port_of_addr(one_flag(&p.router_flags, "--admin-listen", v));
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &p.router_container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{v}: router {probe} path");
            assert_eq!(
                container_port(p.router_container, &get["port"], v),
                admin,
                "{v}: router {probe} port"
            );
            assert!(
                get.get("scheme").is_none() || get["scheme"] == "HTTP",
                "{v}: admin port is plain HTTP"
            );
        }
        let readiness = str_list(&p.buildkitd["readinessProbe"]["exec"]["command"]);
        assert_eq!(
            readiness,
            ["buildctl", "debug", "workers"],
            "{v}: buildkitd readiness probe"
        );
        // Grace: the router's --shutdown-grace must fit in its pod's termination grace, and
        // buildkitd's grace must be at least as long (builds outlive the router's drain).
        let grace = seconds(one_flag(&p.router_flags, "--shutdown-grace", v));
        let router_tgps = p.router["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        let bk_tgps = p.statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        assert!(
            router_tgps > grace,
            "{v}: router terminationGracePeriodSeconds {router_tgps} <= --shutdown-grace {grace}s"
        );
        assert!(
            bk_tgps >= router_tgps,
            "{v}: buildkitd grace {bk_tgps}s shorter than the router's {router_tgps}s"
        );
        assert!(
            p.buildkitd["lifecycle"]["preStop"]["exec"]["command"].is_array(),
            "{v}: buildkitd needs a preStop that waits for running builds"
        );
        // The router's security posture.
        let sc = &p.router_container["securityContext"];
        assert_eq!(
            sc["readOnlyRootFilesystem"], true,
            "{v}: router root fs read-only"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{v}: router privilege escalation"
        );
        let pod_sc = &p.router["spec"]["template"]["spec"]["securityContext"];
        assert!(
            pod_sc["runAsNonRoot"] == true || sc["runAsNonRoot"] == true,
            "{v}: router runs as non-root"
        );
        // A PVC per builder for the cache, mounted by buildkitd.
        let claims: Vec<&str> = p.statefulset["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(name)
            .collect();
        let mounts: Vec<&str> = p.buildkitd["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["name"].as_str())
            .collect();
        assert!(
            claims.iter().any(|c| mounts.contains(c)),
            "{v}: buildkitd mounts no volumeClaimTemplate ({claims:?})"
        );
    });
}

#[test]
fn network_policy_lets_only_the_router_reach_buildkitd() {
    each_variant(|r| {
        let v = &r.name;
        let p = pool(r);
        let ns = namespace(p.statefulset);
        let daemon_port_name = "buildkit";
        let daemon_port = container_port(p.buildkitd, &Value::from(daemon_port_name), v);
        let policies: Vec<&Value> = of_kind(&r.objects, "NetworkPolicy")
            .filter(|np| {
                namespace(np) == ns
                    && selects(
                        &match_labels(&np["spec"]["podSelector"], v),
                        &p.buildkitd_labels,
                    )
            })
            .collect();
        assert!(
            !policies.is_empty(),
            "{v}: no NetworkPolicy selects the buildkitd pods"
        );
        for np in policies {
            let spec = &np["spec"];
            assert!(
                str_list(&spec["policyTypes"]).contains(&"Ingress"),
                "{v}: {} must restrict Ingress",
                name(np)
            );
            assert!(
                !selects(&match_labels(&spec["podSelector"], v), &p.router_labels),
                "{v}: {} also selects the router",
                name(np)
            );
            for rule in spec["ingress"].as_array().into_iter().flatten() {
                let from = rule["from"].as_array().unwrap_or_else(|| {
                    panic!(
                        "{v}: {}: an ingress rule without `from` admits everyone",
                        name(np)
                    )
                });
                assert!(
                    !from.is_empty(),
                    "{v}: {}: empty `from` admits everyone",
                    name(np)
                );
                for peer in from {
                    assert!(
                        peer.get("namespaceSelector").is_none() && peer.get("ipBlock").is_none(),
                        "{v}: {}: peer {peer} is wider than the router pods",
                        name(np)
                    );
                    let sel = match_labels(&peer["podSelector"], v);
                    assert!(
                        selects(&sel, &p.router_labels),
                        "{v}: {}: peer {peer} does not select the router pods",
                        name(np)
                    );
                    assert!(
                        !selects(&sel, &p.buildkitd_labels),
                        "{v}: {}: peer selects buildkitd pods",
                        name(np)
                    );
                }
                let ports = rule["ports"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{v}: {}: rule must name the port", name(np)));
                for port in ports {
                    assert_eq!(
                        container_port(p.buildkitd, &port["port"], v),
                        daemon_port,
                        "{v}: {}: port",
                        name(np)
                    );
                }
            }
        }
        // The router's own policy admits its gRPC port and its admin port.
        let router_policy = of_kind(&r.objects, "NetworkPolicy")
            .find(|np| {
                selects(
                    &match_labels(&np["spec"]["podSelector"], v),
                    &p.router_labels,
                )
            })
            .unwrap_or_else(|| panic!("{v}: no NetworkPolicy for the router pods"));
        let admitted: BTreeSet<u64> = router_policy["spec"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default())
            .map(|port| container_port(p.router_container, &port["port"], v))
            .collect();
        assert_eq!(
            admitted,
            BTreeSet::from([1234, 9180]),
            "{v}: router NetworkPolicy ports"
        );
    });
}

#[test]
fn pdb_selects_buildkitd() {
    each_variant(|r| {
        let v = &r.name;
        let p = pool(r);
        let pdbs: Vec<&Value> = of_kind(&r.objects, "PodDisruptionBudget")
            .filter(|pdb| {
                namespace(pdb) == namespace(p.statefulset)
                    && selects(
                        &match_labels(&pdb["spec"]["selector"], v),
                        &p.buildkitd_labels,
                    )
            })
            .collect();
        assert_eq!(
            pdbs.len(),
            1,
            "{v}: expected one PodDisruptionBudget selecting buildkitd"
        );
        assert!(
            !selects(
                &match_labels(&pdbs[0]["spec"]["selector"], v),
                &p.router_labels
            ),
            "{v}: buildkitd PDB also selects router pods"
        );
        for pdb in of_kind(&r.objects, "PodDisruptionBudget") {
            let sel = match_labels(&pdb["spec"]["selector"], v);
            assert!(
                selects(&sel, &p.buildkitd_labels) || selects(&sel, &p.router_labels),
                "{v}: PDB {} selects nothing",
                name(pdb)
            );
        }
    });
}

/// Names of router metrics used in a PromQL-ish text, each checked against ROUTER_METRICS.
fn check_metric_names(text: &str, context: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let prefix = "buildkit_router_";
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let token = &tail[..end];
        rest = &tail[end..];
        let known = ROUTER_METRICS.iter().any(|(m, kind)| {
            token == *m
                || (*kind == MetricKind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| token.strip_suffix(s) == Some(m)))
        });
        assert!(
            known,
            "{context}: {token} is not a metric the router exports"
        );
        used.insert(token.to_string());
    }
    used
}

#[test]
fn autoscalers_target_the_statefulset_with_real_metrics() {
    let mut saw_hpa = false;
    let mut saw_keda = false;
    each_variant(|r| {
        let v = &r.name;
        let p = pool(r);
        let mut targeted = false;
        let check_target = |target: &Value, what: &str| {
            assert_eq!(
                target["kind"], "StatefulSet",
                "{v}: {what} must scale the StatefulSet"
            );
            assert_eq!(
                target["name"].as_str(),
                Some(name(p.statefulset)),
                "{v}: {what} target name"
            );
            assert_eq!(
                target["apiVersion"], "apps/v1",
                "{v}: {what} target apiVersion"
            );
        };
        for hpa in of_kind(&r.objects, "HorizontalPodAutoscaler") {
            let what = format!("HPA {}", name(hpa));
            assert_eq!(
                namespace(hpa),
                namespace(p.statefulset),
                "{v}: {what} namespace"
            );
            check_target(&hpa["spec"]["scaleTargetRef"], &what);
            let metrics = hpa["spec"]["metrics"].as_array().expect("HPA metrics");
            assert!(!metrics.is_empty(), "{v}: {what} has no metrics");
            for m in metrics {
                let t = m["type"].as_str().unwrap_or_default();
                let source = match t {
                    "External" => &m["external"],
                    "Pods" => &m["pods"],
                    "Object" => &m["object"],
                    other => {
                        panic!("{v}: {what}: metric type {other} does not use the router's metrics")
                    }
                };
                let metric = source["metric"]["name"].as_str().unwrap_or_default();
                assert!(
                    ROUTER_METRICS.iter().any(|(n, _)| *n == metric) || is_demand_metric(metric),
                    "{v}: {what}: {metric} is neither a router metric nor the demand metric"
                );
                if is_demand_metric(metric) {
                    let target = &source["target"];
                    assert_eq!(target["type"], "AverageValue", "{v}: {what}: demand target");
                    let per_builder: u64 = target["averageValue"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let flags = &p.router_flags;
                    let router_target: u64 = one_flag(flags, "--target-builds-per-backend", v)
                        .parse()
                        .expect("a number");
                    assert_eq!(
                        per_builder, router_target,
                        "{v}: {what}: builds per builder must equal --target-builds-per-backend"
                    );
                }
                // The metric must be served by a prometheus-adapter rule shipped alongside.
                let served = of_kind(&r.objects, "ConfigMap").any(|cm| {
                    string_map(&cm["data"]).values().any(|cfg| {
                        cfg.contains(&format!("as: \"{metric}\""))
                            || cfg.contains(&format!("as: {metric}"))
                    })
                });
                assert!(
                    served,
                    "{v}: {what}: no prometheus-adapter rule exposes {metric}"
                );
            }
            targeted = true;
            saw_hpa = true;
        }
        for so in of_kind(&r.objects, "ScaledObject") {
            let what = format!("ScaledObject {}", name(so));
            assert_eq!(
                namespace(so),
                namespace(p.statefulset),
                "{v}: {what} namespace"
            );
            check_target(&so["spec"]["scaleTargetRef"], &what);
            assert!(
                so["spec"]["minReplicaCount"].as_u64().is_some(),
                "{v}: {what}: set minReplicaCount explicitly"
            );
            let triggers = so["spec"]["triggers"].as_array().expect("triggers");
            let prom: Vec<&Value> = triggers
                .iter()
                .filter(|t| t["type"] == "prometheus")
                .collect();
            let push: Vec<&Value> = triggers
                .iter()
                .filter(|t| t["type"] == "external-push" || t["type"] == "external")
                .collect();
            assert!(
                !prom.is_empty() || !push.is_empty(),
                "{v}: {what}: neither a prometheus nor an external(-push) trigger"
            );
            for t in push {
                check_external_scaler_trigger(r, &p, t, &what);
            }
            if so["spec"]["minReplicaCount"].as_u64() == Some(0) {
                check_scale_to_zero(r, &p, so, &what);
            }
            for t in prom {
                let query = t["metadata"]["query"].as_str().unwrap_or_default();
                let used = check_metric_names(query, &format!("{v}: {what}"));
                for needed in [
                    "buildkit_router_builds_queued",
                    "buildkit_router_builds_active",
                ] {
                    assert!(
                        used.contains(needed),
                        "{v}: {what}: query must include {needed}: {query}"
                    );
                }
                let threshold: f64 = t["metadata"]["threshold"]
                    .as_str()
                    .unwrap_or("0")
                    .parse()
                    .expect("threshold is a number");
                assert!(
                    threshold > 0.0,
                    "{v}: {what}: threshold (builds per builder) must be > 0"
                );
                assert!(
                    t["metadata"]["serverAddress"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("http")),
                    "{v}: {what}: serverAddress"
                );
            }
            targeted = true;
            saw_keda = true;
        }
        // An autoscaled StatefulSet must not carry a replica count `kubectl apply` would reset.
        if targeted {
            assert!(
                p.statefulset["spec"].get("replicas").is_none(),
                "{v}: autoscaled StatefulSet still sets spec.replicas"
            );
        }
        // Every prometheus-adapter rule queries only real metric names; the names it serves
        // (`as:`) are router metrics or the demand metric.
        for cm in of_kind(&r.objects, "ConfigMap") {
            for (key, text) in string_map(&cm["data"]) {
                if text.contains("Rules") || text.contains("rules:") {
                    let (aliases, queries): (Vec<&str>, Vec<&str>) = text
                        .lines()
                        .partition(|l| l.trim_start().starts_with("as:"));
                    check_metric_names(
                        &queries.join("\n"),
                        &format!("{v}: ConfigMap {}/{key}", name(cm)),
                    );
                    for alias in aliases {
                        let alias = alias.trim_start()["as:".len()..].trim().trim_matches('"');
                        assert!(
                            ROUTER_METRICS.iter().any(|(n, _)| *n == alias)
                                || is_demand_metric(alias),
                            "{v}: ConfigMap {}: rule serves unknown metric {alias}",
                            name(cm)
                        );
                    }
                }
            }
        }
    });
    if rendered().is_some() {
        assert!(saw_hpa, "no variant has an HPA");
        assert!(saw_keda, "no variant has a KEDA ScaledObject");
    }
}

/// The Service named by `host:port` (`name.namespace.svc[.cluster.local][.]`), and the router
/// container port its `port` leads to.
fn router_service_port(r: &Rendered, p: &Pool, address: &str, what: &str) -> (Value, u64) {
    let v = &r.name;
    let (host, port) = address
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{v}: {what}: {address:?} is not host:port"));
    let port: u64 = port.parse().expect("port number");
    let mut parts = host.trim_end_matches('.').split('.');
    let (svc, ns) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let rest: Vec<&str> = parts.collect();
    assert!(
        rest == ["svc"] || rest == ["svc", "cluster", "local"],
        "{v}: {what}: {host} is not a Service DNS name"
    );
    let service = find(&r.objects, "Service", ns, svc)
        .unwrap_or_else(|| panic!("{v}: {what}: {host} names no rendered Service"));
    assert!(
        selects(&string_map(&service["spec"]["selector"]), &p.router_labels),
        "{v}: {what}: Service {svc} does not select the router pods"
    );
    let sp = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|sp| sp["port"].as_u64() == Some(port))
        .unwrap_or_else(|| panic!("{v}: {what}: Service {svc} has no port {port}"));
    let target = sp.get("targetPort").unwrap_or(&sp["port"]);
    (
        service.clone(),
        container_port(p.router_container, target, v),
    )
}

/// An `external-push` trigger reaches the router's scaler API: its scalerAddress is a Service
/// selecting the router pods whose port leads to `--scaler-listen`.
fn check_external_scaler_trigger(r: &Rendered, p: &Pool, trigger: &Value, what: &str) {
    let v = &r.name;
    let address = trigger["metadata"]["scalerAddress"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}: {what}: external trigger without scalerAddress"));
    let listen = port_of_addr(one_flag(&p.router_flags, "--scaler-listen", v));
    let (_, container) = router_service_port(r, p, address, what);
    assert_eq!(
        container, listen,
        "{v}: {what}: scalerAddress leads to container port {container}, the router's scaler listens on {listen}"
    );
    // Several replicas answer for each other: --scaler-peers names a headless Service over the
    // router pods, on the scaler port.
    if p.router["spec"]["replicas"].as_u64().unwrap_or(1) > 1 {
        let peers = one_flag(&p.router_flags, "--scaler-peers", v);
        let (service, container) = router_service_port(r, p, peers, "--scaler-peers");
        assert_eq!(
            service["spec"]["clusterIP"], "None",
            "{v}: --scaler-peers must name a headless Service (one address per replica)"
        );
        assert_eq!(container, listen, "{v}: --scaler-peers port");
    }
    // KEDA's operator (namespace keda) may reach the scaler port.
    let scaler_port = Value::from(listen);
    let open_to_keda = of_kind(&r.objects, "NetworkPolicy").any(|np| {
        selects(
            &match_labels(&np["spec"]["podSelector"], v),
            &p.router_labels,
        ) && np["spec"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                let port_ok = rule["ports"].as_array().into_iter().flatten().any(|rp| {
                    container_port(p.router_container, &rp["port"], v) == listen
                        || rp["port"] == scaler_port
                });
                let keda = rule["from"].as_array().into_iter().flatten().any(|f| {
                    string_map(&f["namespaceSelector"]["matchLabels"])
                        .get("kubernetes.io/metadata.name")
                        .is_some_and(|n| n == "keda")
                });
                port_ok && keda
            })
    });
    assert!(
        open_to_keda,
        "{v}: {what}: no NetworkPolicy lets KEDA (namespace keda) reach the scaler port"
    );
}

/// A pool that may scale to zero: the router queues builds and answers buildx with no builder,
/// KEDA is pushed by the router, scale-down is slow, and a removed builder finishes its builds.
fn check_scale_to_zero(r: &Rendered, p: &Pool, so: &Value, what: &str) {
    let v = &r.name;
    let flags = &p.router_flags;
    assert!(
        flags
            .get("--queue")
            .is_none_or(|vals| vals.iter().all(|q| q != "off")),
        "{v}: {what}: scale to zero needs the router's queue on"
    );
    assert!(
        flags.contains_key("--default-platforms") || flags.contains_key("--state-dir"),
        "{v}: {what}: a router over zero builders needs --default-platforms or --state-dir for buildx"
    );
    assert!(
        so["spec"]["triggers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["type"] == "external-push"),
        "{v}: {what}: scale from zero should be pushed by the router (external-push)"
    );
    let timeout = seconds(one_flag(flags, "--queue-timeout", v));
    assert!(
        timeout >= 600,
        "{v}: {what}: --queue-timeout must outlast a cold start"
    );
    let down = &so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"];
    assert!(
        down["stabilizationWindowSeconds"].as_u64().unwrap_or(0) >= 300,
        "{v}: {what}: scale-down must be slow (stabilizationWindowSeconds >= 300)"
    );
    let spec = &p.statefulset["spec"]["template"]["spec"];
    assert!(
        spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30) >= 600,
        "{v}: {what}: a removed builder needs a grace period for its running builds"
    );
    assert!(
        p.buildkitd["lifecycle"]["preStop"].is_object(),
        "{v}: {what}: buildkitd needs a preStop that waits for running builds"
    );
}

#[test]
fn monitoring_scrapes_the_admin_port_and_dashboard_uses_real_metrics() {
    let mut saw_dashboard = false;
    each_variant(|r| {
        let v = &r.name;
        let p = pool(r);
        for sm in of_kind(&r.objects, "ServiceMonitor") {
            let sel = match_labels(&sm["spec"]["selector"], v);
            let service = of_kind(&r.objects, "Service")
                .find(|s| {
                    namespace(s) == namespace(p.router)
                        && selects(&sel, &string_map(&s["metadata"]["labels"]))
                        && selects(&string_map(&s["spec"]["selector"]), &p.router_labels)
                })
                .unwrap_or_else(|| {
                    panic!("{v}: ServiceMonitor {} selects no router Service", name(sm))
                });
            let names: Vec<&str> = service["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|sp| sp["name"].as_str())
                .collect();
            for ep in sm["spec"]["endpoints"].as_array().expect("endpoints") {
                assert_eq!(
                    ep["port"], "admin",
                    "{v}: ServiceMonitor must scrape the admin port"
                );
                assert!(
                    names.contains(&"admin"),
                    "{v}: Service {} has no admin port",
                    name(service)
                );
                assert_eq!(
                    ep.get("path").and_then(Value::as_str).unwrap_or("/metrics"),
                    "/metrics"
                );
            }
            let allowed = str_list(&sm["spec"]["namespaceSelector"]["matchNames"]);
            assert!(
                allowed.is_empty() || allowed.contains(&namespace(p.router)),
                "{v}: ServiceMonitor namespaceSelector"
            );
        }
        for cm in of_kind(&r.objects, "ConfigMap") {
            if !string_map(&cm["metadata"]["labels"]).contains_key("grafana_dashboard") {
                continue;
            }
            for (key, text) in string_map(&cm["data"]) {
                let dashboard: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{v}: {key} is not JSON: {e}"));
                let used = check_metric_names(&text, &format!("{v}: dashboard {key}"));
                for needed in [
                    "buildkit_router_builds_active",
                    "buildkit_router_builds_queued",
                    "buildkit_router_placement_total",
                    "buildkit_router_session_bind_seconds_bucket",
                    "buildkit_router_requests_total",
                    "buildkit_router_backends",
                    "buildkit_router_desired_backends",
                    "buildkit_router_queue_wait_seconds_bucket",
                ] {
                    assert!(
                        used.contains(needed),
                        "{v}: dashboard {key} has no panel on {needed}"
                    );
                }
                assert!(
                    dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6),
                    "{v}: dashboard panels"
                );
                saw_dashboard = true;
            }
        }
    });
    // The dashboard file itself (also importable by hand) matches what the ConfigMap carries.
    let file = std::fs::read_to_string(deploy_dir().join("grafana/buildkit-router.json"))
        .expect("dashboard JSON");
    serde_json::from_str::<Value>(&file).expect("deploy/grafana/buildkit-router.json parses");
    check_metric_names(&file, "deploy/grafana/buildkit-router.json");
    if rendered().is_some() {
        assert!(
            saw_dashboard,
            "no variant ships the Grafana dashboard ConfigMap"
        );
    }
}

#[test]
fn mtls_mounts_the_secrets_its_certificates_produce() {
    let mut saw_mtls = false;
    each_variant(|r| {
        let v = &r.name;
        let certificates: Vec<&Value> = of_kind(&r.objects, "Certificate").collect();
        let p = pool(r);
        if certificates.is_empty() {
            for flag in ["--tls-cert", "--backend-tls-ca"] {
                assert!(
                    !p.router_flags.contains_key(flag),
                    "{v}: {flag} without Certificates"
                );
            }
            return;
        }
        saw_mtls = true;
        // Every Certificate's issuer exists.
        for c in &certificates {
            let issuer = &c["spec"]["issuerRef"];
            let kind_ = issuer["kind"].as_str().unwrap_or("Issuer");
            let ns = if kind_ == "ClusterIssuer" {
                ""
            } else {
                namespace(c)
            };
            assert!(
                find(
                    &r.objects,
                    kind_,
                    ns,
                    issuer["name"].as_str().unwrap_or_default()
                )
                .is_some(),
                "{v}: Certificate {}: issuer {issuer} missing",
                name(c)
            );
        }
        let secret_of = |ns: &str, secret: &str| {
            certificates
                .iter()
                .find(|c| namespace(c) == ns && c["spec"]["secretName"].as_str() == Some(secret))
                .copied()
        };
        // Files the TLS flags point at are keys of a mounted Secret that a Certificate writes.
        let file_source = |workload: &Value, container: &Value, path: &str, what: &str| -> &Value {
            let mount = container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    m["mountPath"]
                        .as_str()
                        .is_some_and(|mp| Path::new(path).parent() == Some(Path::new(mp)))
                })
                .unwrap_or_else(|| {
                    panic!("{v}: {what} {path}: no volume mounted at its directory")
                });
            let volume = workload["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|vol| vol["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{v}: {what}: volume {} not defined", mount["name"]));
            let secret = volume["secret"]["secretName"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}: {what}: volume {} is not a Secret", mount["name"]));
            let file = Path::new(path).file_name().unwrap().to_str().unwrap();
            assert!(
                CERT_MANAGER_KEYS.contains(&file),
                "{v}: {what} {path}: cert-manager writes no {file}"
            );
            secret_of(namespace(workload), secret)
                .unwrap_or_else(|| panic!("{v}: {what}: Secret {secret} comes from no Certificate"))
        };
        let usages = |c: &Value| {
            str_list(&c["spec"]["usages"])
                .into_iter()
                .map(str::to_owned)
                .collect::<BTreeSet<_>>()
        };

        // buildkitd: server certificate, client certificates required.
        let bk_flags = flags(&str_list(&p.buildkitd["args"]));
        let mut bk_certs = Vec::new();
        for flag in ["--tlscacert", "--tlscert", "--tlskey"] {
            let path = one_flag(&bk_flags, flag, &format!("{v}: buildkitd"));
            bk_certs.push(file_source(
                p.statefulset,
                p.buildkitd,
                path,
                &format!("buildkitd {flag}"),
            ));
        }
        let daemon_cert = bk_certs[1];
        assert!(
            usages(daemon_cert).contains("server auth"),
            "{v}: buildkitd certificate needs server auth"
        );

        // Router: front TLS with client CA, and client TLS to the builders.
        let mut front = Vec::new();
        for flag in ["--tls-cert", "--tls-key", "--tls-client-ca"] {
            let path = one_flag(&p.router_flags, flag, &format!("{v}: router"));
            front.push(file_source(
                p.router,
                p.router_container,
                path,
                &format!("router {flag}"),
            ));
        }
        let router_cert = front[0];
        assert!(
            usages(router_cert).contains("server auth"),
            "{v}: router serving certificate needs server auth"
        );
        let router_dns = str_list(&router_cert["spec"]["dnsNames"]);
        let router_service = format!("buildkit-router.{}.svc", namespace(p.router));
        assert!(
            router_dns.contains(&router_service.as_str()),
            "{v}: router certificate lacks {router_service}"
        );
        let mut back = Vec::new();
        for flag in [
            "--backend-tls-ca",
            "--backend-tls-cert",
            "--backend-tls-key",
        ] {
            let path = one_flag(&p.router_flags, flag, &format!("{v}: router"));
            back.push(file_source(
                p.router,
                p.router_container,
                path,
                &format!("router {flag}"),
            ));
        }
        assert!(
            usages(back[1]).contains("client auth"),
            "{v}: router backend certificate needs client auth"
        );
        // Discovered endpoints are bare addresses: without this flag the router would dial
        // the TLS-only builders in plaintext.
        assert!(
            p.router_flags.contains_key("--discovered-backend-tls"),
            "{v}: router must dial discovered builders with TLS (--discovered-backend-tls)"
        );
        // The router verifies the builders by a fixed name (it dials pod IPs): the daemons'
        // certificate must carry it, and both sides must trust the same issuer.
        let server_name = one_flag(&p.router_flags, "--backend-tls-server-name", v);
        assert!(
            str_list(&daemon_cert["spec"]["dnsNames"]).contains(&server_name),
            "{v}: buildkitd certificate lacks {server_name}"
        );
        assert_eq!(
            back[1]["spec"]["issuerRef"], daemon_cert["spec"]["issuerRef"],
            "{v}: router client and buildkitd certs from different issuers"
        );
        // Some client certificate exists for CI (client auth, same issuer as the router's server cert).
        assert!(
            certificates
                .iter()
                .any(|c| usages(c).contains("client auth")
                    && c["spec"]["issuerRef"] == router_cert["spec"]["issuerRef"]
                    && !std::ptr::eq(*c, back[1])),
            "{v}: no client certificate for CI"
        );
    });
    if rendered().is_some() {
        assert!(saw_mtls, "no variant configures mTLS");
    }
}

#[test]
fn router_binary_accepts_every_flag_the_manifests_use() {
    let out = Command::new(env!("CARGO_BIN_EXE_buildkit-router"))
        .arg("--help")
        .output()
        .expect("run buildkit-router --help");
    let help =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let Some(variants) = rendered() else { return };
    let used: BTreeSet<String> = variants
        .iter()
        .flat_map(|r| pool(r).router_flags.into_keys())
        .collect();
    let missing: Vec<&str> = used
        .iter()
        .map(String::as_str)
        .filter(|flag| {
            !help
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[')
                .any(|w| w == *flag)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the manifests use router flags that `buildkit-router --help` does not list: {missing:?}"
    );
}

#[test]
fn gitlab_ci_example_builds_through_the_router_without_a_daemon() {
    let path = deploy_dir().join("examples/gitlab-ci.yml");
    let text = std::fs::read_to_string(&path).expect("deploy/examples/gitlab-ci.yml");
    let ci: Value = serde_yaml::from_str(&text).expect("gitlab-ci.yml parses");
    let jobs: Vec<(&String, &Value)> = ci
        .as_object()
        .expect("a mapping of jobs")
        .iter()
        .filter(|(k, v)| !k.starts_with('.') && v.get("script").is_some())
        .collect();
    assert!(
        jobs.len() >= 2,
        "expected a build job and a multi-platform job"
    );
    // No Docker-in-Docker anywhere: no services, no dind image, no privileged flags.
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !code.contains("dind") && !code.contains("privileged"),
        "the example must not need DinD or privileged runners"
    );
    for (job, v) in &ci.as_object().unwrap().iter().collect::<Vec<_>>() {
        assert!(
            v.get("services").is_none(),
            "job {job} declares services (DinD?)"
        );
    }
    for needle in [
        "--driver remote",
        "tcp://buildkit-router.buildkit.svc:1234",
        "--cache-to \"type=registry,ref=",
        "mode=max",
        "--cache-from \"type=registry,ref=",
        "--platform linux/amd64,linux/arm64",
        "BUILDKIT_ROUTER_KEY=",
        "cacert=${BUILDKIT_CA},cert=${BUILDKIT_CERT},key=${BUILDKIT_KEY}",
        "--push",
    ] {
        assert!(text.contains(needle), "gitlab-ci.yml lacks {needle:?}");
    }
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).expect("deploy/README.md");
    assert!(
        readme.contains("examples/gitlab-ci.yml"),
        "deploy/README.md must link the CI example"
    );
}
