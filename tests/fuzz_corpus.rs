//! The fuzz targets' committed inputs, replayed on every `cargo test`: the seed corpus
//! (`fuzz/corpus/TARGET/`, made from the wire captures in `tests/fixtures` by
//! `regenerate_the_seed_corpus`) and every input that ever crashed a target
//! (`fuzz/regressions/TARGET/`). Fuzzing itself runs in `fuzz/run.sh` (docs/reliability.md).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use buildkit_router::fuzzing;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 7] = [
    ("wire", fuzzing::wire),
    ("grpc_framing", fuzzing::grpc_framing),
    ("authority", fuzzing::authority),
    ("session_tunnel", fuzzing::session_tunnel),
    ("session_inner_h2", fuzzing::session_inner_h2),
    ("endpoint_slices", fuzzing::endpoint_slices),
    ("discovery_flags", fuzzing::discovery_flags),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_and_every_past_crash_runs_cleanly_through_its_target() {
    for (name, target) in TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(name));
        assert!(
            seeds.len() >= 3,
            "fuzz/corpus/{name} has {} seeds; run `cargo test --test fuzz_corpus -- --ignored`",
            seeds.len()
        );
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        for path in seeds.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("read a corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "fuzz target {name} fails on {}",
                path.display()
            );
        }
    }
}

// ---- The seed corpus, generated from the captures -----------------------------------------

/// Writes `fuzz/corpus/*` from `tests/fixtures` (and the shared fixtures beside the repository,
/// when present). Run by hand after the fixtures change:
/// `cargo test --test fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn regenerate_the_seed_corpus() {
    let mut fixture_dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")];
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if shared.is_dir() {
        fixture_dirs.push(shared);
    }
    let mut requests = Vec::new();
    for dir in &fixture_dirs {
        for path in files(dir) {
            if path.extension().is_some_and(|e| e == "jsonl") {
                let text = std::fs::read_to_string(&path).expect("fixture");
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    requests.push(serde_json::from_str::<serde_json::Value>(line).expect("json"));
                }
            }
        }
    }
    let corpus = fuzz_dir().join("corpus");
    let write = |target: &str, name: String, data: Vec<u8>| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), data).expect("write seed");
    };

    // wire: every distinct first message; grpc_framing: each scenario's messages framed.
    let mut seen = std::collections::BTreeSet::new();
    let mut framed_by_path: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    for r in &requests {
        let Some(hex) = r["first_message_hex"].as_str() else {
            continue;
        };
        let message = decode_hex(hex);
        let path = r["path"]
            .as_str()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("");
        if seen.insert(message.clone()) {
            write("wire", format!("{path}-{:03}", seen.len()), message.clone());
        }
        let framed = framed_by_path
            .entry(path.to_owned())
            .or_insert_with(|| vec![37]);
        framed.extend_from_slice(&buildkit_router::wire::encode_frame(&message));
    }
    for (path, framed) in framed_by_path {
        write("grpc_framing", format!("{path}-stream"), framed);
    }

    // authority and session_inner_h2: HTTP/2 client byte streams with the captured headers.
    let mut n = 0;
    for r in requests.iter().take(40) {
        let Some(headers) = r["headers"].as_object() else {
            continue;
        };
        let mut fields: Vec<(String, String)> = vec![
            (":method".into(), "POST".into()),
            (":scheme".into(), "http".into()),
            (":path".into(), r["path"].as_str().unwrap_or("/").into()),
        ];
        for (name, values) in headers {
            for v in values.as_array().into_iter().flatten() {
                fields.push((name.clone(), v.as_str().unwrap_or("").into()));
            }
        }
        n += 1;
        let huffman = n % 2 == 0;
        write(
            "authority",
            format!("request-{n:03}"),
            client_stream(&fields, huffman, 0),
        );
        write(
            "session_inner_h2",
            format!("request-{n:03}"),
            client_stream(&fields, huffman, 0),
        );
    }
    for (i, authority) in [
        "tcp://127.0.0.1:1234",
        "tcp://[::1]:1234",
        "unix:///run/b.sock",
    ]
    .iter()
    .enumerate()
    {
        let fields = vec![
            (":method".to_owned(), "POST".to_owned()),
            (":authority".to_owned(), authority.to_string()),
            (
                ":path".to_owned(),
                "/grpc.health.v1.Health/Check".to_owned(),
            ),
        ];
        for (flags, tag) in [(0u8, "plain"), (0x8, "padded"), (0x20, "priority")] {
            write(
                "authority",
                format!("old-buildctl-{i}-{tag}-raw"),
                client_stream(&fields, false, flags),
            );
            write(
                "authority",
                format!("old-buildctl-{i}-{tag}-huffman"),
                client_stream(&fields, true, flags),
            );
        }
    }

    // session_tunnel: the framed inner streams a client sends, and raw bytes.
    for (i, r) in requests.iter().take(10).enumerate() {
        let message = decode_hex(r["first_message_hex"].as_str().unwrap_or(""));
        let mut data = vec![11];
        data.extend_from_slice(&buildkit_router::session::tunnel::Encoder::frame(&message));
        write("session_tunnel", format!("framed-{i:02}"), data);
    }
    write(
        "session_tunnel",
        "preface".into(),
        [&[0u8][..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"].concat(),
    );

    // endpoint_slices: EndpointSlices as the API server sends them.
    let slices = [
        r#"[{"metadata":{"name":"bk-abc"},"addressType":"IPv4","ports":[{"name":"buildkit","port":1234}],"endpoints":[{"addresses":["10.0.0.5"],"conditions":{"ready":true,"serving":true,"terminating":false},"targetRef":{"kind":"Pod","name":"buildkitd-0"},"zone":"a","nodeName":"n1"},{"addresses":["10.0.0.6"],"conditions":{"ready":false,"serving":true,"terminating":true},"targetRef":{"kind":"Pod","name":"buildkitd-1"}}]}]"#,
        r#"[{"metadata":{"name":"v4"},"addressType":"IPv4","ports":[{"port":1234}],"endpoints":[{"addresses":["10.0.0.5"],"targetRef":{"name":"p0"}}]},{"metadata":{"name":"v6"},"addressType":"IPv6","ports":[{"port":1234}],"endpoints":[{"addresses":["fd00::5"],"targetRef":{"name":"p0"}}]}]"#,
        r#"{"metadata":{"name":"fqdn"},"addressType":"FQDN","ports":[{"name":"grpc","port":1234}],"endpoints":[{"addresses":["buildkitd-0.buildkitd.ci.svc"]}]}"#,
        r#"{"metadata":{"name":"empty"},"addressType":"IPv4","endpoints":[]}"#,
        r#"{"metadata":{"name":"noport"},"addressType":"IPv4","endpoints":[{"addresses":["10.1.1.1"],"conditions":{"ready":false,"serving":false}}]}"#,
    ];
    for (i, json) in slices.iter().enumerate() {
        for selector in 0..4u8 {
            write(
                "endpoint_slices",
                format!("slice-{i}-{selector}"),
                [&[selector][..], json.as_bytes()].concat(),
            );
        }
    }

    // discovery_flags.
    for (i, flag) in [
        "buildkitd.ci.svc:1234",
        "[::1]:1234",
        "[fd00::1]:1234",
        "buildkit",
        "1234",
        "tcp://10.0.0.5:1234",
        "tls://[fd00::1]:1234",
        "tcp://buildkitd-0.buildkitd:1234/",
        "10m",
        "1h30m",
        "250ms",
    ]
    .iter()
    .enumerate()
    {
        write(
            "discovery_flags",
            format!("flag-{i:02}"),
            flag.as_bytes().to_vec(),
        );
    }
}

fn decode_hex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// An HPACK integer with an `n`-bit prefix, the prefix byte's other bits in `flags`.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_string(out: &mut Vec<u8>, value: &str, huffman: bool) {
    if huffman {
        let mut encoded = Vec::new();
        httlib_huffman::encode(value.as_bytes(), &mut encoded).expect("huffman");
        hpack_int(out, 0x80, 7, encoded.len());
        out.extend_from_slice(&encoded);
    } else {
        hpack_int(out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
}

/// A client's HTTP/2 byte stream (behind one chunk-size byte): the preface, SETTINGS, one
/// HEADERS frame of literal fields (`:authority` with static name index 1, like grpc-go), and an
/// empty gRPC message with END_STREAM.
fn client_stream(fields: &[(String, String)], huffman: bool, flags: u8) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        if name == ":authority" {
            hpack_int(&mut block, 0x40, 6, 1);
        } else {
            block.push(0x00);
            hpack_string(&mut block, name, false);
        }
        hpack_string(&mut block, value, huffman);
    }
    let mut payload = Vec::new();
    if flags & 0x8 != 0 {
        payload.push(3);
    }
    if flags & 0x20 != 0 {
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
    }
    payload.extend_from_slice(&block);
    if flags & 0x8 != 0 {
        payload.extend_from_slice(&[0, 0, 0]);
    }
    let mut wire = vec![23];
    wire.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    wire.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let len = payload.len() as u32;
    wire.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, 1, 4 | flags]);
    wire.extend_from_slice(&[0, 0, 0, 1]);
    wire.extend_from_slice(&payload);
    wire.extend_from_slice(&[0, 0, 5, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
    wire
}
