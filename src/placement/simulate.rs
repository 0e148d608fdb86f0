//! `buildkit-router simulate`: replays a workload through the real placement code.
// OWNED BY THE placement HELPER (issue 3).

/// Command-line arguments of `buildkit-router simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {}

/// Runs the simulation and prints its report.
pub fn run(args: SimulateArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = args;
    Err("simulate is not implemented yet".into())
}
