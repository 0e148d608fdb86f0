//! gRPC framing and the few protobuf fields the router reads (Solve, Status, history, workers).
//!
//! Decoders walk the protobuf wire format directly and borrow from the message bytes, so peeking
//! at a request costs no copies. Unknown fields are skipped, never rejected: newer clients add
//! fields.
// INTERFACE OWNED BY THE wire/classify HELPER: bodies are filled in there; signatures are relied on
// by router.rs, pool.rs and placement/.

use bytes::Bytes;

/// Length of the gRPC message prefix: 1 byte compressed flag + 4 bytes big-endian length.
pub const GRPC_PREFIX_LEN: usize = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated protobuf: {0}")]
    Truncated(&'static str),
    #[error("malformed protobuf: {0}")]
    Malformed(&'static str),
    #[error("field {field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("compressed gRPC messages are not supported (compressed flag set)")]
    Compressed,
    #[error("gRPC message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid gRPC compressed flag {0}")]
    BadFlag(u8),
}

/// The 5-byte prefix of one gRPC message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub compressed: bool,
    pub len: usize,
}

/// Parses a gRPC message prefix. `Ok(None)` when fewer than 5 bytes are available.
pub fn parse_frame_header(buf: &[u8], max_len: usize) -> Result<Option<FrameHeader>, WireError> {
    let _ = (buf, max_len);
    todo!()
}

/// Frames one message: prefix + payload.
pub fn encode_frame(msg: &[u8]) -> Bytes {
    let _ = msg;
    todo!()
}

/// One exporter or cache entry: a type and its attributes (wire order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypedAttrs<'a> {
    pub kind: &'a str,
    pub attrs: Vec<(&'a str, &'a str)>,
}

/// What routing and placement read from `moby.buildkit.v1.SolveRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SolveInfo<'a> {
    /// Field 1 `Ref`.
    pub build_ref: &'a str,
    /// Field 5 `Session`.
    pub session: &'a str,
    /// Field 15 `SourcePolicySession`.
    pub source_policy_session: &'a str,
    /// Field 6 `Frontend` (empty for buildctl/buildx, which run the frontend client-side).
    pub frontend: &'a str,
    /// Field 11 `Internal` (buildx's probe build).
    pub internal: bool,
    /// Field 7 `FrontendAttrs`, wire order.
    pub frontend_attrs: Vec<(&'a str, &'a str)>,
    /// Field 13 `Exporters`; when empty, fields 3/4 (deprecated single exporter) are reported here.
    pub exporters: Vec<TypedAttrs<'a>>,
    /// Field 8 `Cache` -> 4 `Exports`.
    pub cache_exports: Vec<TypedAttrs<'a>>,
    /// Field 8 `Cache` -> 5 `Imports`.
    pub cache_imports: Vec<TypedAttrs<'a>>,
}

impl<'a> SolveInfo<'a> {
    /// Every session id the build names: `Session`, `SourcePolicySession` and the values of
    /// `FrontendAttrs["local-sessionid:*"]`, non-empty, de-duplicated, in that order.
    pub fn session_ids(&self) -> Vec<&'a str> {
        todo!()
    }

    /// The value of a frontend attribute, if present.
    pub fn frontend_attr(&self, key: &str) -> Option<&'a str> {
        let _ = key;
        todo!()
    }
}

/// Decodes a SolveRequest message (without the gRPC prefix).
pub fn decode_solve(msg: &[u8]) -> Result<SolveInfo<'_>, WireError> {
    let _ = msg;
    todo!()
}

/// `StatusRequest.Ref` (field 1).
pub fn decode_status_ref(msg: &[u8]) -> Result<&str, WireError> {
    let _ = msg;
    todo!()
}

/// What routing reads from `BuildHistoryRequest` (ListenBuildHistory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryRequestInfo<'a> {
    pub active_only: bool,
    pub build_ref: &'a str,
    pub early_exit: bool,
}

/// Decodes a `BuildHistoryRequest`.
pub fn decode_history_request(msg: &[u8]) -> Result<HistoryRequestInfo<'_>, WireError> {
    let _ = msg;
    todo!()
}

/// `UpdateBuildHistoryRequest.Ref` (field 1).
pub fn decode_update_history_ref(msg: &[u8]) -> Result<&str, WireError> {
    let _ = msg;
    todo!()
}

/// Platforms of every worker in a `ListWorkersResponse`, as `os/arch[/variant]`, de-duplicated.
pub fn decode_worker_platforms(msg: &[u8]) -> Result<Vec<String>, WireError> {
    let _ = msg;
    todo!()
}

/// `grpc.health.v1.HealthCheckResponse.status` (field 1; 1 = SERVING).
pub fn decode_health_status(msg: &[u8]) -> Result<i32, WireError> {
    let _ = msg;
    todo!()
}
