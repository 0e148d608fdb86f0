//! Golden tests of `wire` over the request bytes real buildctl/buildx sent to a real buildkitd
//! (tests/fixtures, copied from the capture set; see tests/fixtures/README.md).

use std::collections::BTreeMap;
use std::path::PathBuf;

use buildkit_router::wire::{
    decode_health_status, decode_history_request, decode_solve, decode_status_ref,
    decode_update_history_ref, decode_worker_platforms, encode_frame, parse_frame_header,
    FrameHeader, HistoryRequestInfo, SolveInfo, TypedAttrs, GRPC_PREFIX_LEN,
};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const SCENARIOS: [&str; 6] = [
    "buildctl-cancel",
    "buildctl-dockerfile",
    "buildctl-dockerfile-importcache",
    "buildctl-status-inspect",
    "buildx-bake",
    "buildx-git",
];

/// One outer (or tunnelled) request stream of a capture.
struct Record {
    scenario: &'static str,
    /// Outer connection number; tunnelled calls keep their "conn/stream" label.
    conn: String,
    stream: u64,
    path: String,
    headers: BTreeMap<String, Vec<String>>,
    message: Option<Vec<u8>>,
    compressed: bool,
}

impl Record {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
    fn message(&self) -> &[u8] {
        self.message
            .as_deref()
            .unwrap_or_else(|| panic!("{} {}: no first message", self.scenario, self.path))
    }
    fn is(&self, method: &str) -> bool {
        self.path.ends_with(method)
    }
    fn id(&self) -> String {
        format!(
            "{} conn{} stream {} {}",
            self.scenario, self.conn, self.stream, self.path
        )
    }
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn hex_decode(s: &str) -> Vec<u8> {
    let pairs = s.as_bytes().chunks_exact(2);
    assert!(pairs.remainder().is_empty(), "odd hex length");
    pairs
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).expect("hex digit"))
        .collect()
}

fn load(scenario: &'static str, suffix: &str) -> Vec<Record> {
    let path = fixture_dir().join(format!("{scenario}.{suffix}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("fixture line is JSON");
            let conn = match &v["conn"] {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                other => panic!("unexpected conn {other}"),
            };
            let headers = v["headers"]
                .as_object()
                .expect("headers object")
                .iter()
                .map(|(k, vals)| {
                    let vals = vals
                        .as_array()
                        .expect("header values")
                        .iter()
                        .map(|x| x.as_str().expect("header value").to_owned())
                        .collect();
                    (k.clone(), vals)
                })
                .collect();
            Record {
                scenario,
                conn,
                stream: v["stream"].as_u64().expect("stream"),
                path: v["path"].as_str().expect("path").to_owned(),
                headers,
                message: v["first_message_hex"].as_str().map(hex_decode),
                compressed: v["first_message_compressed"].as_bool().unwrap_or(false),
            }
        })
        .collect()
}

fn outer(scenario: &'static str) -> Vec<Record> {
    load(scenario, "requests.jsonl")
}

fn all_messages() -> Vec<(String, Vec<u8>)> {
    SCENARIOS
        .iter()
        .flat_map(|s| {
            outer(s)
                .into_iter()
                .chain(load(s, "session-requests.jsonl"))
        })
        .filter_map(|r| r.message.clone().map(|m| (r.id(), m)))
        .collect()
}

fn solve_of<'a>(records: &'a [Record], stream: u64) -> SolveInfo<'a> {
    let r = records
        .iter()
        .find(|r| r.stream == stream && r.conn == "0")
        .unwrap_or_else(|| panic!("no stream {stream}"));
    assert!(r.is("/moby.buildkit.v1.Control/Solve"), "{}", r.id());
    decode_solve(r.message()).unwrap_or_else(|e| panic!("{}: {e}", r.id()))
}

fn ta<'a>(kind: &'a str, attrs: &[(&'a str, &'a str)]) -> TypedAttrs<'a> {
    TypedAttrs {
        kind,
        attrs: attrs.to_vec(),
    }
}

#[test]
fn every_fixture_record_is_present_and_uncompressed() {
    let mut count = 0;
    for scenario in SCENARIOS {
        for r in outer(scenario) {
            assert!(!r.compressed, "{}", r.id());
            let msg = r.message.clone().unwrap_or_default();
            // Re-framing a captured message and parsing the prefix gives it back.
            let framed = encode_frame(&msg);
            assert_eq!(
                parse_frame_header(&framed, 16 << 20),
                Ok(Some(FrameHeader {
                    compressed: false,
                    len: msg.len()
                }))
            );
            assert_eq!(&framed[GRPC_PREFIX_LEN..], &msg[..]);
            count += 1;
        }
    }
    // README: 88 outer requests across the scenarios.
    assert_eq!(count, 88);
}

/// The routing-relevant calls of every scenario decode, and agree with each other and with the
/// headers on the same connection.
#[test]
fn every_routing_call_decodes_and_matches_its_build() {
    let (mut solves, mut statuses, mut histories, mut updates) = (0, 0, 0, 0);
    for scenario in SCENARIOS {
        let records = outer(scenario);
        let on_conn = |conn: &str, method: &str| -> Vec<&Record> {
            records
                .iter()
                .filter(|r| r.conn == conn && r.is(method))
                .collect()
        };
        for r in &records {
            let id = r.id();
            if r.is("/moby.buildkit.v1.Control/Solve") {
                solves += 1;
                let info = decode_solve(r.message()).unwrap_or_else(|e| panic!("{id}: {e}"));
                assert_eq!(info.build_ref.len(), 25, "{id}");
                assert_eq!(
                    info.frontend, "",
                    "{id}: clients run the frontend client-side"
                );
                // Session names this build's own Session stream on the same connection.
                let uuids: Vec<&str> = on_conn(&r.conn, ".Control/Session")
                    .iter()
                    .filter_map(|s| s.header("x-docker-expose-session-uuid"))
                    .collect();
                assert!(
                    uuids.contains(&info.session),
                    "{id}: session {} not in {uuids:?}",
                    info.session
                );
                // Every session id the build names is a Session stream on this connection.
                for sid in info.session_ids() {
                    assert!(uuids.contains(&sid), "{id}: {sid} not in {uuids:?}");
                }
                // The build's Status and its LLBBridge calls carry the same ref.
                let status_refs: Vec<&str> = on_conn(&r.conn, ".Control/Status")
                    .iter()
                    .map(|s| decode_status_ref(s.message()).unwrap())
                    .collect();
                assert!(status_refs.contains(&info.build_ref), "{id}");
                assert!(
                    records.iter().any(|b| b.conn == r.conn
                        && b.path.starts_with("/moby.buildkit.v1.frontend.LLBBridge/")
                        && b.header("buildkit-controlapi-buildid") == Some(info.build_ref)),
                    "{id}: no LLBBridge call with buildid {}",
                    info.build_ref
                );
            } else if r.is("/moby.buildkit.v1.Control/Status") {
                statuses += 1;
                let build_ref =
                    decode_status_ref(r.message()).unwrap_or_else(|e| panic!("{id}: {e}"));
                let ping = on_conn(&r.conn, ".LLBBridge/Ping")
                    .into_iter()
                    .find(|p| p.header("buildkit-controlapi-buildid") == Some(build_ref));
                assert!(ping.is_some(), "{id}: no Ping carries buildid {build_ref}");
                let solve_refs: Vec<&str> = on_conn(&r.conn, ".Control/Solve")
                    .iter()
                    .map(|s| decode_solve(s.message()).unwrap().build_ref)
                    .collect();
                assert!(solve_refs.contains(&build_ref), "{id}");
            } else if r.is("/moby.buildkit.v1.Control/ListenBuildHistory") {
                histories += 1;
                decode_history_request(r.message()).unwrap_or_else(|e| panic!("{id}: {e}"));
            } else if r.is("/moby.buildkit.v1.Control/UpdateBuildHistory") {
                updates += 1;
                decode_update_history_ref(r.message()).unwrap_or_else(|e| panic!("{id}: {e}"));
            } else if r.path.starts_with("/moby.buildkit.v1.frontend.LLBBridge/") {
                let buildid = r
                    .header("buildkit-controlapi-buildid")
                    .expect("LLBBridge buildid");
                let known = on_conn(&r.conn, ".Control/Solve")
                    .iter()
                    .any(|s| decode_solve(s.message()).unwrap().build_ref == buildid);
                assert!(known, "{id}: buildid {buildid} names no Solve");
            }
        }
    }
    assert_eq!((solves, statuses, histories, updates), (8, 8, 5, 1));
}

#[test]
fn buildctl_dockerfile_solve() {
    let records = outer("buildctl-dockerfile");
    let info = solve_of(&records, 3);
    let name = ("name", "registry.example/team/app:1");
    assert_eq!(
        info,
        SolveInfo {
            build_ref: "vuquskpktbawouo85gt67uqej",
            session: "uvoc56gmeokfzbzbwatxtqcnt",
            source_policy_session: "",
            frontend: "",
            internal: false,
            frontend_attrs: vec![("platform", "linux/amd64"), ("build-arg:FOO", "bar")],
            exporters: vec![ta("image", &[("push", "false"), name])],
            cache_exports: vec![ta("inline", &[("mode", "min")])],
            cache_imports: vec![],
        }
    );
    assert_eq!(
        info.exporters[0].attr("name"),
        Some("registry.example/team/app:1")
    );
    assert_eq!(
        info.image_names().collect::<Vec<_>>(),
        vec!["registry.example/team/app:1"]
    );
    assert_eq!(info.session_ids(), vec!["uvoc56gmeokfzbzbwatxtqcnt"]);
    assert_eq!(info.frontend_attr("platform"), Some("linux/amd64"));
}

#[test]
fn buildctl_importcache_solve() {
    let records = outer("buildctl-dockerfile-importcache");
    let info = solve_of(&records, 5);
    assert_eq!(info.build_ref, "iqv1mvdw6op4wufqd05q5jwxq");
    assert_eq!(info.session, "27szwm3l6ikaqhsbjf7aofbow");
    assert_eq!(
        info.frontend_attr("cache-imports"),
        Some(r#"[{"Type":"registry","Attrs":{"ref":"127.0.0.1:5999/team/app:cache"}}]"#)
    );
    assert_eq!(info.frontend_attrs.len(), 3);
    assert_eq!(info.cache_exports, vec![ta("inline", &[("mode", "min")])]);
    assert_eq!(
        info.cache_imports,
        vec![ta("registry", &[("ref", "127.0.0.1:5999/team/app:cache")])]
    );
    assert_eq!(
        info.registry_cache_refs().collect::<Vec<_>>(),
        vec!["127.0.0.1:5999/team/app:cache"]
    );
    assert_eq!(
        info.exporters,
        vec![ta(
            "image",
            &[("push", "false"), ("name", "registry.example/team/app:1")]
        )]
    );
}

#[test]
fn buildx_git_probe_and_build() {
    let records = outer("buildx-git");
    let probe = solve_of(&records, 11);
    assert_eq!(
        probe,
        SolveInfo {
            build_ref: "yz9dswix20jbhiq59jd159pc7",
            session: "u2hn3conhp0mns8iparjoi59y",
            internal: true,
            ..SolveInfo::default()
        }
    );
    let info = solve_of(&records, 23);
    assert_eq!(info.build_ref, "mfwmo08g72flpx97hkl1urzxw");
    assert_eq!(info.session, "1zzwitow51lyzv3kugothyagx");
    assert!(!info.internal);
    assert_eq!(
        info.frontend_attrs,
        vec![
            ("vcs:revision", "4be2a8c41df64ab7e1653f1f0508d796fba0693a"),
            ("platform", "linux/amd64"),
            ("filename", "Dockerfile"),
            ("build-arg:FOO", "bar"),
            ("attest:provenance", "mode=min,inline-only=true"),
            ("vcs:localdir:context", "."),
            ("vcs:localdir:dockerfile", "."),
            ("vcs:source", "https://git.example.com/team/app.git"),
        ]
    );
    assert_eq!(
        info.frontend_attr("vcs:source"),
        Some("https://git.example.com/team/app.git")
    );
    assert_eq!(
        info.exporters,
        vec![ta("oci", &[("name", "registry.example/team/app:1")])]
    );
    assert!(info.cache_exports.is_empty() && info.cache_imports.is_empty());
    assert_eq!(info.session_ids(), vec!["1zzwitow51lyzv3kugothyagx"]);
    // The build's own Session stream carries buildx's shared key.
    let session = records
        .iter()
        .find(|r| r.header("x-docker-expose-session-uuid") == Some(info.session))
        .unwrap();
    assert_eq!(
        session.header("x-docker-expose-session-sharedkey"),
        Some("app:194f8ec5373b7318")
    );
}

#[test]
fn buildx_bake_targets_share_one_session() {
    let records = outer("buildx-bake");
    let probe = solve_of(&records, 11);
    assert!(probe.internal);
    assert_eq!(probe.build_ref, "jsqrxuiu2xp91t6uaq9wdt6xl");
    assert!(probe.frontend_attrs.is_empty() && probe.exporters.is_empty());

    let a = solve_of(&records, 29);
    let b = solve_of(&records, 35);
    assert_eq!(
        (a.build_ref, a.session),
        ("mkju5jnf16bybq8jly9c4d2h6", "vzguw51fc7775sj5vyly7og0z")
    );
    assert_eq!(
        (b.build_ref, b.session),
        ("ewb1rmah5f448nqqikbl2hzng", "y9rw70rh8irpv4jtuadpcal4f")
    );
    assert_eq!(a.frontend_attr("target"), Some("a"));
    assert_eq!(b.frontend_attr("target"), Some("b"));
    assert_eq!(
        a.exporters,
        vec![ta("oci", &[("name", "registry.example/team/app:a")])]
    );
    assert_eq!(
        b.exporters,
        vec![ta("oci", &[("name", "registry.example/team/app:b")])]
    );

    // The shared Session: opened by bake with shared key bake:<node>, named by no Solve's
    // Session field, only by both targets' local-sessionid:* attrs.
    let shared: Vec<&Record> = records
        .iter()
        .filter(|r| r.is(".Control/Session"))
        .filter(|r| {
            let uuid = r.header("x-docker-expose-session-uuid");
            uuid != Some(a.session) && uuid != Some(b.session) && uuid != Some(probe.session)
        })
        .collect();
    assert_eq!(shared.len(), 1);
    let shared_uuid = shared[0].header("x-docker-expose-session-uuid").unwrap();
    assert_eq!(shared_uuid, "hq5oarfocvr2kima7j80vwyv4");
    assert!(shared[0]
        .header("x-docker-expose-session-sharedkey")
        .unwrap()
        .starts_with("bake:"));
    for target in [&a, &b] {
        assert_eq!(
            target.frontend_attr("local-sessionid:context"),
            Some(shared_uuid)
        );
        assert_eq!(
            target.frontend_attr("local-sessionid:dockerfile"),
            Some(shared_uuid)
        );
        assert_eq!(target.session_ids(), vec![target.session, shared_uuid]);
    }
}

#[test]
fn buildctl_cancel_solve() {
    let records = outer("buildctl-cancel");
    let info = solve_of(&records, 7);
    assert_eq!(
        info,
        SolveInfo {
            build_ref: "wijq0uijqea7e36cl135cp9ul",
            session: "ubuut9iv2g2cipj8y776rophy",
            exporters: vec![ta("oci", &[])],
            ..SolveInfo::default()
        }
    );
    let status = records.iter().find(|r| r.stream == 3).unwrap();
    assert_eq!(
        decode_status_ref(status.message()),
        Ok("wijq0uijqea7e36cl135cp9ul")
    );
}

#[test]
fn history_requests() {
    for scenario in ["buildx-git", "buildx-bake"] {
        let records = outer(scenario);
        let r = records
            .iter()
            .find(|r| r.is(".Control/ListenBuildHistory"))
            .unwrap();
        assert_eq!(
            decode_history_request(r.message()),
            Ok(HistoryRequestInfo {
                active_only: true,
                build_ref: "buildx-test-history-api-feature",
                early_exit: true
            })
        );
    }
    let records = outer("buildctl-status-inspect");
    let by = |conn: &str, stream: u64| {
        records
            .iter()
            .find(|r| r.conn == conn && r.stream == stream)
            .unwrap()
            .message()
    };
    let early_exit_only = HistoryRequestInfo {
        early_exit: true,
        ..Default::default()
    };
    assert_eq!(decode_history_request(by("3", 1)), Ok(early_exit_only));
    // conn6 also carries Limit = 50, which is skipped.
    assert_eq!(decode_history_request(by("6", 7)), Ok(early_exit_only));
    assert_eq!(decode_history_request(by("9", 1)), Ok(early_exit_only));
    assert_eq!(
        decode_update_history_ref(by("9", 3)),
        Ok("52ni1s7fr9k5x0ra4u8aqzvn1")
    );
}

/// Runs every decoder; none may panic, whatever the bytes.
fn decode_all(msg: &[u8]) {
    if let Ok(info) = decode_solve(msg) {
        let _ = info.session_ids();
        let _ = info.frontend_attr("platform");
        let _ = info.image_names().count();
        let _ = info.registry_cache_refs().count();
    }
    let _ = decode_status_ref(msg);
    let _ = decode_history_request(msg);
    let _ = decode_update_history_ref(msg);
    let _ = decode_worker_platforms(msg);
    let _ = decode_health_status(msg);
    let _ = parse_frame_header(msg, 1 << 20);
}

#[test]
fn never_panics_on_truncated_or_mutated_fixtures() {
    let messages = all_messages();
    assert!(messages.len() > 50);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6275_696c_646b_6974);
    for (id, msg) in &messages {
        // Every prefix: a proper prefix of a Solve is either an error or a shorter valid message.
        for end in 0..=msg.len() {
            decode_all(&msg[..end]);
        }
        if id.ends_with("Control/Solve") {
            assert!(decode_solve(&msg[..msg.len() - 1]).is_err(), "{id}");
        }
        // Random mutations: byte flips, overwrites, insertions, deletions.
        for _ in 0..200 {
            let mut m = msg.clone();
            for _ in 0..rng.random_range(1..=4) {
                let op = rng.random_range(0..4);
                if m.is_empty() || op == 2 {
                    let at = rng.random_range(0..=m.len());
                    m.insert(at, rng.random());
                    continue;
                }
                let at = rng.random_range(0..m.len());
                match op {
                    0 => m[at] ^= 1 << rng.random_range(0..8),
                    1 => m[at] = rng.random(),
                    _ => {
                        m.remove(at);
                    }
                }
            }
            decode_all(&m);
        }
    }
}
