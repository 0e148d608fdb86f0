//! Generated protobuf messages and gRPC stubs for our own minimal .proto subsets (see `proto/`).
//!
//! Module paths follow the protobuf packages, so `moby.buildkit.v1.SolveRequest` is
//! [`moby::buildkit::v1::SolveRequest`]. Health comes from the `tonic-health` crate.
#![allow(clippy::all, missing_docs, non_snake_case)]

/// `moby.*` packages.
pub mod moby {
    /// `moby.buildkit.*`.
    pub mod buildkit {
        /// `moby.buildkit.v1`: the Control service.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.rs"));
            /// `moby.buildkit.v1.frontend`: the LLBBridge (gateway) service.
            pub mod frontend {
                include!(concat!(env!("OUT_DIR"), "/moby.buildkit.v1.frontend.rs"));
            }
        }
    }
    /// `moby.filesync.*`.
    pub mod filesync {
        /// `moby.filesync.v1`: FileSync and FileSend, served by the client in the Session tunnel.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/moby.filesync.v1.rs"));
        }
    }
}

/// `externalscaler`: KEDA's external scaler API.
pub mod externalscaler {
    include!(concat!(env!("OUT_DIR"), "/externalscaler.rs"));
}

pub use moby::buildkit::v1 as control;
pub use moby::buildkit::v1::frontend as gateway;
pub use moby::filesync::v1 as filesync;
