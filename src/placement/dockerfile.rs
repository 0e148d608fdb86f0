//! What identifies a Dockerfile's project across commits: its instructions, parsed as BuildKit's
//! Dockerfile parser reads them (`frontend/dockerfile/parser` of buildkit v0.32.2: parser
//! directives, `\` or `` ` `` line continuations, comment lines, heredocs), with the parts that
//! change from commit to commit normalised away.
//!
//! What is kept and dropped (measured on real Dockerfile histories, docs/placement.md):
//! - `FROM`: the base image without tag or digest (`golang:1.21-alpine` -> `golang`), flags and
//!   the stage name; `ARG`: the names, not the defaults (a version bump is an `ARG` default);
//!   `ENV` and `LABEL`: the keys, not the values; `MAINTAINER`: dropped.
//! - Every other instruction (`RUN`, `COPY`, `WORKDIR`, `ENTRYPOINT`...) with its heredoc
//!   bodies, whitespace collapsed, numbers with their dots (`1.21.3`, `v2.8.0` -> `0`, `v0`) and
//!   long hex strings (digests, checksums, commit ids) replaced by placeholders.
//! - Which instructions: only the stable ones ([`STABLE`]): `FROM`, `ARG`, `ENV`, `LABEL`,
//!   `WORKDIR`, `USER`, `EXPOSE`, `VOLUME`, `ENTRYPOINT`, `CMD`, `SHELL`, `STOPSIGNAL`,
//!   `HEALTHCHECK`, `ONBUILD`, `COPY`, `ADD`: not `RUN`, whose bodies change far more often (a
//!   package added, a step split) than the shape of the image does. Copy sources stay: they tell
//!   apart the many projects built from one template (`COPY build/libs/payment-*.jar app.jar`).
//!
//! Pure functions, no I/O.

use super::key::strip_tag;

/// A Dockerfile instruction after normalisation: the upper-cased keyword and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub keyword: String,
    pub args: String,
}

/// Instructions whose normalised form goes into the key (see the module docs).
pub const STABLE: &[&str] = &[
    "FROM",
    "ARG",
    "ENV",
    "LABEL",
    "WORKDIR",
    "USER",
    "EXPOSE",
    "VOLUME",
    "ENTRYPOINT",
    "CMD",
    "SHELL",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "ONBUILD",
    "COPY",
    "ADD",
];

/// The normalised instructions of a Dockerfile, in order. Never fails: text that is not a
/// Dockerfile still yields something deterministic.
pub fn instructions(text: &str) -> Vec<Instruction> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut escape = '\\';
    let mut lines = text.lines().peekable();
    // Parser directives: `# key=value` lines at the very top.
    while let Some(line) = lines.peek() {
        match directive(line) {
            Some((key, value)) => {
                if key == "escape" && (value == "`" || value == "\\") {
                    escape = value.chars().next().unwrap_or('\\');
                }
                lines.next();
            }
            None => break,
        }
    }
    let mut out = Vec::new();
    while let Some(line) = lines.next() {
        let first = line.trim_start();
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        let mut logical = String::new();
        let mut rest = first;
        // Continuations: an escape at the end of the line joins the next one; comment and empty
        // lines inside are skipped, as BuildKit's parser does.
        loop {
            match strip_continuation(rest, escape) {
                Some(part) => {
                    logical.push_str(part);
                    let next = loop {
                        match lines.next() {
                            Some(l) if l.trim_start().starts_with('#') => continue,
                            Some(l) if l.trim().is_empty() => continue,
                            other => break other,
                        }
                    };
                    match next {
                        Some(l) => rest = l,
                        None => break,
                    }
                }
                None => {
                    logical.push_str(rest);
                    break;
                }
            }
        }
        let (keyword, args) = match logical.trim().split_once(char::is_whitespace) {
            Some((k, a)) => (k.to_ascii_uppercase(), a.trim().to_owned()),
            None => (logical.trim().to_ascii_uppercase(), String::new()),
        };
        let mut args = args;
        // Heredocs (`RUN <<EOF`, `COPY <<EOF /dst`): their bodies follow the line.
        let base = keyword_after_onbuild(&keyword, &args);
        if matches!(base, "RUN" | "COPY" | "ADD") && args.contains("<<") {
            for (name, chomp) in heredoc_names(&args) {
                let mut body = String::new();
                for l in lines.by_ref() {
                    let candidate = if chomp { l.trim_start_matches('\t') } else { l };
                    if candidate.trim_end_matches('\r') == name {
                        break;
                    }
                    body.push_str(l);
                    body.push('\n');
                }
                args.push_str(" <<");
                args.push_str(&body);
            }
        }
        if let Some(i) = normalise(&keyword, &args) {
            out.push(i);
        }
    }
    out
}

/// The key text of a Dockerfile: its [`STABLE`] normalised instructions, one a line.
pub fn fingerprint(instructions: &[Instruction]) -> String {
    let mut out = String::new();
    for i in instructions {
        let base = keyword_after_onbuild(&i.keyword, &i.args);
        if !STABLE.contains(&base) {
            continue;
        }
        out.push_str(&i.keyword);
        out.push(' ');
        out.push_str(&i.args);
        out.push('\n');
    }
    out
}

/// `# key=value` at the top of the file (BuildKit reads `syntax`, `escape`, `check`).
fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim().strip_prefix('#')?;
    let (key, value) = body.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((key.to_ascii_lowercase(), value.trim().to_owned()))
}

/// The line without its trailing escape (and the blanks after it), if it continues.
fn strip_continuation(line: &str, escape: char) -> Option<&str> {
    let trimmed = line.trim_end_matches([' ', '\t', '\r']);
    let without = trimmed.strip_suffix(escape)?;
    // An escaped escape (`\\`) at the end is a literal, not a continuation.
    if without.ends_with(escape) {
        return None;
    }
    Some(without)
}

/// The instruction an `ONBUILD` wraps, else the keyword itself.
fn keyword_after_onbuild<'a>(keyword: &'a str, args: &'a str) -> &'a str {
    if keyword == "ONBUILD" {
        let inner = args.split_whitespace().next().unwrap_or("");
        // Upper-cased by `normalise` for the key; here only for matching.
        return match inner.to_ascii_uppercase().as_str() {
            "RUN" => "RUN",
            "COPY" => "COPY",
            "ADD" => "ADD",
            _ => "ONBUILD",
        };
    }
    keyword
}

/// The heredoc words of a line (`<<EOF`, `<<-EOF`, `<<"EOF"`, `3<<EOF`): name and whether
/// leading tabs are stripped from the terminator line.
fn heredoc_names(args: &str) -> Vec<(String, bool)> {
    args.split_whitespace()
        .filter_map(|word| {
            let word = word.trim_start_matches(|c: char| c.is_ascii_digit());
            let rest = word.strip_prefix("<<")?;
            let (chomp, rest) = match rest.strip_prefix('-') {
                Some(r) => (true, r),
                None => (false, rest),
            };
            let name: String = rest.chars().filter(|c| *c != '"' && *c != '\'').collect();
            (!name.is_empty() && !name.contains('<')).then_some((name, chomp))
        })
        .collect()
}

/// Applies the per-instruction rules of the module docs; `None` drops the instruction.
fn normalise(keyword: &str, args: &str) -> Option<Instruction> {
    let args = match keyword {
        "MAINTAINER" => return None,
        "FROM" => from_args(args),
        "ARG" => split_words(args)
            .iter()
            .map(|w| w.split_once('=').map_or(w.as_str(), |(k, _)| k).to_owned())
            .collect::<Vec<_>>()
            .join(" "),
        "ENV" | "LABEL" => assignment_keys(args).join(" "),
        _ => volatile(&collapse(args)),
    };
    Some(Instruction {
        keyword: keyword.to_owned(),
        args,
    })
}

/// `--platform=$BUILDPLATFORM golang:1.21-alpine AS build` -> `--platform=$BUILDPLATFORM golang as build`.
fn from_args(args: &str) -> String {
    let mut out = Vec::new();
    let mut image_seen = false;
    for word in args.split_whitespace() {
        if !image_seen && word.starts_with("--") {
            out.push(volatile(word));
        } else if !image_seen {
            out.push(strip_tag(word));
            image_seen = true;
        } else {
            out.push(word.to_ascii_lowercase());
        }
    }
    out.join(" ")
}

/// Words split on blanks, a quoted part (`"a b"`, `'a b'`) staying in one word.
fn split_words(args: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = args.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), '\\') => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => quote = Some(c),
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            (None, c) => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The keys of `ENV`/`LABEL` arguments: `k=v k2="v 2"`, or the legacy `ENV k some value`.
fn assignment_keys(args: &str) -> Vec<String> {
    let words = split_words(args);
    match words.first() {
        Some(first) if !first.contains('=') => vec![first.clone()],
        _ => words
            .iter()
            .filter_map(|w| w.split_once('=').map(|(k, _)| k.to_owned()))
            .collect(),
    }
}

/// Whitespace runs to one blank.
fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Replaces what changes from commit to commit inside an instruction: hex strings of 12 or more
/// characters holding a digit (digests, checksums, commit ids) by `#`, then numbers with their
/// dots and separators between digits (`1.21.3`, `7.68.0-1`) by `0`.
fn volatile(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_hexdigit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()) {
            let end = i + bytes[i..]
                .iter()
                .take_while(|b| b.is_ascii_hexdigit())
                .count();
            let word_ends = end == bytes.len() || !bytes[end].is_ascii_alphanumeric();
            if word_ends && end - i >= 12 && bytes[i..end].iter().any(u8::is_ascii_digit) {
                out.push('#');
                i = end;
                continue;
            }
        }
        if c.is_ascii_digit() {
            let mut end = i;
            // Digits, and separators between digits.
            while end < bytes.len()
                && (bytes[end].is_ascii_digit()
                    || (matches!(bytes[end], b'.' | b'-' | b'_' | b'+')
                        && bytes.get(end + 1).is_some_and(u8::is_ascii_digit)))
            {
                end += 1;
            }
            out.push('0');
            i = end;
            continue;
        }
        // Multi-byte UTF-8 sequences are copied whole.
        let len = utf8_len(c);
        out.push_str(&s[i..(i + len).min(s.len())]);
        i += len;
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<String> {
        instructions(text)
            .into_iter()
            .map(|i| format!("{} {}", i.keyword, i.args))
            .collect()
    }

    #[test]
    fn parses_continuations_comments_and_heredocs_as_buildkit_does() {
        let text = "# syntax=docker/dockerfile:1\n\
                    FROM golang:1.21-alpine AS build\n\
                    # a comment\n\
                    RUN apk add \\\n    # inside\n\n    git  gcc\n\
                    run <<EOF\nset -ex\ngo build ./...\nEOF\n\
                    COPY <<-EOT /etc/x\n\thello\n\tEOT\n\
                    CMD [\"app\"]\n";
        assert_eq!(
            keys(text),
            vec![
                "FROM golang as build",
                "RUN apk add git gcc",
                "RUN <<EOF <<set -ex go build ./...",
                "COPY <<-EOT /etc/x << hello",
                "CMD [\"app\"]",
            ]
        );
    }

    #[test]
    fn escape_directive_changes_the_continuation_character() {
        let text = "# escape=`\nFROM mcr.microsoft.com/windows/servercore:ltsc2022\nRUN a `\n  b\n";
        assert_eq!(
            keys(text),
            vec!["FROM mcr.microsoft.com/windows/servercore", "RUN a b"]
        );
    }

    #[test]
    fn versions_and_digests_do_not_change_the_fingerprint() {
        let a = "ARG GO_VERSION=1.21\nFROM golang:${GO_VERSION}-alpine3.18 AS build\n\
                 ENV NODE_VERSION=18.2.0 PATH=/x\nLABEL version=\"1.0\"\n\
                 MAINTAINER someone\n\
                 RUN apk add curl=7.68.0-r1\n\
                 ADD --checksum=sha256:24454f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d https://x/v1.2.3.tgz /opt/\n\
                 COPY . /src\nEXPOSE 8080\nENTRYPOINT [\"/app\"]\n";
        let b = "ARG GO_VERSION=1.22\nFROM golang:${GO_VERSION}-alpine3.20@sha256:0123456789abcdef AS build\n\
                 ENV NODE_VERSION=20.1.1 PATH=/x\nLABEL version=\"2.0\"\n\
                 RUN apk add curl=8.1.0-r0\n\
                 ADD --checksum=sha256:ffff4f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d https://x/v1.3.0.tgz /opt/\n\
                 COPY . /src\nEXPOSE 8080\nENTRYPOINT [\"/app\"]\n";
        assert_eq!(fingerprint(&instructions(a)), fingerprint(&instructions(b)));
    }

    #[test]
    fn run_bodies_are_not_part_of_the_fingerprint() {
        let a = "FROM alpine\nRUN apk add git\nCOPY a.txt /app/\nCMD [\"/app/run\"]\n";
        let b = "FROM alpine\nRUN apk add git gcc\nRUN echo more\nCOPY a.txt /app/\nCMD [\"/app/run\"]\n";
        assert_eq!(fingerprint(&instructions(a)), fingerprint(&instructions(b)));
        // ... but what the image is does.
        let c = "FROM debian\nRUN apk add git\nCOPY a.txt /app/\nCMD [\"/app/run\"]\n";
        let d = "FROM alpine\nRUN apk add git\nCOPY a.txt /srv/\nCMD [\"/app/run\"]\n";
        let e = "FROM alpine\nRUN apk add git\nCOPY a.txt /app/\nCMD [\"/app/serve\"]\n";
        // Two services of one template, told apart by what they copy.
        let f = "FROM alpine\nRUN apk add git\nCOPY b.txt /app/\nCMD [\"/app/run\"]\n";
        let fa = fingerprint(&instructions(a));
        for other in [c, d, e, f] {
            assert_ne!(fa, fingerprint(&instructions(other)), "{other}");
        }
    }

    #[test]
    fn volatile_parts() {
        assert_eq!(volatile("curl=7.68.0-1ubuntu2"), "curl=0ubuntu0");
        assert_eq!(volatile("v2.8.0 and v0.33.0"), "v0 and v0");
        assert_eq!(
            volatile("git.example/x#4be2a8c41df64ab7e1653f1f"),
            "git.example/x##"
        );
        assert_eq!(volatile("/go/src/app"), "/go/src/app");
        assert_eq!(volatile("deadbeefcafe0"), "#");
        assert_eq!(volatile("décor 3"), "décor 0");
        // A tag made of build args goes with the tag.
        assert_eq!(strip_tag("golang:${GO_VERSION}-alpine"), "golang");
    }

    #[test]
    fn garbage_is_deterministic_and_never_panics() {
        for text in [
            "",
            "\\",
            "RUN <<",
            "FROM",
            "\u{feff}FROM x\\",
            "# escape=`\n`",
            "ÿ\u{0}",
        ] {
            assert_eq!(instructions(text), instructions(text));
            let _ = fingerprint(&instructions(text));
        }
    }
}
