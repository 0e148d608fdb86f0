//! The router binary as an operator runs it: where its logs go and what they look like.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Plain logs go to stderr without ANSI colour codes when stderr is a pipe or a file (as under
/// `kubectl logs`); stdout stays empty for command output.
/// The router binary on ephemeral ports with plain logs, over a backend nothing listens on.
fn router_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_buildkit-router"));
    command.args([
        "--listen=127.0.0.1:0",
        "--admin-listen=127.0.0.1:0",
        "--log-format=plain",
        "--backend=tcp://127.0.0.1:9",
    ]);
    command
}

#[test]
fn plain_logs_go_to_stderr_without_colour_when_it_is_not_a_terminal() {
    let mut router = router_command()
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the router");
    let stderr = router.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("buildkit-router listening"));
    router.kill().expect("kill");
    let out = router.wait_with_output().expect("wait");
    let line = listening.expect("the router logs that it listens, on stderr");
    assert!(
        !line.contains('\u{1b}'),
        "no ANSI escape codes in a piped log: {line:?}"
    );
    assert!(line.contains("INFO"), "{line}");
    assert!(out.stdout.is_empty(), "stdout is not used for logs");
}

/// A router whose log reader went away (a dead log shipper, `| head`) keeps serving and still
/// stops on SIGTERM: a log line that cannot be written is dropped. tracing-subscriber used to
/// report the failed write with `eprintln!` on the same closed stderr, which panicked every task
/// that logged: every call failed with CANCEL and the signal task died before draining.
#[tokio::test]
async fn a_router_whose_log_reader_is_gone_keeps_serving_and_stops_on_sigterm() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let mut router = router_command()
        // Every call logs.
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the router");
    let stderr = router.stderr.take().expect("stderr");
    let listening = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("buildkit-router listening"))
        .expect("the router listens");
    // The reader is gone from here on: the pipe is closed.
    let addr = listening
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .expect("addr= in the listening line")
        .to_owned();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for _ in 0..3 {
        let answer = health
            .check(HealthCheckRequest::default())
            .await
            .expect("the router answers although its logs cannot be written");
        let status = answer.into_inner().status();
        assert!(
            matches!(status, ServingStatus::Serving | ServingStatus::NotServing),
            "{status:?}"
        );
    }

    let pid = router.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    // Awaited without blocking the runtime: the client's idle connection takes the router's
    // GOAWAY and closes, as a live client does.
    let waited = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || router.wait()),
    )
    .await;
    if waited.is_err() {
        // Leave no router behind when the test fails.
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }
    let status = waited
        .expect("the router stops on SIGTERM")
        .expect("join")
        .expect("wait");
    assert!(status.success(), "a clean stop: {status}");
}
