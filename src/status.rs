//! `buildkit-router status`: a running router's `/status`, as a table.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::config::StatusArgs;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Fetches `/status` from the admin address and prints it.
pub async fn print(args: StatusArgs) -> Result<(), BoxError> {
    let body = fetch(&args.admin).await?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    print!("{}", render(&doc));
    Ok(())
}

async fn fetch(admin: &str) -> Result<String, BoxError> {
    // `http://host:port/` is accepted as well as `host:port`.
    let admin = admin.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| format!("cannot reach the router's admin endpoint {admin}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::get("/status")
        .header("host", admin)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        return Err(format!("{admin}/status answered {}", response.status()).into());
    }
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Renders a `/status` document as two aligned tables.
pub fn render(doc: &serde_json::Value) -> String {
    let str_of = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let mut out = String::new();
    let backends: Vec<Vec<String>> = doc["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            [
                "identity",
                "address",
                "state",
                "active_builds",
                "capacity",
                "platforms",
            ]
            .iter()
            .map(|k| str_of(&b[*k]))
            .collect()
        })
        .collect();
    out.push_str(&table(
        &[
            "BACKEND",
            "ADDRESS",
            "STATE",
            "ACTIVE",
            "CAPACITY",
            "PLATFORMS",
        ],
        &backends,
    ));
    out.push('\n');
    let builds: Vec<Vec<String>> = doc["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            vec![
                str_of(&b["build_ref"]),
                str_of(&b["backend"]),
                format!("{:.0}s", b["age_seconds"].as_f64().unwrap_or(0.0)),
                str_of(&b["reason"]),
                str_of(&b["rank"]),
                str_of(&b["key_source"]),
                str_of(&b["key_hash"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "BUILD",
            "BACKEND",
            "AGE",
            "REASON",
            "RANK",
            "KEY SOURCE",
            "KEY HASH",
        ],
        &builds,
    ));
    out.push_str(&format!(
        "\nqueued: {}\n",
        doc["builds_queued"].as_i64().unwrap_or(0)
    ));
    out
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_backends_and_builds() {
        let doc = serde_json::json!({
            "synced": true,
            "backends": [{"identity": "buildkitd-0", "address": "tcp://10.0.0.5:1234", "state": "ready",
                          "active_builds": 2, "capacity": null, "platforms": ["linux/amd64"]}],
            "builds": [{"build_ref": "abc", "backend": "buildkitd-0", "age_seconds": 12.4, "reason": "affinity",
                        "rank": 0, "key_source": "vcs", "key_hash": "1f2e"}],
            "builds_queued": 0
        });
        let text = render(&doc);
        assert!(
            text.contains("buildkitd-0  tcp://10.0.0.5:1234  ready"),
            "{text}"
        );
        assert!(text.contains("abc    buildkitd-0  12s  affinity"), "{text}");
        assert!(text.contains("queued: 0"));
    }
}
