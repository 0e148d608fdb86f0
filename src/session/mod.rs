//! Control/Session streams: holding, binding, and the tunnel relay.
//!
//! `Control/Session` is a bidi stream of `BytesMessage`s whose payloads are one inner HTTP/2
//! connection, in which the daemon is the HTTP/2 client and the build client the server. A
//! session placed at once is passed through as it came ([`passthrough`]); one that waits for its
//! backend is terminated by the router (docs/session-relay.md):
//! - [`tunnel`] turns the outer message stream into a byte stream (`AsyncRead + AsyncWrite`);
//! - [`hold`] answers the client's Session at once and runs the inner HTTP/2 *client* toward the
//!   build client, so the client's 10 s preface timer is met however long the build waits;
//! - [`bind`] decides which backend the session belongs to (a Solve naming it, else placement);
//! - [`directory`] lists each live session's inner client, so the router can call the build
//!   client's services itself (reading the Dockerfile for the content key);
//! - [`relay`] opens the Session on that backend, serves the daemon's inner HTTP/2 connection
//!   and relays every inner stream to the client, with end-to-end flow control.

pub mod bind;
pub mod directory;
pub mod held;
pub mod hold;
pub mod inner;
pub mod passthrough;
pub mod relay;
pub mod tunnel;

pub use bind::{bind, BindHow, Bound, SHARED_KEY_HEADER, UUID_HEADER};
pub use directory::{Directory, InnerClient};
pub use held::{Open, OpenFuture, Placed};
pub use hold::{serve, Gauges, Refusal, SessionCall};
pub use passthrough::{first_look, pass_through, FirstLook};
pub use tunnel::{TunnelError, TunnelIo};
