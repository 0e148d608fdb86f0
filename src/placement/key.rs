//! The affinity key of a build: which project's cache it wants, from what its Solve carries.

use super::hash::hash_str;
use crate::wire::SolveInfo;

/// Where a build's affinity key came from. Exposed in metrics (bounded set), unlike the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum KeySource {
    /// An explicit frontend attribute (`--affinity-key-attr`, default
    /// `build-arg:BUILDKIT_ROUTER_KEY`).
    #[value(name = "explicit")]
    Explicit,
    /// `vcs:source` (normalised repository) with the context/Dockerfile paths and target.
    #[value(name = "vcs")]
    Vcs,
    /// The exported image name, without tag or digest.
    #[value(name = "image")]
    Image,
    /// The registry cache export/import ref, without tag or digest.
    #[value(name = "cache")]
    Cache,
    /// The build's own Dockerfile, read by the router through the client's FileSync before
    /// placement (`crate::content`): what identifies the project across commits.
    #[value(name = "content")]
    Content,
    /// The directory part of a Session's shared key (sessions no Solve named in time).
    #[value(name = "session")]
    Session,
    /// No key: placed on load alone.
    #[value(skip)]
    None,
}

impl KeySource {
    pub const ALL: [KeySource; 7] = [
        KeySource::Explicit,
        KeySource::Vcs,
        KeySource::Image,
        KeySource::Cache,
        KeySource::Content,
        KeySource::Session,
        KeySource::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Explicit => "explicit",
            KeySource::Vcs => "vcs",
            KeySource::Image => "image",
            KeySource::Cache => "cache",
            KeySource::Content => "content",
            KeySource::Session => "session",
            KeySource::None => "none",
        }
    }
}

/// The default order in which key sources are tried.
pub const DEFAULT_SOURCES: [KeySource; 6] = [
    KeySource::Explicit,
    KeySource::Vcs,
    KeySource::Image,
    KeySource::Cache,
    KeySource::Content,
    KeySource::Session,
];

/// The sources tried before `content` (from the Solve alone) and after it.
pub fn around_content(sources: &[KeySource]) -> (&[KeySource], &[KeySource]) {
    match sources.iter().position(|s| *s == KeySource::Content) {
        Some(i) => (&sources[..i], &sources[i + 1..]),
        None => (sources, &[]),
    }
}

/// The `content` key of a build: the fingerprint of its Dockerfile (a stable hash of
/// [`super::dockerfile::fingerprint`]) with the frontend attributes that select what is built
/// from it (`target`, `platform`). The text stays short: it is logged and shown in /status.
pub fn content_key(fingerprint: &str, target: &str, platforms: &[String]) -> AffinityKey {
    let mut platforms = platforms.to_vec();
    platforms.sort();
    AffinityKey::new(
        KeySource::Content,
        format!(
            "content|{:016x}|{}|{}",
            hash_str(fingerprint),
            target.trim(),
            platforms.join(",")
        ),
    )
}

/// A build's affinity key: the normalised text (for logs only) and its stable hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityKey {
    pub hash: u64,
    pub source: KeySource,
    /// Normalised key text. May name a repository or image: logs and /status, never metric labels.
    pub text: String,
}

impl AffinityKey {
    pub fn new(source: KeySource, text: String) -> Self {
        // Texts start with their source ("vcs|", "image|"...), so an explicit key "x" and an
        // image named "x" stay distinct projects.
        let hash = hash_str(&text);
        Self { hash, source, text }
    }
}

fn attr<'a>(solve: &SolveInfo<'a>, key: &str) -> Option<&'a str> {
    // Walks the attrs itself: SolveInfo::frontend_attr belongs to the wire module.
    solve
        .frontend_attrs
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .filter(|v| !v.trim().is_empty())
}

/// The key of a Solve from the first source in `sources` that yields one.
pub fn solve_key(
    solve: &SolveInfo<'_>,
    sources: &[KeySource],
    explicit_attrs: &[String],
) -> Option<AffinityKey> {
    sources.iter().find_map(|&source| {
        let text = match source {
            KeySource::Explicit => explicit_attrs
                .iter()
                .find_map(|a| attr(solve, a))
                .map(|v| format!("explicit|{}", v.trim())),
            KeySource::Vcs => vcs_key(solve),
            KeySource::Image => solve
                .exporters
                .iter()
                .find_map(|e| e.attrs.iter().find(|(k, _)| *k == "name").map(|(_, v)| *v))
                .and_then(|names| names.split(',').map(str::trim).find(|n| !n.is_empty()))
                .map(|n| format!("image|{}", strip_tag(n))),
            KeySource::Cache => solve
                .cache_exports
                .iter()
                .chain(solve.cache_imports.iter())
                .filter(|c| c.kind == "registry")
                .find_map(|c| c.attrs.iter().find(|(k, _)| *k == "ref").map(|(_, v)| *v))
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(|r| format!("cache|{}", strip_tag(r))),
            // A Solve carries no shared key (see `session_key`); the content key needs a read
            // through the client's session (`crate::content`).
            KeySource::Content | KeySource::Session | KeySource::None => None,
        };
        text.map(|t| AffinityKey::new(source, t))
    })
}

/// The key of a Session from its `x-docker-expose-session-sharedkey`, if `Session` is a source.
pub fn session_key(shared_key: &str, sources: &[KeySource]) -> Option<AffinityKey> {
    if !sources.contains(&KeySource::Session) {
        return None;
    }
    let dir = shared_key_dir(shared_key)?;
    Some(AffinityKey::new(
        KeySource::Session,
        format!("session|{dir}"),
    ))
}

/// The directory part of a shared key: some clients send `<dir>:<node id>`; the node suffix
/// would split one directory's builds across machines, so it goes.
fn shared_key_dir(shared_key: &str) -> Option<&str> {
    let k = shared_key.trim();
    let dir = match k.rsplit_once(':') {
        Some((dir, suffix)) if !suffix.contains(['/', '\\']) && !dir.is_empty() => dir,
        _ => k,
    };
    let dir = dir.trim_end_matches(['/', '\\']);
    (!dir.is_empty()).then_some(dir)
}

fn vcs_key(solve: &SolveInfo<'_>) -> Option<String> {
    let repo = normalize_git_url(attr(solve, "vcs:source")?)?;
    let ctx = clean_rel(attr(solve, "vcs:localdir:context").unwrap_or(""));
    let df_dir = clean_rel(attr(solve, "vcs:localdir:dockerfile").unwrap_or(""));
    let filename = clean_rel(attr(solve, "filename").unwrap_or("Dockerfile"));
    let target = attr(solve, "target").unwrap_or("").trim();
    // The context directory is part of the key: a monorepo's images built from different
    // subdirectories are different projects (the flaw of hashing the repository alone).
    Some(format!("vcs|{repo}|{ctx}|{df_dir}|{filename}|{target}"))
}

/// `./a/b/` -> `a/b`, `.` -> ``.
fn clean_rel(p: &str) -> &str {
    let mut p = p.trim();
    while let Some(rest) = p.strip_prefix("./") {
        p = rest;
    }
    let p = p.trim_end_matches('/');
    if p == "." {
        ""
    } else {
        p
    }
}

/// `registry.example/team/app:1` -> `registry.example/team/app` (also drops `@digest`),
/// lower-cased.
pub fn strip_tag(name: &str) -> String {
    let name = name.trim();
    let name = name.split_once('@').map_or(name, |(n, _)| n);
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let name = match name[last_slash..].rfind(':') {
        Some(colon) => &name[..last_slash + colon],
        None => name,
    };
    name.to_ascii_lowercase()
}

/// One spelling per repository: `host/path`, host lower-cased, without scheme, user, port,
/// `.git`, query or `#ref` fragment. Returns `None` for an empty source.
pub fn normalize_git_url(url: &str) -> Option<String> {
    let url = url.trim();
    let url = url.split_once('#').map_or(url, |(u, _)| u);
    let url = url.split_once('?').map_or(url, |(u, _)| u);
    let (host, path) = if let Some((_, rest)) = url.split_once("://") {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        (Some(authority), path)
    } else if let Some((authority, path)) = url
        .split_once(':')
        .filter(|(a, _)| !a.is_empty() && !a.contains('/') && !a.contains('\\') && a.len() > 1)
    {
        // scp-like `git@host:org/repo.git` (a one-letter "host" is a Windows drive).
        (Some(authority), path)
    } else {
        (None, url)
    };
    let host = host.map(|a| {
        let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
        let a = if a.starts_with('[') {
            a.split_once(']')
                .map_or(a, |(h, _)| h)
                .trim_start_matches('[')
        } else {
            a.split_once(':').map_or(a, |(h, _)| h)
        };
        a.to_ascii_lowercase()
    });
    let mut path = path.trim_matches('/');
    loop {
        let before = path;
        path = path
            .strip_suffix(".git")
            .unwrap_or(path)
            .trim_end_matches('/');
        if path == before {
            break;
        }
    }
    let out = match host {
        Some(h) if !h.is_empty() && !path.is_empty() => format!("{h}/{path}"),
        Some(h) if !h.is_empty() => h,
        _ if !path.is_empty() => path.to_owned(),
        _ => return None,
    };
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::TypedAttrs;

    #[test]
    fn git_url_forms_of_one_repository_agree() {
        let want = Some("github.com/org/repo".to_owned());
        for url in [
            "git@github.com:org/repo.git",
            "git@GitHub.com:org/repo",
            "https://github.com/org/repo",
            "https://GitHub.COM/org/repo.git",
            "https://github.com/org/repo.git/",
            "https://user:token@github.com/org/repo.git",
            "https://github.com:443/org/repo",
            "ssh://git@github.com/org/repo.git",
            "ssh://git@github.com:22/org/repo.git",
            "git://github.com/org/repo.git",
            "https://github.com/org/repo.git#main",
            "https://github.com/org/repo.git#v1.2.3:subdir",
            "git@github.com:org/repo.git#refs/heads/main",
            "  https://github.com/org/repo?foo=bar  ",
        ] {
            assert_eq!(normalize_git_url(url), want, "{url}");
        }
    }

    #[test]
    fn different_repositories_stay_apart() {
        assert_ne!(
            normalize_git_url("https://github.com/org/repo"),
            normalize_git_url("https://github.com/org/repo2")
        );
        assert_ne!(
            normalize_git_url("https://github.com/org/repo"),
            normalize_git_url("https://gitlab.com/org/repo")
        );
        // Paths keep their case: only the host is case-insensitive everywhere.
        assert_ne!(
            normalize_git_url("https://github.com/Org/Repo"),
            normalize_git_url("https://github.com/org/repo")
        );
        assert_eq!(normalize_git_url(""), None);
        assert_eq!(normalize_git_url("#main"), None);
    }

    #[test]
    fn image_and_cache_refs_lose_tag_and_digest() {
        assert_eq!(
            strip_tag("registry.example/team/app:1"),
            "registry.example/team/app"
        );
        assert_eq!(
            strip_tag("registry.example:5000/team/app"),
            "registry.example:5000/team/app"
        );
        assert_eq!(
            strip_tag("127.0.0.1:5999/team/app:cache"),
            "127.0.0.1:5999/team/app"
        );
        assert_eq!(strip_tag("Team/App@sha256:abcd"), "team/app");
        assert_eq!(strip_tag("app:1@sha256:abcd"), "app");
    }

    fn solve<'a>(attrs: Vec<(&'a str, &'a str)>) -> SolveInfo<'a> {
        SolveInfo {
            build_ref: "r",
            session: "s",
            frontend_attrs: attrs,
            ..Default::default()
        }
    }

    #[test]
    fn buildx_git_solve_keys_on_the_repository() {
        // As in fixtures/buildx-git: vcs:source wins over the exported image name.
        let mut s = solve(vec![
            ("vcs:revision", "4be2a8c41df64ab7e1653f1f0508d796fba0693a"),
            ("platform", "linux/amd64"),
            ("filename", "Dockerfile"),
            ("vcs:localdir:context", "."),
            ("vcs:localdir:dockerfile", "."),
            ("vcs:source", "https://git.example.com/team/app.git"),
        ]);
        s.exporters = vec![TypedAttrs {
            kind: "oci",
            attrs: vec![("name", "registry.example/team/app:1")],
        }];
        let k = solve_key(
            &s,
            &DEFAULT_SOURCES,
            &["build-arg:BUILDKIT_ROUTER_KEY".into()],
        )
        .unwrap();
        assert_eq!(k.source, KeySource::Vcs);
        assert_eq!(k.text, "vcs|git.example.com/team/app|||Dockerfile|");

        // Another revision, another clone URL form: same project, same key.
        let s2 = solve(vec![
            ("vcs:revision", "0000000000000000000000000000000000000000"),
            ("vcs:source", "git@git.example.com:team/app.git"),
            ("vcs:localdir:context", "./"),
            ("filename", "./Dockerfile"),
        ]);
        assert_eq!(solve_key(&s2, &DEFAULT_SOURCES, &[]).unwrap().hash, k.hash);

        // A monorepo's other image, built from a subdirectory: another project.
        let s3 = solve(vec![
            ("vcs:source", "https://git.example.com/team/app.git"),
            ("vcs:localdir:context", "services/api"),
            ("vcs:localdir:dockerfile", "services/api"),
        ]);
        assert_ne!(solve_key(&s3, &DEFAULT_SOURCES, &[]).unwrap().hash, k.hash);
        // ... and another bake target of the same Dockerfile too.
        let s4 = solve(vec![
            ("vcs:source", "https://git.example.com/team/app.git"),
            ("target", "b"),
        ]);
        assert_ne!(solve_key(&s4, &DEFAULT_SOURCES, &[]).unwrap().hash, k.hash);
    }

    #[test]
    fn explicit_attr_wins_and_sources_follow_the_configured_order() {
        let mut s = solve(vec![
            ("build-arg:BUILDKIT_ROUTER_KEY", " tenant-a/app "),
            ("vcs:source", "https://git.example.com/team/app.git"),
        ]);
        s.exporters = vec![TypedAttrs {
            kind: "image",
            attrs: vec![
                ("push", "false"),
                (
                    "name",
                    "registry.example/team/app:1,registry.example/team/app:latest",
                ),
            ],
        }];
        s.cache_imports = vec![TypedAttrs {
            kind: "registry",
            attrs: vec![("ref", "127.0.0.1:5999/team/app:cache")],
        }];
        let explicit = vec!["build-arg:BUILDKIT_ROUTER_KEY".to_owned()];
        let k = solve_key(&s, &DEFAULT_SOURCES, &explicit).unwrap();
        assert_eq!(
            (k.source, k.text.as_str()),
            (KeySource::Explicit, "explicit|tenant-a/app")
        );

        let k = solve_key(&s, &[KeySource::Image, KeySource::Vcs], &explicit).unwrap();
        assert_eq!(
            (k.source, k.text.as_str()),
            (KeySource::Image, "image|registry.example/team/app")
        );
        let k = solve_key(&s, &[KeySource::Cache], &explicit).unwrap();
        assert_eq!(
            (k.source, k.text.as_str()),
            (KeySource::Cache, "cache|127.0.0.1:5999/team/app")
        );
        // An empty explicit value falls through to the next source.
        let s = solve(vec![
            ("build-arg:BUILDKIT_ROUTER_KEY", ""),
            ("vcs:source", "https://h/o/r"),
        ]);
        assert_eq!(
            solve_key(&s, &DEFAULT_SOURCES, &explicit).unwrap().source,
            KeySource::Vcs
        );
        // Nothing to go on: no key.
        assert_eq!(
            solve_key(
                &solve(vec![("platform", "linux/amd64")]),
                &DEFAULT_SOURCES,
                &explicit
            ),
            None
        );
    }

    #[test]
    fn session_shared_key_keeps_its_directory_part() {
        let a = session_key("/home/me/src/app:node-1", &DEFAULT_SOURCES).unwrap();
        let b = session_key("/home/me/src/app/:node-2", &DEFAULT_SOURCES).unwrap();
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.source, KeySource::Session);
        assert_eq!(session_key("", &DEFAULT_SOURCES), None);
        assert_eq!(session_key("/x:y", &[KeySource::Vcs]), None);
        // An opaque key (docker CLI sends a hash) is still a stable key.
        assert!(session_key("3f2a9c", &DEFAULT_SOURCES).is_some());
    }
}
