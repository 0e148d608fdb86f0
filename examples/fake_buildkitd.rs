//! The test suite's fake buildkitd (tests/support) as a standalone process, for load tests
//! against real proxies (benches/peers.sh). It listens on 127.0.0.1 on a port the OS picks
//! (the fake binds port 0), prints `listening 127.0.0.1:PORT` on stdout, and serves until
//! Ctrl-C or SIGTERM.
//!
//! `cargo run --release --example fake_buildkitd`
#![forbid(unsafe_code)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;

use support::fake_daemon::{DaemonOpts, FakeDaemon};

fn main() {
    // Worker threads: FAKE_BUILDKITD_THREADS, else tokio's default (one per CPU).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("FAKE_BUILDKITD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder.worker_threads(n);
    }
    let rt = builder.enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening {}", daemon.addr());
        let _ = out.flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        daemon.shutdown().await;
    });
}
