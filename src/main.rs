//! buildkit-router: parse the command line, start everything, wait for a signal, drain.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use std::sync::Arc;

use buildkit_router::config::{Cli, Command, LogFormat, RunConfig, RuntimeLayout};
use buildkit_router::runtime::Workers;
use buildkit_router::{app, placement, status};
use clap::Parser;
use tracing::{error, info};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Simulate(args)) => placement::simulate::run(args),
        Some(Command::Status(args)) => runtime().and_then(|rt| rt.block_on(status::print(args))),
        None => {
            init_logging(&cli.run);
            serve(cli.run)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: with stderr's reader gone it would panic (exit 101, not 1).
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "buildkit-router: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs the router on the configured runtime layout.
fn serve(cfg: RunConfig) -> Result<(), BoxError> {
    let threads = cfg.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    match cfg.runtime {
        RuntimeLayout::ThreadPerCore => {
            // The main thread is worker 0: accept loop, background tasks, and its share of
            // the connections.
            let rt = buildkit_router::runtime::single_threaded()?;
            let workers = Workers::start(rt.handle().clone(), threads)?;
            rt.block_on(run(cfg, Some(workers)))
        }
        RuntimeLayout::WorkStealing => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()?;
            rt.block_on(run(cfg, None))
        }
    }
}

fn init_logging(cfg: &RunConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log));
    // Logs go to stderr (stdout is for command output); colour only on a terminal, never in
    // `kubectl logs` or a file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        // A log line that cannot be written (the reader of stderr is gone: a dead log shipper,
        // `| head`) is dropped. By default tracing-subscriber reports the failure with
        // `eprintln!` on the same closed stderr, which panics the task that logged: every call
        // that logs would fail, and the signal task would die before draining.
        .log_internal_errors(false);
    match cfg.log_format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

async fn run(cfg: RunConfig, workers: Option<Arc<Workers>>) -> Result<(), BoxError> {
    let running = app::start_on(cfg, workers).await?;
    let shutdown = running.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received; draining");
        shutdown.cancel();
    });
    running.finished().await;
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the router");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
