//! gRPC framing and the few protobuf fields the router reads (Solve, Status, history, workers).
//!
//! Decoders walk the protobuf wire format directly and borrow from the message bytes, so peeking
//! at a request costs no copies. Unknown fields are skipped, never rejected: newer clients add
//! fields.
//!
//! A known field that arrives with an unexpected wire type is skipped as unknown, as Go's protobuf
//! runtime (buildkitd) does, so the router reads a request the way the daemon will. Groups (wire
//! types 3 and 4) are rejected: no BuildKit message uses them, and Go rejects them in proto3.
//!
//! Every decoder returns a [`WireError`] on malformed input and never panics or allocates in
//! proportion to a length it has not yet checked against the bytes actually present.

use bytes::{BufMut, Bytes, BytesMut};

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
///
/// A set compressed flag is reported, not rejected: the caller decides (forwarding is fine,
/// decoding is not).
pub fn parse_frame_header(buf: &[u8], max_len: usize) -> Result<Option<FrameHeader>, WireError> {
    let Some(prefix) = buf.get(..GRPC_PREFIX_LEN) else {
        return Ok(None);
    };
    let compressed = match prefix[0] {
        0 => false,
        1 => true,
        flag => return Err(WireError::BadFlag(flag)),
    };
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max_len {
        return Err(WireError::TooLarge { len, max: max_len });
    }
    Ok(Some(FrameHeader { compressed, len }))
}

/// Frames one message: prefix + payload.
///
/// # Panics
/// If `msg` is 4 GiB or longer, which the gRPC prefix cannot express (messages here are capped
/// far below that).
pub fn encode_frame(msg: &[u8]) -> Bytes {
    let len = u32::try_from(msg.len()).expect("gRPC message of 4 GiB or more cannot be framed");
    let mut out = BytesMut::with_capacity(GRPC_PREFIX_LEN + msg.len());
    out.put_u8(0);
    out.put_u32(len);
    out.put_slice(msg);
    out.freeze()
}

/// One exporter or cache entry: a type and its attributes (wire order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypedAttrs<'a> {
    pub kind: &'a str,
    pub attrs: Vec<(&'a str, &'a str)>,
}

impl<'a> TypedAttrs<'a> {
    /// The value of an attribute, if present. A key repeated on the wire takes its last value,
    /// as a protobuf map does.
    pub fn attr(&self, key: &str) -> Option<&'a str> {
        lookup(&self.attrs, key)
    }
}

/// What routing and placement read from `moby.buildkit.v1.SolveRequest`.
///
/// Map fields keep every entry in wire order, duplicates included; the lookup helpers return the
/// last value of a key, which is what the daemon's map ends up holding.
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

/// Prefix of the FrontendAttrs keys that name extra sessions (bake's shared local context).
const LOCAL_SESSION_PREFIX: &str = "local-sessionid:";

impl<'a> SolveInfo<'a> {
    /// Every session id the build names: `Session`, `SourcePolicySession` and the values of
    /// `FrontendAttrs["local-sessionid:*"]`, non-empty, de-duplicated, in that order.
    pub fn session_ids(&self) -> Vec<&'a str> {
        let mut ids: Vec<&'a str> = Vec::with_capacity(4);
        let attrs = self
            .frontend_attrs
            .iter()
            .filter(|(k, _)| k.starts_with(LOCAL_SESSION_PREFIX))
            .map(|&(_, v)| v);
        for id in [self.session, self.source_policy_session]
            .into_iter()
            .chain(attrs)
        {
            // Linear scan: a build names a handful of sessions.
            if !id.is_empty() && !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// The value of a frontend attribute, if present.
    pub fn frontend_attr(&self, key: &str) -> Option<&'a str> {
        lookup(&self.frontend_attrs, key)
    }

    /// Image names the build exports: the `name` attribute of every exporter, split on commas
    /// (`name=a,b` pushes both), non-empty, in wire order.
    pub fn image_names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.exporters
            .iter()
            .filter_map(|e| e.attr("name"))
            .flat_map(|names| names.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
    }

    /// The `ref` attribute of every registry cache import, then of every registry cache export.
    pub fn registry_cache_refs(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.cache_imports
            .iter()
            .chain(&self.cache_exports)
            .filter(|c| c.kind == "registry")
            .filter_map(|c| c.attr("ref"))
            .filter(|r| !r.is_empty())
    }
}

fn lookup<'a>(attrs: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    attrs.iter().rev().find(|(k, _)| *k == key).map(|&(_, v)| v)
}

/// Decodes a SolveRequest message (without the gRPC prefix).
pub fn decode_solve(msg: &[u8]) -> Result<SolveInfo<'_>, WireError> {
    let mut info = SolveInfo::default();
    let mut exporter_deprecated = "";
    let mut fields = Fields::new(msg);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (1, Value::Len(b)) => info.build_ref = utf8(b, "SolveRequest.Ref")?,
            (3, Value::Len(b)) => exporter_deprecated = utf8(b, "SolveRequest.ExporterDeprecated")?,
            (5, Value::Len(b)) => info.session = utf8(b, "SolveRequest.Session")?,
            (6, Value::Len(b)) => info.frontend = utf8(b, "SolveRequest.Frontend")?,
            (7, Value::Len(b)) => info.frontend_attrs.push(map_entry(
                b,
                "SolveRequest.FrontendAttrs.key",
                "SolveRequest.FrontendAttrs.value",
            )?),
            // A message field seen twice is merged; its repeated fields concatenate.
            (8, Value::Len(b)) => decode_cache_options(b, &mut info)?,
            (11, Value::Varint(v)) => info.internal = v != 0,
            (13, Value::Len(b)) => info.exporters.push(typed_attrs(
                b,
                "Exporter.Type",
                "Exporter.Attrs.key",
                "Exporter.Attrs.value",
            )?),
            (15, Value::Len(b)) => {
                info.source_policy_session = utf8(b, "SolveRequest.SourcePolicySession")?
            }
            _ => {}
        }
    }
    // Older clients fill only the deprecated pair; newer ones fill both (then 13 is the truth).
    // Field 4 is read only then, in a second walk, so the common case allocates nothing for it.
    if info.exporters.is_empty() && !exporter_deprecated.is_empty() {
        let mut attrs = Vec::new();
        let mut fields = Fields::new(msg);
        while let Some((number, value)) = fields.next_field()? {
            if let (4, Value::Len(b)) = (number, value) {
                attrs.push(map_entry(
                    b,
                    "SolveRequest.ExporterAttrsDeprecated.key",
                    "SolveRequest.ExporterAttrsDeprecated.value",
                )?);
            }
        }
        info.exporters.push(TypedAttrs {
            kind: exporter_deprecated,
            attrs,
        });
    }
    Ok(info)
}

/// `CacheOptions`: 4 `Exports`, 5 `Imports`; the deprecated 1-3 are not read.
fn decode_cache_options<'a>(msg: &'a [u8], info: &mut SolveInfo<'a>) -> Result<(), WireError> {
    let mut fields = Fields::new(msg);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (4, Value::Len(b)) => info.cache_exports.push(typed_attrs(
                b,
                "CacheOptionsEntry.Type",
                "CacheOptionsEntry.Attrs.key",
                "CacheOptionsEntry.Attrs.value",
            )?),
            (5, Value::Len(b)) => info.cache_imports.push(typed_attrs(
                b,
                "CacheOptionsEntry.Type",
                "CacheOptionsEntry.Attrs.key",
                "CacheOptionsEntry.Attrs.value",
            )?),
            _ => {}
        }
    }
    Ok(())
}

/// `Exporter` and `CacheOptionsEntry` share a shape: 1 `Type`, 2 `Attrs` map.
fn typed_attrs<'a>(
    msg: &'a [u8],
    kind_name: &'static str,
    key_name: &'static str,
    value_name: &'static str,
) -> Result<TypedAttrs<'a>, WireError> {
    let mut out = TypedAttrs::default();
    let mut fields = Fields::new(msg);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (1, Value::Len(b)) => out.kind = utf8(b, kind_name)?,
            (2, Value::Len(b)) => out.attrs.push(map_entry(b, key_name, value_name)?),
            _ => {}
        }
    }
    Ok(out)
}

/// One `map<string,string>` entry: key = 1, value = 2; a missing one is the empty string.
fn map_entry<'a>(
    msg: &'a [u8],
    key_name: &'static str,
    value_name: &'static str,
) -> Result<(&'a str, &'a str), WireError> {
    let (mut key, mut value) = ("", "");
    let mut fields = Fields::new(msg);
    while let Some((number, field)) = fields.next_field()? {
        match (number, field) {
            (1, Value::Len(b)) => key = utf8(b, key_name)?,
            (2, Value::Len(b)) => value = utf8(b, value_name)?,
            _ => {}
        }
    }
    Ok((key, value))
}

/// A single string field of a message, last occurrence winning; empty when absent.
fn single_string<'a>(msg: &'a [u8], number: u32, name: &'static str) -> Result<&'a str, WireError> {
    let mut out = "";
    let mut fields = Fields::new(msg);
    while let Some((n, value)) = fields.next_field()? {
        if let (true, Value::Len(b)) = (n == number, value) {
            out = utf8(b, name)?;
        }
    }
    Ok(out)
}

/// The `Ref` (field 1) of a `SolveRequest` of which only the first bytes were read (`read`: the
/// gRPC prefix and the start of the message, as far as it got). Go's protobuf writes fields in
/// number order, so a Solve from buildctl or buildx starts with its ref; `None` when the ref is
/// not first, not whole in `read`, or not UTF-8, and when the message is compressed or the
/// field lies past the length its prefix declares (bytes of a next message are not this one's).
pub fn leading_solve_ref(read: &[u8]) -> Option<&str> {
    let header = parse_frame_header(read, usize::MAX).ok().flatten()?;
    if header.compressed {
        return None;
    }
    let message = read.get(GRPC_PREFIX_LEN..)?;
    let message = &message[..message.len().min(header.len)];
    match Fields::new(message).next_field() {
        Ok(Some((1, Value::Len(b)))) if !b.is_empty() => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// `StatusRequest.Ref` (field 1).
pub fn decode_status_ref(msg: &[u8]) -> Result<&str, WireError> {
    single_string(msg, 1, "StatusRequest.Ref")
}

/// What routing reads from `BuildHistoryRequest` (ListenBuildHistory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryRequestInfo<'a> {
    pub active_only: bool,
    pub build_ref: &'a str,
    pub early_exit: bool,
}

/// `BuildHistoryEventType.STARTED` (`COMPLETE` is 1, `DELETED` 2).
pub const HISTORY_STARTED: u64 = 0;

/// A `BuildHistoryEvent`'s type (field 1) and its record's `Ref` (field 2, then 1).
pub fn decode_history_event(msg: &[u8]) -> Result<(u64, &str), WireError> {
    let (mut kind, mut build_ref) = (HISTORY_STARTED, "");
    let mut fields = Fields::new(msg);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (1, Value::Varint(v)) => kind = v,
            (2, Value::Len(record)) => {
                build_ref = single_string(record, 1, "BuildHistoryRecord.Ref")?;
            }
            _ => {}
        }
    }
    Ok((kind, build_ref))
}

/// Decodes a `BuildHistoryRequest`.
pub fn decode_history_request(msg: &[u8]) -> Result<HistoryRequestInfo<'_>, WireError> {
    let mut info = HistoryRequestInfo::default();
    let mut fields = Fields::new(msg);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (1, Value::Varint(v)) => info.active_only = v != 0,
            (2, Value::Len(b)) => info.build_ref = utf8(b, "BuildHistoryRequest.Ref")?,
            (3, Value::Varint(v)) => info.early_exit = v != 0,
            _ => {}
        }
    }
    Ok(info)
}

/// `UpdateBuildHistoryRequest.Ref` (field 1).
pub fn decode_update_history_ref(msg: &[u8]) -> Result<&str, WireError> {
    single_string(msg, 1, "UpdateBuildHistoryRequest.Ref")
}

/// Platforms of every worker in a `ListWorkersResponse`, as `os/arch[/variant]`, de-duplicated.
///
/// Order is first appearance. A platform without an OS or an architecture is left out: it could
/// never match a build's `platform=` request. No normalisation (e.g. `arm64/v8` vs `arm64`) is
/// done here; buildkitd already reports normalised platforms.
pub fn decode_worker_platforms(msg: &[u8]) -> Result<Vec<String>, WireError> {
    let mut out: Vec<String> = Vec::new();
    let mut records = Fields::new(msg);
    while let Some((number, value)) = records.next_field()? {
        let (1, Value::Len(record)) = (number, value) else {
            continue;
        };
        let mut record_fields = Fields::new(record);
        while let Some((number, value)) = record_fields.next_field()? {
            let (3, Value::Len(platform)) = (number, value) else {
                continue;
            };
            let (mut arch, mut os, mut variant) = ("", "", "");
            let mut platform_fields = Fields::new(platform);
            while let Some((number, value)) = platform_fields.next_field()? {
                match (number, value) {
                    (1, Value::Len(b)) => arch = utf8(b, "Platform.Architecture")?,
                    (2, Value::Len(b)) => os = utf8(b, "Platform.OS")?,
                    (3, Value::Len(b)) => variant = utf8(b, "Platform.Variant")?,
                    _ => {}
                }
            }
            if os.is_empty() || arch.is_empty() {
                continue;
            }
            let mut name = String::with_capacity(os.len() + arch.len() + variant.len() + 2);
            name.push_str(os);
            name.push('/');
            name.push_str(arch);
            if !variant.is_empty() {
                name.push('/');
                name.push_str(variant);
            }
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// `grpc.health.v1.HealthCheckResponse.status` (field 1; 1 = SERVING).
pub fn decode_health_status(msg: &[u8]) -> Result<i32, WireError> {
    let mut status = 0;
    let mut fields = Fields::new(msg);
    while let Some((number, value)) = fields.next_field()? {
        if let (1, Value::Varint(v)) = (number, value) {
            // Enums are int32 on the wire, sign-extended to 64 bits when negative: truncate.
            status = v as i32;
        }
    }
    Ok(status)
}

// ---------------------------------------------------------------------------------------------
// The wire walker.

/// One field's payload, borrowed from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value<'a> {
    Varint(u64),
    I64(u64),
    I32(u32),
    Len(&'a [u8]),
}

/// Iterates the fields of one message, outer level only (nested messages are `Value::Len`).
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Largest field number protobuf allows (2^29 - 1).
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// The next field, or `None` at the end of the message.
    #[inline]
    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, WireError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint("field key")?;
        let number = key >> 3;
        if number == 0 {
            return Err(WireError::Malformed("field number 0"));
        }
        if number > MAX_FIELD_NUMBER {
            return Err(WireError::Malformed("field number out of range"));
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint("varint field")?),
            1 => Value::I64(u64::from_le_bytes(self.fixed::<8>()?)),
            2 => {
                let len = self.varint("length prefix")?;
                let rest = self.buf.len() - self.pos;
                // Compare as u64 so a huge length cannot wrap on 32-bit targets.
                if len > rest as u64 {
                    return Err(WireError::Truncated(
                        "length-delimited field runs past the end",
                    ));
                }
                let start = self.pos;
                self.pos += len as usize;
                Value::Len(&self.buf[start..self.pos])
            }
            3 | 4 => return Err(WireError::Malformed("group wire type is not supported")),
            5 => Value::I32(u32::from_le_bytes(self.fixed::<4>()?)),
            _ => return Err(WireError::Malformed("invalid wire type")),
        };
        Ok(Some((number as u32, value)))
    }

    #[inline]
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let bytes = self
            .buf
            .get(self.pos..)
            .and_then(|rest| rest.get(..N))
            .ok_or(WireError::Truncated("fixed-width field"))?;
        self.pos += N;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// A base-128 varint of at most 10 bytes whose value fits in 64 bits.
    #[inline]
    fn varint(&mut self, what: &'static str) -> Result<u64, WireError> {
        // Fast path: tags and short lengths are one byte.
        match self.buf.get(self.pos) {
            Some(&b) if b < 0x80 => {
                self.pos += 1;
                return Ok(u64::from(b));
            }
            None => return Err(WireError::Truncated(what)),
            Some(_) => {}
        }
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos + i) else {
                return Err(WireError::Truncated(what));
            };
            // The 10th byte holds bit 63 only; anything more overflows 64 bits.
            if i == 9 && b > 1 {
                return Err(WireError::Malformed("varint overflows 64 bits"));
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.pos += i + 1;
                return Ok(value);
            }
        }
        Err(WireError::Malformed("varint longer than 10 bytes"))
    }
}

fn utf8<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| WireError::InvalidUtf8 { field })
}

/// Splits a byte stream into whole framed gRPC messages (prefix included).
#[derive(Debug, Default)]
pub struct MessageSplitter {
    buf: BytesMut,
}

impl MessageSplitter {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete framed message, if one is buffered.
    pub fn next_message(&mut self, max_len: usize) -> Result<Option<Bytes>, WireError> {
        match parse_frame_header(&self.buf, max_len)? {
            Some(header) if self.buf.len() >= GRPC_PREFIX_LEN + header.len => Ok(Some(
                self.buf.split_to(GRPC_PREFIX_LEN + header.len).freeze(),
            )),
            _ => Ok(None),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_events_give_their_type_and_ref() {
        use crate::proto::control as pb;
        use prost::Message;
        for (kind, expected) in [(0, HISTORY_STARTED), (1, 1), (2, 2)] {
            let event = pb::BuildHistoryEvent {
                r#type: kind,
                record: Some(pb::BuildHistoryRecord {
                    r#ref: "r1".into(),
                    frontend: "dockerfile.v0".into(),
                    ..Default::default()
                }),
            }
            .encode_to_vec();
            assert_eq!(decode_history_event(&event).unwrap(), (expected, "r1"));
        }
        // STARTED is the zero value: proto3 leaves it off the wire.
        let started = pb::BuildHistoryEvent {
            r#type: 0,
            record: Some(pb::BuildHistoryRecord {
                r#ref: "r2".into(),
                ..Default::default()
            }),
        }
        .encode_to_vec();
        assert_eq!(started[0], 0x12, "no type field");
        assert_eq!(
            decode_history_event(&started).unwrap(),
            (HISTORY_STARTED, "r2")
        );
        assert!(
            decode_history_event(&[0x12, 0x05, 0x0a]).is_err(),
            "truncated record"
        );
    }

    // A minimal encoder, so each test states its input field by field.
    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
        out
    }
    fn key(number: u32, wire_type: u8) -> Vec<u8> {
        varint((u64::from(number) << 3) | u64::from(wire_type))
    }
    fn len_field(number: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = key(number, 2);
        out.extend(varint(payload.len() as u64));
        out.extend_from_slice(payload);
        out
    }
    fn str_field(number: u32, s: &str) -> Vec<u8> {
        len_field(number, s.as_bytes())
    }
    fn varint_field(number: u32, v: u64) -> Vec<u8> {
        let mut out = key(number, 0);
        out.extend(varint(v));
        out
    }
    fn entry(k: &str, v: &str) -> Vec<u8> {
        [str_field(1, k), str_field(2, v)].concat()
    }
    /// One unknown field of every non-group wire type.
    fn unknown_fields() -> Vec<u8> {
        let mut out = varint_field(1000, u64::MAX);
        out.extend(key(1001, 1));
        out.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        out.extend(len_field(1002, b"\xff\xfe not utf-8, never read"));
        out.extend(key(1003, 5));
        out.extend([9, 9, 9, 9]);
        out
    }

    fn full_solve() -> Vec<u8> {
        let exporter = [
            str_field(1, "image"),
            len_field(2, &entry("name", "reg/app:1")),
            unknown_fields(),
        ]
        .concat();
        let cache_import = [
            str_field(1, "registry"),
            len_field(2, &entry("ref", "reg/app:cache")),
        ]
        .concat();
        let cache = [
            len_field(4, &[str_field(1, "inline")].concat()),
            len_field(5, &cache_import),
            unknown_fields(),
        ]
        .concat();
        [
            unknown_fields(),
            str_field(1, "ref1"),
            str_field(3, "image"),
            len_field(4, &entry("push", "false")),
            str_field(5, "sess1"),
            str_field(6, "dockerfile.v0"),
            len_field(7, &entry("platform", "linux/arm64")),
            len_field(
                7,
                &[entry("local-sessionid:context", "shared"), unknown_fields()].concat(),
            ),
            len_field(7, &entry("local-sessionid:dockerfile", "shared")),
            len_field(8, &cache),
            varint_field(11, 1),
            len_field(13, &exporter),
            str_field(15, "policy"),
            varint_field(16, 3),
        ]
        .concat()
    }

    #[test]
    fn frame_header() {
        assert_eq!(parse_frame_header(&[0, 0, 0, 0], 10), Ok(None));
        assert_eq!(
            parse_frame_header(&[0, 0, 0, 0, 7, 0xaa], 10),
            Ok(Some(FrameHeader {
                compressed: false,
                len: 7
            }))
        );
        assert_eq!(
            parse_frame_header(&[1, 0, 0, 1, 0], 256),
            Ok(Some(FrameHeader {
                compressed: true,
                len: 256
            }))
        );
        assert_eq!(
            parse_frame_header(&[2, 0, 0, 0, 0], 10),
            Err(WireError::BadFlag(2))
        );
        assert_eq!(
            parse_frame_header(&[0, 0xff, 0xff, 0xff, 0xff], 16),
            Err(WireError::TooLarge {
                len: u32::MAX as usize,
                max: 16
            })
        );
        let framed = encode_frame(b"hello");
        assert_eq!(&framed[..], b"\0\0\0\0\x05hello");
        assert_eq!(
            parse_frame_header(&framed, 5),
            Ok(Some(FrameHeader {
                compressed: false,
                len: 5
            }))
        );
        assert_eq!(&encode_frame(b"")[..], &[0, 0, 0, 0, 0]);
    }

    #[test]
    fn the_ref_of_a_solve_read_only_in_part() {
        let framed = encode_frame(&[str_field(1, "ref1"), str_field(5, "sess1")].concat());
        // The whole message, and only its first bytes (the prefix, the tag, the length, "ref1").
        assert_eq!(leading_solve_ref(&framed), Some("ref1"));
        assert_eq!(leading_solve_ref(&framed[..5 + 2 + 4]), Some("ref1"));
        // The ref cut short, only the prefix, nothing at all.
        assert_eq!(leading_solve_ref(&framed[..5 + 2 + 3]), None);
        assert_eq!(leading_solve_ref(&framed[..5]), None);
        assert_eq!(leading_solve_ref(&[]), None);
        // A message that does not start with field 1.
        assert_eq!(leading_solve_ref(&encode_frame(&full_solve())), None);
        // An empty message followed by the bytes of another: the ref is not the first one's.
        let two = [&encode_frame(b"")[..], &framed[..]].concat();
        assert_eq!(leading_solve_ref(&two), None);
        // A ref running past the declared length, and a compressed message.
        let mut short = framed.to_vec();
        short[4] = 2 + 3;
        assert_eq!(leading_solve_ref(&short), None);
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert_eq!(leading_solve_ref(&compressed), None);
    }

    #[test]
    fn solve_reads_every_field_and_skips_unknown_ones() {
        let msg = full_solve();
        let info = decode_solve(&msg).unwrap();
        assert_eq!(info.build_ref, "ref1");
        assert_eq!(info.session, "sess1");
        assert_eq!(info.source_policy_session, "policy");
        assert_eq!(info.frontend, "dockerfile.v0");
        assert!(info.internal);
        assert_eq!(
            info.frontend_attrs,
            vec![
                ("platform", "linux/arm64"),
                ("local-sessionid:context", "shared"),
                ("local-sessionid:dockerfile", "shared")
            ]
        );
        // Field 13 present: the deprecated 3/4 pair is not reported.
        assert_eq!(
            info.exporters,
            vec![TypedAttrs {
                kind: "image",
                attrs: vec![("name", "reg/app:1")]
            }]
        );
        assert_eq!(
            info.cache_exports,
            vec![TypedAttrs {
                kind: "inline",
                attrs: vec![]
            }]
        );
        assert_eq!(info.cache_imports[0].attr("ref"), Some("reg/app:cache"));
        assert_eq!(info.session_ids(), vec!["sess1", "policy", "shared"]);
        assert_eq!(info.frontend_attr("platform"), Some("linux/arm64"));
        assert_eq!(info.frontend_attr("missing"), None);
        assert_eq!(info.image_names().collect::<Vec<_>>(), vec!["reg/app:1"]);
        assert_eq!(
            info.registry_cache_refs().collect::<Vec<_>>(),
            vec!["reg/app:cache"]
        );
    }

    #[test]
    fn deprecated_exporter_is_reported_without_field_13() {
        let msg = [
            str_field(3, "oci"),
            len_field(4, &entry("name", "a,b")),
            len_field(4, &entry("push", "true")),
        ]
        .concat();
        let info = decode_solve(&msg).unwrap();
        assert_eq!(
            info.exporters,
            vec![TypedAttrs {
                kind: "oci",
                attrs: vec![("name", "a,b"), ("push", "true")]
            }]
        );
        assert_eq!(info.image_names().collect::<Vec<_>>(), vec!["a", "b"]);
        // Attributes without a type name no exporter.
        let only_attrs = len_field(4, &entry("name", "x"));
        assert!(decode_solve(&only_attrs).unwrap().exporters.is_empty());
    }

    #[test]
    fn empty_messages_decode_to_defaults() {
        assert_eq!(decode_solve(&[]), Ok(SolveInfo::default()));
        assert_eq!(decode_status_ref(&[]), Ok(""));
        assert_eq!(
            decode_history_request(&[]),
            Ok(HistoryRequestInfo::default())
        );
        assert_eq!(decode_update_history_ref(&[]), Ok(""));
        assert_eq!(decode_worker_platforms(&[]), Ok(vec![]));
        assert_eq!(decode_health_status(&[]), Ok(0));
        assert!(SolveInfo::default().session_ids().is_empty());
        // Empty nested messages: an empty Cache, an empty exporter, an empty map entry.
        let msg = [len_field(8, &[]), len_field(13, &[]), len_field(7, &[])].concat();
        let info = decode_solve(&msg).unwrap();
        assert_eq!(info.exporters, vec![TypedAttrs::default()]);
        assert_eq!(info.frontend_attrs, vec![("", "")]);
    }

    #[test]
    fn map_entry_with_missing_key_or_value_is_empty_string() {
        let msg = [
            len_field(7, &str_field(2, "v")),
            len_field(7, &str_field(1, "k")),
        ]
        .concat();
        assert_eq!(
            decode_solve(&msg).unwrap().frontend_attrs,
            vec![("", "v"), ("k", "")]
        );
    }

    #[test]
    fn last_occurrence_of_a_scalar_wins() {
        let msg = [
            str_field(1, "first"),
            varint_field(11, 1),
            str_field(1, "second"),
            varint_field(11, 0),
            len_field(7, &entry("k", "1")),
            len_field(7, &entry("k", "2")),
            len_field(
                7,
                &[str_field(1, "j"), str_field(2, "a"), str_field(2, "b")].concat(),
            ),
        ]
        .concat();
        let info = decode_solve(&msg).unwrap();
        assert_eq!(info.build_ref, "second");
        assert!(!info.internal);
        assert_eq!(info.frontend_attr("k"), Some("2"));
        assert_eq!(info.frontend_attr("j"), Some("b"));
        let status = [str_field(1, "a"), str_field(1, "b")].concat();
        assert_eq!(decode_status_ref(&status), Ok("b"));
        let health = [varint_field(1, 1), varint_field(1, 2)].concat();
        assert_eq!(decode_health_status(&health), Ok(2));
    }

    #[test]
    fn repeated_cache_message_is_merged() {
        let msg = [
            len_field(8, &len_field(4, &str_field(1, "inline"))),
            len_field(8, &len_field(4, &str_field(1, "registry"))),
        ]
        .concat();
        let info = decode_solve(&msg).unwrap();
        let kinds: Vec<_> = info.cache_exports.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, vec!["inline", "registry"]);
    }

    #[test]
    fn known_field_with_wrong_wire_type_is_skipped() {
        // As Go's protobuf runtime treats it: an unknown field.
        let msg = [varint_field(1, 7), str_field(11, "x"), str_field(5, "s")].concat();
        let info = decode_solve(&msg).unwrap();
        assert_eq!(
            (info.build_ref, info.internal, info.session),
            ("", false, "s")
        );
        assert_eq!(decode_status_ref(&varint_field(1, 3)), Ok(""));
        assert_eq!(decode_health_status(&str_field(1, "x")), Ok(0));
    }

    #[test]
    fn unknown_fields_of_every_wire_type_are_skipped_everywhere() {
        let u = unknown_fields();
        assert_eq!(
            decode_status_ref(&[u.clone(), str_field(1, "r"), u.clone()].concat()),
            Ok("r")
        );
        assert_eq!(
            decode_update_history_ref(&[u.clone(), str_field(1, "r")].concat()),
            Ok("r")
        );
        let hist = [
            u.clone(),
            varint_field(1, 1),
            str_field(2, "r"),
            varint_field(3, 1),
            varint_field(5, 50),
        ]
        .concat();
        assert_eq!(
            decode_history_request(&hist),
            Ok(HistoryRequestInfo {
                active_only: true,
                build_ref: "r",
                early_exit: true
            })
        );
        assert_eq!(
            decode_health_status(&[u.clone(), varint_field(1, 1)].concat()),
            Ok(1)
        );
    }

    #[test]
    fn groups_and_invalid_wire_types_are_errors() {
        for wire_type in [3u8, 4, 6, 7] {
            let msg = [str_field(1, "r"), key(9, wire_type), vec![0]].concat();
            assert!(
                matches!(decode_solve(&msg), Err(WireError::Malformed(_))),
                "wire type {wire_type}"
            );
            assert!(matches!(
                decode_status_ref(&msg),
                Err(WireError::Malformed(_))
            ));
        }
        // Inside a nested message too.
        let msg = len_field(13, &key(1, 3));
        assert!(matches!(decode_solve(&msg), Err(WireError::Malformed(_))));
    }

    #[test]
    fn field_number_zero_is_an_error() {
        assert!(matches!(
            decode_status_ref(&[0x02, 0x00]),
            Err(WireError::Malformed(_))
        ));
        // Field number above 2^29 - 1 (the key varint still fits 64 bits).
        let too_big = [varint((1u64 << 32) << 3), vec![0]].concat();
        assert!(matches!(
            decode_status_ref(&too_big),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn truncation_is_an_error() {
        // Varint key cut short.
        assert_eq!(
            decode_status_ref(&[0x80]),
            Err(WireError::Truncated("field key"))
        );
        // Varint value cut short.
        assert!(matches!(
            decode_health_status(&[0x08, 0xff]),
            Err(WireError::Truncated(_))
        ));
        // Length past the end.
        assert!(matches!(
            decode_status_ref(&[0x0a, 0x05, b'a']),
            Err(WireError::Truncated(_))
        ));
        // Length prefix cut short.
        assert!(matches!(
            decode_status_ref(&[0x0a]),
            Err(WireError::Truncated(_))
        ));
        // Fixed-width fields cut short.
        assert!(matches!(
            decode_status_ref(&[0x09, 1, 2, 3]),
            Err(WireError::Truncated(_))
        ));
        assert!(matches!(
            decode_status_ref(&[0x0d, 1, 2, 3]),
            Err(WireError::Truncated(_))
        ));
        // A nested length that runs past its parent's end.
        let msg = len_field(7, &[0x0a, 0x09, b'k']);
        assert!(matches!(decode_solve(&msg), Err(WireError::Truncated(_))));
        // Every proper prefix of a valid message is an error or a shorter valid message.
        let msg = full_solve();
        for end in 0..msg.len() {
            let _ = decode_solve(&msg[..end]);
        }
        assert!(decode_solve(&msg[..msg.len() - 1]).is_err());
    }

    #[test]
    fn huge_varints() {
        // u64::MAX in 10 bytes is valid.
        let max = [vec![0x08], vec![0xff; 9], vec![0x01]].concat();
        assert_eq!(decode_health_status(&max), Ok(-1));
        // A 10th byte above 1 overflows 64 bits.
        let overflow = [vec![0x08], vec![0xff; 9], vec![0x02]].concat();
        assert!(matches!(
            decode_health_status(&overflow),
            Err(WireError::Malformed(_))
        ));
        // More than 10 bytes.
        let overlong = [vec![0x08], vec![0x80; 10], vec![0x00]].concat();
        assert!(matches!(
            decode_health_status(&overlong),
            Err(WireError::Malformed(_))
        ));
        // A huge length must not wrap or allocate.
        let huge_len = [vec![0x0a], vec![0xff; 9], vec![0x01]].concat();
        assert!(matches!(
            decode_status_ref(&huge_len),
            Err(WireError::Truncated(_))
        ));
        // Non-minimal but in-range encodings are accepted, as Go does.
        assert_eq!(decode_health_status(&[0x08, 0x81, 0x00]), Ok(1));
        // Negative enums are sign-extended to 10 bytes; they truncate back to i32.
        assert_eq!(
            decode_health_status(&varint_field(1, (-3i64) as u64)),
            Ok(-3)
        );
    }

    #[test]
    fn invalid_utf8_names_the_field() {
        let bad = b"\xc3\x28";
        assert_eq!(
            decode_solve(&len_field(1, bad)),
            Err(WireError::InvalidUtf8 {
                field: "SolveRequest.Ref"
            })
        );
        assert_eq!(
            decode_solve(&len_field(7, &len_field(1, bad))),
            Err(WireError::InvalidUtf8 {
                field: "SolveRequest.FrontendAttrs.key"
            })
        );
        assert_eq!(
            decode_solve(&len_field(13, &len_field(2, &len_field(2, bad)))),
            Err(WireError::InvalidUtf8 {
                field: "Exporter.Attrs.value"
            })
        );
        assert_eq!(
            decode_solve(&len_field(8, &len_field(5, &len_field(1, bad)))),
            Err(WireError::InvalidUtf8 {
                field: "CacheOptionsEntry.Type"
            })
        );
        assert_eq!(
            decode_status_ref(&len_field(1, bad)),
            Err(WireError::InvalidUtf8 {
                field: "StatusRequest.Ref"
            })
        );
        assert_eq!(
            decode_history_request(&len_field(2, bad)),
            Err(WireError::InvalidUtf8 {
                field: "BuildHistoryRequest.Ref"
            })
        );
        assert_eq!(
            decode_update_history_ref(&len_field(1, bad)),
            Err(WireError::InvalidUtf8 {
                field: "UpdateBuildHistoryRequest.Ref"
            })
        );
        let record = len_field(1, &len_field(3, &len_field(2, bad)));
        assert_eq!(
            decode_worker_platforms(&record),
            Err(WireError::InvalidUtf8 {
                field: "Platform.OS"
            })
        );
        // The error text carries the field name.
        let err = decode_status_ref(&len_field(1, bad)).unwrap_err();
        assert!(err.to_string().contains("StatusRequest.Ref"));
    }

    #[test]
    fn decoded_strings_borrow_from_the_input() {
        let msg = str_field(1, "abc");
        let r = decode_status_ref(&msg).unwrap();
        assert!(std::ptr::eq(r.as_ptr(), msg[2..].as_ptr()));
    }

    #[test]
    fn worker_platforms() {
        let platform = |arch: &str, os: &str, variant: &str| {
            let mut p = [str_field(1, arch), str_field(2, os)].concat();
            if !variant.is_empty() {
                p.extend(str_field(3, variant));
            }
            p.extend(unknown_fields());
            len_field(3, &p)
        };
        let w1 = [
            str_field(1, "worker1"),
            len_field(2, &entry("org.mobyproject.buildkit.worker.executor", "oci")),
            platform("amd64", "linux", ""),
            platform("arm64", "linux", ""),
            platform("arm", "linux", "v7"),
            platform("", "linux", ""),
        ]
        .concat();
        let w2 = [
            str_field(1, "worker2"),
            platform("amd64", "linux", ""),
            platform("riscv64", "linux", ""),
        ]
        .concat();
        let msg = [len_field(1, &w1), unknown_fields(), len_field(1, &w2)].concat();
        assert_eq!(
            decode_worker_platforms(&msg).unwrap(),
            vec![
                "linux/amd64",
                "linux/arm64",
                "linux/arm/v7",
                "linux/riscv64"
            ]
        );
    }
}
