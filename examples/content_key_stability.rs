//! Measures the content key (src/placement/dockerfile.rs) on real Dockerfile histories: how often
//! a project keeps its key from one version to the next, and how many different projects share
//! a key. The figures in docs/placement.md ("Content key") come from this.
//!
//! `cargo run --example content_key_stability -- DIR`
//!
//! DIR holds one folder per project (one Dockerfile's history); each folder holds that
//! Dockerfile's versions, one file each, named so that they sort in version order (`v0.12.0`,
//! `v0.16.0`...: numbers compare as numbers).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;

use buildkit_router::placement::dockerfile::{fingerprint, instructions, Instruction};

/// One way of turning a Dockerfile into key text.
struct Variant {
    name: &'static str,
    key: fn(&str) -> String,
}

fn all(text: &str) -> String {
    join(&instructions(text), |_| true)
}

/// The chosen key with copy sources dropped (destinations and `--from` stages only).
fn stable_no_sources(text: &str) -> String {
    let ins: Vec<Instruction> = instructions(text)
        .into_iter()
        .map(|mut i| {
            if i.keyword == "COPY" || i.keyword == "ADD" {
                i.args = copy_shape(&i.args);
            }
            i
        })
        .collect();
    fingerprint(&ins)
}

/// `COPY --from=build --chmod=755 a b /dst/` -> `--from=build /dst/`: where things go and from
/// which stage, not which files (sources are renamed, added and removed as the code changes).
fn copy_shape(args: &str) -> String {
    if args.starts_with('[') {
        // JSON form: the last element is the destination.
        let dest = args
            .trim_end_matches(']')
            .rsplit(',')
            .next()
            .unwrap_or("")
            .trim();
        return dest.to_owned();
    }
    let words: Vec<&str> = args.split_whitespace().collect();
    let mut out: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| w.starts_with("--from=") || w.starts_with("--link"))
        .collect();
    if let Some(dest) = words.iter().rev().find(|w| !w.starts_with("--")) {
        if !dest.starts_with("<<") {
            out.push(dest);
        }
    }
    out.join(" ")
}

fn from_only(text: &str) -> String {
    join(&instructions(text), |i| i.keyword == "FROM")
}

fn stable(text: &str) -> String {
    fingerprint(&instructions(text))
}

fn join(ins: &[Instruction], keep: impl Fn(&Instruction) -> bool) -> String {
    ins.iter()
        .filter(|i| keep(i))
        .map(|i| format!("{} {}\n", i.keyword, i.args))
        .collect()
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "raw bytes",
        key: |t| t.to_owned(),
    },
    Variant {
        name: "all instructions, normalised",
        key: all,
    },
    Variant {
        name: "stable instructions (chosen)",
        key: stable,
    },
    Variant {
        name: "stable, copy sources dropped",
        key: stable_no_sources,
    },
    Variant {
        name: "FROM lines only",
        key: from_only,
    },
];

/// `v0.12.0` < `v0.16.0` < `v0.110.0`: digit runs compare as numbers.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut digits = false;
        for c in s.chars() {
            if c.is_ascii_digit() != digits && !cur.is_empty() {
                out.push(if digits {
                    Ok(cur.parse().unwrap_or(0))
                } else {
                    Err(cur.clone())
                });
                cur.clear();
            }
            digits = c.is_ascii_digit();
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(if digits {
                Ok(cur.parse().unwrap_or(0))
            } else {
                Err(cur)
            });
        }
        out
    }
    parts(a).cmp(&parts(b))
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: content_key_stability DIR");
    let mut projects: Vec<(String, Vec<String>)> = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("read DIR")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let folder = Path::new(&dir).join(&name);
        let mut versions: Vec<_> = std::fs::read_dir(&folder)
            .expect("read project")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        versions.sort_by(|a, b| version_order(a, b));
        let texts = versions
            .iter()
            .map(|v| std::fs::read_to_string(folder.join(v)).unwrap_or_default())
            .collect();
        projects.push((name, texts));
    }
    let pairs: usize = projects
        .iter()
        .map(|(_, v)| v.len().saturating_sub(1))
        .sum();
    println!(
        "{} Dockerfiles, {} versions, {pairs} pairs of consecutive versions",
        projects.len(),
        projects.iter().map(|(_, v)| v.len()).sum::<usize>()
    );
    println!(
        "{:<32} {:>14} {:>22} {:>20}",
        "key", "kept (pairs)", "projects kept to end", "distinct (latest)"
    );
    for variant in VARIANTS {
        let mut kept = 0;
        let mut whole = 0;
        let mut latest: HashMap<String, usize> = HashMap::new();
        for (_, texts) in &projects {
            let keys: Vec<String> = texts.iter().map(|t| (variant.key)(t)).collect();
            kept += keys.windows(2).filter(|w| w[0] == w[1]).count();
            if keys.windows(2).all(|w| w[0] == w[1]) {
                whole += 1;
            }
            if let Some(k) = keys.last() {
                *latest.entry(k.clone()).or_default() += 1;
            }
        }
        println!(
            "{:<32} {:>9}/{:<4} {:>17}/{:<4} {:>15}/{:<4}",
            variant.name,
            kept,
            pairs,
            whole,
            projects.len(),
            latest.len(),
            projects.len()
        );
    }
    // Projects whose latest versions share the chosen key.
    let mut groups: HashMap<String, Vec<&str>> = HashMap::new();
    for (name, texts) in &projects {
        if let Some(t) = texts.last() {
            groups.entry(stable(t)).or_default().push(name);
        }
    }
    for names in groups.values().filter(|n| n.len() > 1) {
        println!("share the chosen key: {}", names.join(", "));
    }
    if std::env::var_os("VERBOSE").is_some() {
        for (name, texts) in &projects {
            let keys: Vec<String> = texts.iter().map(|t| stable(t)).collect();
            let changes = keys.windows(2).filter(|w| w[0] != w[1]).count();
            println!(
                "{name}: {} versions, stable key changed {changes} times",
                texts.len()
            );
        }
    }
}
