//! A Solve announces its build from its leading bytes (Go writes the ref first): while the rest
//! of its first message comes, or waits for room in `--routing-buffer`, the build's Status and
//! LLBBridge calls wait for it past `--ref-wait`, and a refusal of an earlier attempt with the
//! same ref no longer speaks for the build. A Solve whose client vanishes leaves no wait behind.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use buildkit_router::app::Running;
use buildkit_router::proto::control as pb;
use prost::Message;
use support::client::{BuildOpts, Client};
use support::fake_daemon::{DaemonOpts, FakeDaemon};
use support::h2_call::{h2_connect, start_call, StalledCall};
use support::router_over;
use tonic::Code;

const SOLVE: &str = "/moby.buildkit.v1.Control/Solve";

/// A buildctl build whose Solve carries `llb_bytes` more in its first message (the size of a
/// large LLB definition), with a small context.
fn large_build(llb_bytes: usize) -> BuildOpts {
    let mut opts = BuildOpts::buildctl();
    opts.context_size = 64 << 10;
    opts.frontend_attrs
        .insert("build-arg:LLB".into(), "x".repeat(llb_bytes));
    opts
}

/// Waits (on paused time) until the router counts a Solve naming `build_ref` as arriving.
async fn until_arriving(router: &Running, build_ref: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !router.registry.is_arriving(build_ref) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Solve naming {build_ref} never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A Solve whose first message waits for room in the routing buffer longer than `--ref-wait`
/// (another large message holds the buffer) still gets its build's Status and LLBBridge calls:
/// they wait for it instead of giving up on an unknown ref (buildctl fails a build whose Status
/// fails).
#[tokio::test(start_paused = true)]
async fn a_solve_waiting_for_routing_buffer_room_past_the_ref_wait_keeps_its_status() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.routing_buffer = 1 << 20;
        cfg.routing_buffer_wait = Duration::from_secs(60);
        cfg.ref_wait = Duration::from_secs(1);
    })
    .await;

    // An Info that declares 900 KiB, sends 1 KiB and waits, holding most of the buffer.
    let stalled = StalledCall::start(&router, 900 << 10).await;

    let opts = large_build(600 << 10);
    let build_ref = opts.build_ref.clone();
    let client = Client::connect(router.addr).await.expect("connect");
    let build = tokio::spawn(async move { client.build(opts).await });
    until_arriving(&router, &build_ref).await;
    // Past the ref wait, and past the daemon's own wait for an unknown job (6 s).
    tokio::time::sleep(Duration::from_secs(10)).await;
    if build.is_finished() {
        let result = build.await.expect("build");
        panic!(
            "the build ended while its Solve waited for room: {:#?}",
            result.errors()
        );
    }
    assert_eq!(daemon.counters().calls("Solve"), 0);

    let (code, message) = stalled.finish().await;
    assert_eq!(code, "0", "{message}");
    let result = build.await.expect("build");
    assert!(result.ok(), "{:#?}", result.errors());
    assert!(
        result.status_messages > 0,
        "the daemon's progress is relayed"
    );
    assert_eq!(
        daemon.counters().no_such_job(),
        0,
        "no call gave up on the ref"
    );
    assert!(!router.registry.is_arriving(&build_ref));
}

/// A build the router refused, retried with the same ref on the same connection with a first
/// message of a few MiB: the retry's Status and Ping follow the new Solve, not the old refusal.
/// They waited only 20 ms for the refusal to be cleared, and it was cleared only once the
/// whole message was read; here the retry's message is slow to come because it waits for room
/// in the routing buffer (the stand-in, on paused time, for MiBs still on the wire).
#[tokio::test(start_paused = true)]
async fn a_refused_build_retried_on_its_connection_with_a_large_solve_gets_its_status() {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.max_message_size = 4 << 20;
        cfg.routing_buffer = 4 << 20;
        cfg.routing_buffer_wait = Duration::from_secs(60);
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");

    let refused = client.build(large_build(5 << 20)).await;
    assert_eq!(
        refused.solve.code,
        Code::ResourceExhausted,
        "{:?}",
        refused.solve
    );
    assert_eq!(daemon.counters().calls("Solve"), 0);

    // An Info that declares 3.5 MiB, sends 1 KiB and waits, holding most of the buffer.
    let stalled = StalledCall::start(&router, 7 << 19).await;

    let mut retry = large_build(3 << 20);
    retry.build_ref = refused.build_ref.clone();
    let retried = tokio::spawn(async move { client.build(retry).await });
    until_arriving(&router, &refused.build_ref).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, message) = stalled.finish().await;
    assert_eq!(code, "0", "{message}");

    let again = retried.await.expect("retry");
    assert!(again.ok(), "{:#?}", again.errors());
    assert!(again.status_messages > 0, "the retried build's progress");
    assert_eq!(daemon.counters().calls("Solve"), 1);
}

/// A Solve whose client vanishes in the middle of its first message leaves no wait behind: a
/// Status that waited for it past `--ref-wait` goes on as for an unknown ref at once (asks the
/// daemons, which do not know it). Once with the Solve reading its message, once with it
/// waiting for room in the routing buffer; the latter's first DATA frame carries only the gRPC
/// prefix, and its ref comes in the next (the router reads on to see it before it waits).
#[tokio::test(start_paused = true)]
async fn a_solve_whose_client_vanishes_mid_message_leaves_no_wait_behind() {
    for buffer_full in [false, true] {
        vanish_mid_solve(buffer_full).await;
    }
}

async fn vanish_mid_solve(buffer_full: bool) {
    let daemon = FakeDaemon::start("bk0", DaemonOpts::default()).await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.ref_wait = Duration::from_secs(1);
        cfg.routing_buffer = 1 << 20;
        cfg.routing_buffer_wait = Duration::from_secs(60);
    })
    .await;
    let _stalled = match buffer_full {
        true => Some(StalledCall::start(&router, 900 << 10).await),
        false => None,
    };

    let build_ref = support::new_id();
    let mut solve = pb::SolveRequest {
        r#ref: build_ref.clone(),
        ..Default::default()
    };
    solve
        .frontend_attrs
        .insert("build-arg:LLB".into(), "x".repeat(900 << 10));
    let payload = solve.encode_to_vec();
    let mut message = vec![0];
    message.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    message.extend_from_slice(&payload);
    let (mut vanishing, driver) = h2_connect(router.addr).await;
    let (_answer, mut send) = start_call(&mut vanishing, SOLVE);
    send.send_data(message[..5].to_vec().into(), false)
        .expect("send");
    send.send_data(message[5..1024].to_vec().into(), false)
        .expect("send");
    until_arriving(&router, &build_ref).await;

    let status = tokio::spawn({
        let build_ref = build_ref.clone();
        let client = Client::connect(router.addr).await.expect("connect");
        async move { client.status(&build_ref).await }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !status.is_finished(),
        "the Status waits for the arriving Solve"
    );

    driver.abort();
    let vanished = tokio::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("the Status ends once the Solve is gone")
        .expect("join");
    let error = ended.expect_err("no daemon knows the build");
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    assert!(error.message().contains("no such job"), "{error:?}");
    // Only the daemon's own wait for an unknown job (6 s): none for the ref.
    assert!(
        vanished.elapsed() <= Duration::from_secs(7),
        "ended {:?} after the client vanished",
        vanished.elapsed()
    );
    assert!(!router.registry.is_arriving(&build_ref));
    assert_eq!(daemon.counters().calls("Solve"), 0);
}

/// A Solve whose leading bytes name one ref but which decodes to another (two `Ref` fields:
/// proto3 takes the last; Go writes one) stops counting as arriving for the first once it is
/// read: while it waits in the queue (a full pool, for up to `--queue-timeout`), a Status for
/// the ref its leading bytes named ends as for an unknown ref, after `--ref-wait` and the
/// daemon's own wait for an unknown job (6 s), instead of waiting for that Solve.
#[tokio::test(start_paused = true)]
async fn a_solve_decoding_to_another_ref_than_its_leading_bytes_holds_no_wait_for_it() {
    let daemon = FakeDaemon::start_holding("bk0").await;
    let router = router_over(&[&daemon], |cfg| {
        cfg.ref_wait = Duration::from_secs(1);
        cfg.placement.max_builds_per_backend = Some(1);
    })
    .await;
    let client = Client::connect(router.addr).await.expect("connect");
    let holding = {
        let client = client.clone();
        tokio::spawn(async move { client.build(BuildOpts::buildctl()).await })
    };
    daemon.wait_held(1).await;

    // Two encodings of a SolveRequest one after the other decode as their merge.
    let (named, decoded) = (support::new_id(), support::new_id());
    let solve_naming = |build_ref: &str| {
        pb::SolveRequest {
            r#ref: build_ref.to_owned(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let payload = [solve_naming(&named), solve_naming(&decoded)].concat();
    let mut message = vec![0];
    message.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    message.extend_from_slice(&payload);
    let (mut crafted, _driver) = h2_connect(router.addr).await;
    let (_answer, mut send) = start_call(&mut crafted, SOLVE);
    send.send_data(message.into(), true).expect("send");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while router.metrics.queued_total.get() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let status = client.status(&named);
    let started = tokio::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(60), status)
        .await
        .expect("the Status does not wait for the queued Solve of another ref");
    let error = ended.expect_err("no daemon knows the build");
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    assert!(
        started.elapsed() <= Duration::from_secs(8),
        "ended after {:?}",
        started.elapsed()
    );
    // Still queued, it counts as arriving under the ref it decodes to.
    assert_eq!(router.metrics.queued_total.get(), 1);
    assert!(router.registry.is_arriving(&decoded));
    assert!(!router.registry.is_arriving(&named));
    assert_eq!(
        daemon.counters().calls("Solve"),
        1,
        "only the holding build"
    );
    holding.abort();
}
