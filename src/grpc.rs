//! gRPC's own vocabulary, shared by every layer: status codes, and the `grpc-status` and
//! `grpc-message` headers (gRPC over HTTP/2, "Responses"). The ground floor: it depends on no
//! other module of the router.

use http::{HeaderMap, HeaderValue};

/// gRPC status codes the router produces.
pub mod code {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const NOT_FOUND: u32 = 5;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const FAILED_PRECONDITION: u32 = 9;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// A call's `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit, `H M S m u n`).
pub fn grpc_timeout_of(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-status` in a header block, if any.
pub fn grpc_status_of(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Trailers (or Trailers-Only headers) carrying a gRPC status and message.
pub fn status_trailers(code: u32, message: &str) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(2);
    map.insert("grpc-status", HeaderValue::from(code));
    map.insert("grpc-message", percent_encode_message(message));
    map
}

/// The bytes gRPC percent-encodes in `grpc-message`: everything outside printable ASCII
/// (0x20..=0x7E; non-ASCII is always encoded), and `%` itself (gRPC over HTTP/2, "Responses").
const GRPC_MESSAGE_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

fn percent_encode_message(message: &str) -> HeaderValue {
    let encoded = percent_encoding::utf8_percent_encode(message, GRPC_MESSAGE_ENCODE).to_string();
    HeaderValue::from_str(&encoded)
        .unwrap_or_else(|_| HeaderValue::from_static("buildkit-router error"))
}

/// A `grpc-message` value as text (percent-decoded; invalid UTF-8 replaced), for logs and for
/// relaying a backend's error in an answer the router builds itself.
pub fn grpc_message_of(headers: &HeaderMap) -> String {
    headers
        .get("grpc-message")
        .map(|v| {
            percent_encoding::percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let t = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            grpc_timeout_of(&h)
        };
        use std::time::Duration;
        assert_eq!(t("14999m"), Some(Duration::from_millis(14999)));
        assert_eq!(t("15S"), Some(Duration::from_secs(15)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("100u"), Some(Duration::from_micros(100)));
        assert_eq!(t("x"), None);
        assert_eq!(t("5"), None);
    }

    #[test]
    fn grpc_messages_are_encoded_once_and_decoded_back() {
        let text = "failed to retrieve ref x: 100% é\nnext";
        let trailers = status_trailers(2, text);
        // Printable ASCII stays readable (spaces included, as grpc-go sends them); `%`,
        // control characters and non-ASCII bytes are escaped.
        assert_eq!(
            trailers["grpc-message"],
            "failed to retrieve ref x: 100%25 %C3%A9%0Anext"
        );
        assert_eq!(grpc_message_of(&trailers), text);
        // What tonic sends (spaces escaped too) decodes to the same text.
        let mut from_tonic = HeaderMap::new();
        from_tonic.insert(
            "grpc-message",
            HeaderValue::from_static("failed%20to%20retrieve"),
        );
        assert_eq!(grpc_message_of(&from_tonic), "failed to retrieve");
    }
}
