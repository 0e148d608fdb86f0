//! The router binary as an operator runs it: where its logs go and what they look like.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Plain logs go to stderr without ANSI colour codes when stderr is a pipe or a file (as under
/// `kubectl logs`); stdout stays empty for command output.
#[test]
fn plain_logs_go_to_stderr_without_colour_when_it_is_not_a_terminal() {
    let mut router = Command::new(env!("CARGO_BIN_EXE_buildkit-router"))
        .args([
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            "--log-format=plain",
            "--backend=tcp://127.0.0.1:9",
        ])
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
