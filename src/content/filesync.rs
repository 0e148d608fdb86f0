//! Reading one file from a build client through its own FileSync service, as the daemon does.
//!
//! `/moby.filesync.v1.FileSync/DiffCopy` is a bidi stream of fsutil `types.Packet`s (buildkit
//! v0.32.2 `session/filesync`, fsutil `send.go`/`receive.go`). The client (the sender) walks the
//! directory named by the `dir-name` header, filtered by the `followpaths` (and include/exclude
//! pattern) headers, and sends one STAT packet per entry then an empty STAT; the receiver asks
//! for files by their index in that listing (REQ), the client sends each one as DATA packets
//! ending with an empty one, and the receiver ends with FIN, which the client answers with FIN
//! and an OK status. The router is the receiver here, on a stream of its own next to the
//! daemon's (a client serves any number of DiffCopy calls), so nothing the daemon receives
//! changes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request};
use prost::Message;

use crate::grpc::{grpc_message_of, grpc_status_of};
use crate::proto::filesync::{Packet, Stat};
use crate::wire::{encode_frame, MessageSplitter, WireError, GRPC_PREFIX_LEN};

/// The method the router calls, as listed in `x-docker-expose-session-grpc-method`.
pub const DIFFCOPY: &str = "/moby.filesync.v1.FileSync/DiffCopy";

const PACKET_STAT: i32 = 0;
const PACKET_REQ: i32 = 1;
const PACKET_DATA: i32 = 2;
const PACKET_FIN: i32 = 3;
const PACKET_ERR: i32 = 4;

/// Go's `os.ModeType`: directory, symlink, device, pipe, socket, char device, irregular. Only
/// entries without these bits carry data (fsutil `fileCanRequestData`).
const GO_MODE_TYPE: u32 =
    (1 << 31) | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19);
const GO_MODE_SYMLINK: u32 = 1 << 27;

/// How long the client gets to end the call after the router has its file (FIN answered,
/// status OK); the read itself is already over, placement does not wait for this.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// One file to read from a client's local directory.
#[derive(Debug, Clone)]
pub struct FileRequest {
    /// The local's name (`dir-name`): `dockerfile` unless the build renames it.
    pub local: String,
    /// `followpaths`, as the daemon sends them for this local.
    pub follow_paths: Vec<String>,
    /// The file to read, then fallbacks (BuildKit also accepts `dockerfile` for `Dockerfile`).
    pub wanted: Vec<String>,
    /// Largest file accepted, in bytes.
    pub max_bytes: usize,
    /// Sent as `grpc-timeout`, so the client stops serving the call when the router has given up.
    pub timeout: Duration,
}

/// The file read.
#[derive(Debug, Clone)]
pub struct FileRead {
    /// Its path in the local (as the client listed it).
    pub path: String,
    pub data: Bytes,
}

/// Why a read failed. [`ReadError::kind`] is the bounded label for metrics.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the client's inner HTTP/2 connection cannot take a stream: {0}")]
    Connection(h2::Error),
    #[error("the client refused FileSync/DiffCopy of {local:?}: status {code}: {message}")]
    Refused {
        local: String,
        code: u32,
        message: String,
    },
    #[error("the client answered FileSync/DiffCopy with HTTP status {0}")]
    HttpStatus(http::StatusCode),
    #[error("the client reported an error while listing {local:?}: {message}")]
    Sender { local: String, message: String },
    #[error("{wanted:?} is not a regular file in the client's {local:?} directory")]
    NotFound { local: String, wanted: Vec<String> },
    #[error("{path} is {size} bytes, over the {limit} byte limit")]
    TooLarge {
        path: String,
        size: u64,
        limit: usize,
    },
    #[error("malformed FileSync stream: {0}")]
    Malformed(String),
    #[error("the FileSync stream failed: {0}")]
    Stream(h2::Error),
    #[error("the client ended the FileSync stream before the file was read")]
    Ended,
    #[error("a followpaths entry cannot be sent as a header: {0:?}")]
    BadPath(String),
}

impl ReadError {
    /// A bounded label: `refused`, `not_found`, `too_large`, `malformed`, `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Refused { .. } | ReadError::HttpStatus(_) | ReadError::Sender { .. } => {
                "refused"
            }
            ReadError::NotFound { .. } => "not_found",
            ReadError::TooLarge { .. } => "too_large",
            ReadError::Malformed(_) | ReadError::BadPath(_) => "malformed",
            ReadError::Connection(_) | ReadError::Stream(_) | ReadError::Ended => "failed",
        }
    }
}

impl From<WireError> for ReadError {
    fn from(e: WireError) -> Self {
        ReadError::Malformed(e.to_string())
    }
}

/// `url.QueryEscape` of Go, which BuildKit applies to every value of a metadata key holding a
/// non-ASCII value (and then sends `<key>-encoded: 1`): all but `A-Za-z0-9-_.~` is escaped
/// (`%20` for a blank, which `url.QueryUnescape` reads back as Go's `+` would be).
const QUERY_ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The request head, with the metadata the daemon's local source sends (`session/filesync`
/// `FSSync`: `dir-name`, `followpaths`; no include or exclude patterns for the Dockerfile).
fn request_head(req: &FileRequest) -> Result<Request<()>, ReadError> {
    let mut builder = Request::post(format!("http://localhost{DIFFCOPY}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(
            http::header::USER_AGENT,
            concat!("buildkit-router/", env!("CARGO_PKG_VERSION")),
        )
        .header(
            "grpc-timeout",
            format!("{}m", req.timeout.as_millis().clamp(1, 99_999_999)),
        );
    let encode = req.follow_paths.iter().any(|p| !p.is_ascii());
    for path in &req.follow_paths {
        let value = if encode {
            percent_encoding::utf8_percent_encode(path, QUERY_ESCAPE).to_string()
        } else {
            path.clone()
        };
        let value = HeaderValue::from_str(&value).map_err(|_| ReadError::BadPath(path.clone()))?;
        builder = builder.header("followpaths", value);
    }
    if encode {
        builder = builder.header("followpaths-encoded", "1");
    }
    let local = if req.local.is_ascii() {
        req.local.clone()
    } else {
        percent_encoding::utf8_percent_encode(&req.local, QUERY_ESCAPE).to_string()
    };
    builder = builder.header(
        "dir-name",
        HeaderValue::from_str(&local).map_err(|_| ReadError::BadPath(req.local.clone()))?,
    );
    if !req.local.is_ascii() {
        builder = builder.header("dir-name-encoded", "1");
    }
    builder
        .body(())
        .map_err(|e| ReadError::Malformed(e.to_string()))
}

fn packet_frame(kind: i32, id: u32) -> Bytes {
    encode_frame(
        &Packet {
            r#type: kind,
            id,
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// Reads packets off the client's answer.
struct Packets {
    body: h2::RecvStream,
    split: MessageSplitter,
    /// Largest packet accepted (fsutil sends file data in 32 KiB packets, stats are small).
    max_packet: usize,
}

impl Packets {
    async fn next(&mut self) -> Result<Option<Packet>, ReadError> {
        loop {
            if let Some(frame) = self.split.next_message(self.max_packet)? {
                if frame[0] != 0 {
                    return Err(ReadError::Malformed("compressed packet".into()));
                }
                return Packet::decode(&frame[GRPC_PREFIX_LEN..])
                    .map(Some)
                    .map_err(|e| ReadError::Malformed(format!("packet: {e}")));
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.split.push(&chunk);
                }
                Some(Err(e)) => return Err(ReadError::Stream(e)),
                None => {
                    return if self.split.is_empty() {
                        Ok(None)
                    } else {
                        Err(ReadError::Malformed("truncated packet".into()))
                    }
                }
            }
        }
    }

    /// The call's status once the body is over (`None` without trailers).
    async fn status(&mut self) -> Option<(u32, String)> {
        let trailers = self.body.trailers().await.ok().flatten()?;
        Some((grpc_status_of(&trailers)?, grpc_message_of(&trailers)))
    }
}

/// `./a//b` -> `a/b`: fsutil lists clean relative paths with forward slashes.
fn clean_path(p: &str) -> String {
    p.split(['/', '\\'])
        .filter(|s| !s.is_empty() && *s != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Where a symlink in the listing points, as a clean path in the same local.
fn link_target(entry: &str, link: &str) -> String {
    if link.starts_with('/') {
        return clean_path(link);
    }
    let dir = entry.rsplit_once('/').map_or("", |(d, _)| d);
    let mut parts: Vec<&str> = dir.split('/').filter(|s| !s.is_empty()).collect();
    for seg in link.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

/// Reads the first of `req.wanted` found in the client's local through `client`. The caller
/// bounds it in time; dropping the future resets the stream (the client sees CANCEL).
pub async fn read_file(
    client: h2::client::SendRequest<Bytes>,
    req: &FileRequest,
) -> Result<FileRead, ReadError> {
    let head = request_head(req)?;
    let mut client = client.ready().await.map_err(ReadError::Connection)?;
    let (response, mut send) = client
        .send_request(head, false)
        .map_err(ReadError::Connection)?;
    drop(client);
    let response = response.await.map_err(ReadError::Stream)?;
    let (head, body) = response.into_parts();
    if let Some(code) = grpc_status_of(&head.headers) {
        // Trailers-Only: `no access allowed to dir "dockerfile"` (NotFound) and the like.
        return Err(ReadError::Refused {
            local: req.local.clone(),
            code,
            message: grpc_message_of(&head.headers),
        });
    }
    if head.status != http::StatusCode::OK {
        return Err(ReadError::HttpStatus(head.status));
    }
    let mut packets = Packets {
        body,
        split: MessageSplitter::default(),
        max_packet: req.max_bytes.max(64 << 10) + 1024,
    };

    // The listing: entry i has ID i.
    let mut entries: Vec<Stat> = Vec::new();
    loop {
        let Some(p) = packets.next().await? else {
            return Err(ended_status(&mut packets, &req.local).await);
        };
        match p.r#type {
            PACKET_STAT if p.stat.is_empty() => break,
            PACKET_STAT => {
                let stat = Stat::decode(p.stat.as_slice())
                    .map_err(|e| ReadError::Malformed(format!("stat: {e}")))?;
                if entries.len() >= 4096 {
                    return Err(ReadError::Malformed(
                        "more than 4096 entries listed for a Dockerfile read".into(),
                    ));
                }
                entries.push(stat);
            }
            PACKET_ERR => {
                return Err(ReadError::Sender {
                    local: req.local.clone(),
                    message: String::from_utf8_lossy(&p.data).into_owned(),
                })
            }
            t => {
                return Err(ReadError::Malformed(format!(
                    "packet type {t} in the listing"
                )))
            }
        }
    }
    let find = |path: &str| entries.iter().position(|s| clean_path(&s.path) == path);
    let chosen = req.wanted.iter().find_map(|w| {
        let mut index = find(&clean_path(w))?;
        // A symlinked Dockerfile: followpaths lists its target too.
        if entries[index].mode & GO_MODE_SYMLINK != 0 {
            index = find(&link_target(&entries[index].path, &entries[index].linkname))?;
        }
        (entries[index].mode & GO_MODE_TYPE == 0).then_some(index)
    });
    let Some(index) = chosen else {
        finish(send, packets);
        return Err(ReadError::NotFound {
            local: req.local.clone(),
            wanted: req.wanted.clone(),
        });
    };
    let stat = &entries[index];
    let size = u64::try_from(stat.size).unwrap_or(0);
    if size > req.max_bytes as u64 {
        finish(send, packets);
        return Err(ReadError::TooLarge {
            path: stat.path.clone(),
            size,
            limit: req.max_bytes,
        });
    }
    let id = u32::try_from(index).expect("at most 4096 entries");
    send.send_data(packet_frame(PACKET_REQ, id), false)
        .map_err(ReadError::Stream)?;

    let mut data = BytesMut::with_capacity(size as usize);
    loop {
        let Some(p) = packets.next().await? else {
            return Err(ended_status(&mut packets, &req.local).await);
        };
        match p.r#type {
            PACKET_DATA if p.id == id && p.data.is_empty() => break,
            PACKET_DATA if p.id == id => {
                if data.len() + p.data.len() > req.max_bytes {
                    finish(send, packets);
                    return Err(ReadError::TooLarge {
                        path: stat.path.clone(),
                        size: (data.len() + p.data.len()) as u64,
                        limit: req.max_bytes,
                    });
                }
                data.extend_from_slice(&p.data);
            }
            PACKET_ERR => {
                return Err(ReadError::Sender {
                    local: req.local.clone(),
                    message: String::from_utf8_lossy(&p.data).into_owned(),
                })
            }
            PACKET_DATA => {}
            t => {
                return Err(ReadError::Malformed(format!(
                    "packet type {t} in file data"
                )))
            }
        }
    }
    let read = FileRead {
        path: stat.path.clone(),
        data: data.freeze(),
    };
    finish(send, packets);
    Ok(read)
}

/// Why the client's answer ended early: its status if it sent one.
async fn ended_status(packets: &mut Packets, local: &str) -> ReadError {
    match packets.status().await {
        Some((code, message)) if code != 0 => ReadError::Refused {
            local: local.to_owned(),
            code,
            message,
        },
        _ => ReadError::Ended,
    }
}

/// Ends the call as the daemon does: FIN (the client answers FIN and ends with OK). The rest of
/// the answer is read in the background, so the client's handler ends cleanly rather than on a
/// reset, without holding up placement.
fn finish(mut send: h2::SendStream<Bytes>, mut packets: Packets) {
    if send.send_data(packet_frame(PACKET_FIN, 0), true).is_err() {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Ok(Some(_)) = packets.next().await {}
            let _ = packets.status().await;
        })
        .await;
        drop(send);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_the_daemons_metadata() {
        let req = FileRequest {
            local: "dockerfile".into(),
            follow_paths: vec![
                "Dockerfile".into(),
                "Dockerfile.dockerignore".into(),
                "dockerfile".into(),
            ],
            wanted: vec!["Dockerfile".into()],
            max_bytes: 1024,
            timeout: Duration::from_millis(500),
        };
        let head = request_head(&req).unwrap();
        assert_eq!(head.uri().path(), DIFFCOPY);
        let h = head.headers();
        assert_eq!(h["dir-name"], "dockerfile");
        let follow: Vec<_> = h.get_all("followpaths").iter().collect();
        assert_eq!(
            follow,
            ["Dockerfile", "Dockerfile.dockerignore", "dockerfile"]
        );
        assert!(h.get("followpaths-encoded").is_none());
        assert_eq!(h["grpc-timeout"], "500m");
        assert_eq!(h["content-type"], "application/grpc");
    }

    #[test]
    fn non_ascii_paths_are_query_escaped_as_buildkit_does() {
        let req = FileRequest {
            local: "dockerfile".into(),
            follow_paths: vec!["dé p/Dockerfile".into(), "a b".into()],
            wanted: vec![],
            max_bytes: 1,
            timeout: Duration::from_secs(1),
        };
        let head = request_head(&req).unwrap();
        let follow: Vec<_> = head.headers().get_all("followpaths").iter().collect();
        // Every value of the key is escaped once one needs it (encodeStringForHeader).
        assert_eq!(follow, ["d%C3%A9%20p%2FDockerfile", "a%20b"]);
        assert_eq!(head.headers()["followpaths-encoded"], "1");
    }

    #[test]
    fn paths_and_links() {
        assert_eq!(clean_path("./a//b/"), "a/b");
        assert_eq!(
            link_target("Dockerfile", "docker/Dockerfile"),
            "docker/Dockerfile"
        );
        assert_eq!(link_target("a/Dockerfile", "../b/D"), "b/D");
        assert_eq!(link_target("a/Dockerfile", "/x/D"), "x/D");
    }
}
