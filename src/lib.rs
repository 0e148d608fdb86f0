//! buildkit-router: a stateful L7 gRPC proxy in front of a pool of buildkitd daemons.
//!
//! The modules follow the data: a connection arrives ([`listener`]), each request is classified
//! ([`classify`], [`wire`]), a route is chosen ([`router`], [`registry`], [`placement`]), and bytes
//! are forwarded ([`forward`], [`session`]) to a backend ([`pool`]) that [`discovery`] found.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod app;
pub mod body;
pub mod classify;
pub mod config;
pub mod content;
pub mod discovery;
pub mod duration;
pub mod forward;
pub mod fuzzing;
pub mod grpc;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod placement;
pub mod pool;
pub mod proto;
pub mod queue;
pub mod registry;
pub mod router;
pub mod routing_buffer;
pub mod runtime;
pub mod scaler;
pub mod session;
pub mod status;
pub mod tls;
pub mod upstream;
pub mod waiting;
pub mod wire;
pub mod workers;
