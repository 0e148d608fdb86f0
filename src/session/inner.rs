//! The inner HTTP/2 connections of a relayed Session: the router's client toward the build
//! client ([`super::held`]) and its server toward the daemon ([`super::relay`]), and the
//! windows and limits both run with.

/// Initial flow-control window of each inner stream the router receives on, both toward the
/// client (context uploads: FileSync answers) and toward the daemon (exports: FileSend
/// requests). The relay only releases window on one side as the other side accepts the bytes,
/// so this window is the relay's in-flight allowance per stream: it must cover the extra hop's
/// latency or it throttles the upload. 4 MiB is 2x what grpc-go's BDP estimator reaches on a
/// fast LAN, and bounds what one stream can hold in the router.
pub const INNER_STREAM_WINDOW: u32 = 4 << 20;

/// Connection-level receive window of each inner connection: a few streams at full speed (the
/// context and the Dockerfile read concurrently, plus exports). Per session, the router holds at
/// most this much unforwarded data in each direction.
pub const INNER_CONN_WINDOW: u32 = 8 << 20;

/// Largest inner DATA frame the router accepts. Peers send fewer, larger frames (x/net's server
/// would send up to 1 MiB): fewer frame headers to parse and fewer wake-ups per MiB. What the
/// router sends is bounded by each peer's own setting (16 KiB for grpc-go's client).
pub const INNER_MAX_FRAME: u32 = 1 << 20;

/// Data h2 may buffer per inner stream on the sending side, on top of what the peer's window
/// allows. Matches the outer buffering so neither hop starves the other.
pub const INNER_SEND_BUFFER: usize = 1 << 20;

/// Inner streams one daemon may have open at once in one session (grpc-go opens one per call;
/// a build has a handful). Bounds the tasks a session can make the router spawn.
pub const INNER_MAX_STREAMS: u32 = 1000;

/// Largest inner header block accepted (auth and secrets calls carry modest metadata).
pub const INNER_MAX_HEADER_LIST: u32 = 256 * 1024;

/// The router's inner HTTP/2 client toward the build client.
pub(crate) fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .enable_push(false)
        .initial_window_size(INNER_STREAM_WINDOW)
        .initial_connection_window_size(INNER_CONN_WINDOW)
        .max_frame_size(INNER_MAX_FRAME)
        .max_send_buffer_size(INNER_SEND_BUFFER)
        .max_header_list_size(INNER_MAX_HEADER_LIST);
    builder
}

/// The router's inner HTTP/2 server toward the daemon.
pub(crate) fn server_builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(INNER_STREAM_WINDOW)
        .initial_connection_window_size(INNER_CONN_WINDOW)
        .max_frame_size(INNER_MAX_FRAME)
        .max_send_buffer_size(INNER_SEND_BUFFER)
        .max_concurrent_streams(INNER_MAX_STREAMS)
        .max_header_list_size(INNER_MAX_HEADER_LIST);
    builder
}
