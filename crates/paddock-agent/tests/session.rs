//! The agent's session loop (`session::run_session`) driven by a fake gateway over
//! in-memory channels; tasks run for real on the `host` backend in a temporary work root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Sink, Stream};
use paddock_agent::session::run_session;
use paddock_agent::{AgentSettings, Runner, SessionEnd};
use paddock_proto::{
    AgentMessage, Cancel, Dispatch, ErrorBody, ErrorCode, Frame, GatewayMessage, Hello, HelloOk,
    Output, PROTOCOL_VERSION, ResultAck, ResultStatus, RunningTask, Stream as OutStream, TaskRef,
    TaskResult, TaskSpec, decode_agent, encode, now_ms,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound on any single wait.
const WAIT: Duration = Duration::from_secs(10);
const MAX_FRAME: usize = paddock_proto::DEFAULT_MAX_FRAME_BYTES;

// ---------------------------------------------------------------------------------------
// Channel adapters: a tokio channel as `Sink<Frame>` and `Stream<Item = Frame>`.
// ---------------------------------------------------------------------------------------

struct ChanSink(mpsc::UnboundedSender<Frame>);

impl Sink<Frame> for ChanSink {
    type Error = &'static str;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Frame) -> Result<(), Self::Error> {
        self.0.send(item).map_err(|_| "receiver dropped")
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

struct ChanStream(mpsc::UnboundedReceiver<Frame>);

impl Stream for ChanStream {
    type Item = Frame;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        self.0.poll_recv(cx)
    }
}

// ---------------------------------------------------------------------------------------
// Fake gateway
// ---------------------------------------------------------------------------------------

/// A runner whose work directories live in a temporary home.
struct Agent {
    runner: Arc<Runner>,
    shutdown: CancellationToken,
    home: tempfile::TempDir,
}

fn agent(tune: impl FnOnce(&mut AgentSettings)) -> Agent {
    let home = tempfile::tempdir().unwrap();
    let mut settings = AgentSettings::with_home(home.path());
    settings.host_kill_grace = Duration::from_millis(200);
    tune(&mut settings);
    Agent {
        runner: Runner::new(settings),
        shutdown: CancellationToken::new(),
        home,
    }
}

impl Agent {
    /// Starts a session; the test plays the gateway.
    fn connect(&self) -> Gw {
        let (to_agent, stream_rx) = mpsc::unbounded_channel();
        let (sink_tx, from_agent) = mpsc::unbounded_channel();
        let runner = self.runner.clone();
        let shutdown = self.shutdown.clone();
        let join = tokio::spawn(async move {
            run_session(
                &runner,
                ChanSink(sink_tx),
                ChanStream(stream_rx),
                &shutdown,
                MAX_FRAME,
            )
            .await
        });
        Gw {
            to_agent: Some(to_agent),
            from_agent,
            join,
        }
    }

    /// Waits until the runner holds nothing (no public notification for acks).
    async fn wait_empty(&self) {
        let deadline = Instant::now() + WAIT;
        while !self.runner.is_empty() {
            assert!(Instant::now() < deadline, "runner still holds tasks");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The gateway's side of one session.
struct Gw {
    to_agent: Option<mpsc::UnboundedSender<Frame>>,
    from_agent: mpsc::UnboundedReceiver<Frame>,
    join: JoinHandle<SessionEnd>,
}

impl Gw {
    fn send_frame(&self, frame: Frame) {
        self.to_agent
            .as_ref()
            .expect("connection still open")
            .send(frame)
            .expect("session stream dropped");
    }

    fn send(&self, msg: &GatewayMessage) {
        self.send_frame(encode(msg));
    }

    async fn frame(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.from_agent.recv())
            .await
            .expect("timed out waiting for an agent frame")
            .expect("the session ended without sending the expected frame")
    }

    /// The next agent message, heartbeats skipped.
    async fn recv(&mut self) -> AgentMessage {
        loop {
            let frame = self.frame().await;
            let msg = decode_agent(&frame, usize::MAX)
                .unwrap_or_else(|e| panic!("agent sent an undecodable frame {frame:?}: {e}"))
                .unwrap_or_else(|| panic!("expected a message, got control frame {frame:?}"));
            if !matches!(msg, AgentMessage::Heartbeat(_)) {
                return msg;
            }
        }
    }

    /// Reads `hello` and answers `hello_ok` (with `cancel`).
    async fn handshake_cancel(&mut self, cancel: Vec<RunningTask>) -> Hello {
        let hello = match self.recv().await {
            AgentMessage::Hello(h) => h,
            other => panic!("expected hello first, got {other:?}"),
        };
        self.send(&GatewayMessage::HelloOk(HelloOk {
            protocol: PROTOCOL_VERSION,
            agent_id: "agent-1".into(),
            org_id: "org-1".into(),
            heartbeat_interval_ms: 60_000,
            cancel,
            instance_token: None,
        }));
        hello
    }

    async fn handshake(&mut self) -> Hello {
        self.handshake_cancel(vec![]).await
    }

    async fn expect_accepted(&mut self, task_id: &str, attempt: u32) {
        match self.recv().await {
            AgentMessage::Accepted(t) => assert_eq!(
                t,
                TaskRef {
                    task_id: task_id.into(),
                    attempt
                }
            ),
            other => panic!("expected accepted for {task_id}, got {other:?}"),
        }
    }

    async fn expect_result(&mut self) -> TaskResult {
        match self.recv().await {
            AgentMessage::Result(r) => r,
            other => panic!("expected result, got {other:?}"),
        }
    }

    async fn expect_error(&mut self, code: ErrorCode) -> ErrorBody {
        match self.recv().await {
            AgentMessage::Error(e) => {
                assert_eq!(e.code, code, "unexpected error {e:?}");
                e
            }
            other => panic!("expected error {code}, got {other:?}"),
        }
    }

    /// Asserts the agent sends nothing but heartbeats for `dur`.
    async fn expect_silence(&mut self, dur: Duration) {
        let deadline = tokio::time::Instant::now() + dur;
        while let Ok(frame) = tokio::time::timeout_at(deadline, self.from_agent.recv()).await {
            let frame = frame.expect("session ended while it should be idle");
            let msg = decode_agent(&frame, usize::MAX).unwrap();
            assert!(
                matches!(msg, Some(AgentMessage::Heartbeat(_))),
                "expected silence, got {frame:?}"
            );
        }
    }

    /// Waits for `run_session` to return.
    async fn end(&mut self) -> SessionEnd {
        tokio::time::timeout(WAIT, &mut self.join)
            .await
            .expect("run_session did not return")
            .expect("run_session panicked")
    }

    /// The connection drops: the agent sees its stream end.
    async fn drop_connection(mut self) -> SessionEnd {
        self.to_agent = None;
        self.end().await
    }
}

fn spec(json: serde_json::Value) -> TaskSpec {
    serde_json::from_value(json).unwrap()
}

fn dispatch(task_id: &str, attempt: u32, spec: TaskSpec) -> GatewayMessage {
    GatewayMessage::Dispatch(Box::new(Dispatch {
        task_id: task_id.into(),
        attempt,
        lease_deadline_ms: now_ms() + 30_000,
        spec,
    }))
}

fn script(s: &str) -> TaskSpec {
    spec(serde_json::json!({ "kind": "agent.execute", "shell": { "script": s } }))
}

fn argv(args: &[&str]) -> TaskSpec {
    spec(serde_json::json!({ "kind": "agent.execute", "shell": { "argv": args } }))
}

fn running(task_id: &str, attempt: u32) -> RunningTask {
    RunningTask {
        task_id: task_id.into(),
        attempt,
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_comes_first_and_declares_capabilities() {
    let a = agent(|s| {
        s.max_in_flight = 3;
        s.reported_tags = vec!["east".into()];
    });
    let mut gw = a.connect();
    let frame = gw.frame().await;
    let Some(AgentMessage::Hello(hello)) = decode_agent(&frame, MAX_FRAME).unwrap() else {
        panic!("first frame must be hello, got {frame:?}")
    };
    assert_eq!(hello.protocol, 1);
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        hello.capabilities.kinds,
        vec![
            "agent.execute".to_string(),
            "bundle.run".to_string(),
            "agent.noop".to_string()
        ]
    );
    assert_eq!(
        hello.capabilities.backends.first().map(String::as_str),
        Some("host")
    );
    assert_eq!(hello.capabilities.max_in_flight, 3);
    assert_eq!(hello.capabilities.tags, vec!["east".to_string()]);
    assert!(hello.capabilities.connectors.is_empty());
    assert_eq!(hello.running, vec![]);
    // Nothing else before hello_ok.
    gw.expect_silence(Duration::from_millis(200)).await;
    assert!(matches!(
        gw.drop_connection().await,
        SessionEnd::Disconnected(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_instead_of_hello_ok_is_fatal_or_retried() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    assert!(matches!(gw.recv().await, AgentMessage::Hello(_)));
    gw.send(&GatewayMessage::Error(ErrorBody {
        code: ErrorCode::ProtocolVersionUnsupported,
        message: "no".into(),
        task_id: None,
        attempt: None,
    }));
    assert_eq!(
        gw.end().await,
        SessionEnd::Fatal(ErrorCode::ProtocolVersionUnsupported, "no".into())
    );

    let mut gw = a.connect();
    assert!(matches!(gw.recv().await, AgentMessage::Hello(_)));
    gw.send(&GatewayMessage::Error(ErrorBody {
        code: ErrorCode::Unavailable,
        message: "try later".into(),
        task_id: None,
        attempt: None,
    }));
    assert!(matches!(gw.end().await, SessionEnd::Disconnected(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_runs_reports_and_replays_until_acknowledged() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    gw.handshake().await;
    gw.send(&dispatch("t-echo", 1, script("echo hi")));
    let mut log = Vec::new();
    gw.expect_accepted("t-echo", 1).await;
    log.push(AgentMessage::Accepted(TaskRef {
        task_id: "t-echo".into(),
        attempt: 1,
    }));
    let out = gw.recv().await;
    assert_eq!(
        out,
        AgentMessage::Output(Output {
            task_id: "t-echo".into(),
            attempt: 1,
            seq: 1,
            stream: OutStream::Stdout,
            data: "hi\n".into(),
        })
    );
    log.push(out);
    let res = gw.expect_result().await;
    assert_eq!(res.task_id, "t-echo");
    assert_eq!(res.attempt, 1);
    assert_eq!(res.status, ResultStatus::Succeeded);
    assert_eq!(res.exit_code, Some(0));
    assert_eq!(res.signal, None);
    assert_eq!(res.error_code, None);
    assert_eq!(res.stdout, "hi\n");
    assert_eq!(res.stderr, "");
    assert!(!res.stdout_truncated);
    assert!(res.started_at_ms <= res.finished_at_ms);
    log.push(AgentMessage::Result(res.clone()));
    // The work directory is gone once the run is over and its clean-up (in the background,
    // after the result) has settled.
    a.runner.settle().await;
    assert!(!a.runner.settings().workdir_root.join("t-echo-1").exists());
    gw.expect_silence(Duration::from_millis(200)).await;

    // No result_ack: the connection drops, and the next session re-reports everything.
    assert!(matches!(
        gw.drop_connection().await,
        SessionEnd::Disconnected(_)
    ));
    assert_eq!(a.runner.running(), vec![running("t-echo", 1)]);
    let mut gw = a.connect();
    let hello = gw.handshake().await;
    assert_eq!(hello.running, vec![running("t-echo", 1)]);
    for expected in &log {
        assert_eq!(&gw.recv().await, expected);
    }
    gw.expect_silence(Duration::from_millis(200)).await;

    // Acknowledged: the runner forgets the task.
    gw.send(&GatewayMessage::ResultAck(ResultAck {
        task_id: "t-echo".into(),
        attempt: 1,
        stored: true,
    }));
    a.wait_empty().await;
    assert!(matches!(
        gw.drop_connection().await,
        SessionEnd::Disconnected(_)
    ));
    let mut gw = a.connect();
    let hello = gw.handshake().await;
    assert_eq!(hello.running, vec![]);
    gw.expect_silence(Duration::from_millis(300)).await;
    drop(a.home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_for_another_attempt_keeps_the_result() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    gw.handshake().await;
    gw.send(&dispatch("t-1", 2, argv(&["true"])));
    gw.expect_accepted("t-1", 2).await;
    assert_eq!(gw.expect_result().await.status, ResultStatus::Succeeded);
    gw.send(&GatewayMessage::ResultAck(ResultAck {
        task_id: "t-1".into(),
        attempt: 1,
        stored: false,
    }));
    gw.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(a.runner.running(), vec![running("t-1", 2)]);
    gw.send(&GatewayMessage::ResultAck(ResultAck {
        task_id: "t-1".into(),
        attempt: 2,
        stored: false,
    }));
    a.wait_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_mode_none_is_refused_by_the_host_backend() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    gw.handshake().await;
    gw.send(&dispatch(
        "t-net",
        1,
        spec(serde_json::json!({
            "kind": "agent.execute",
            "shell": { "argv": ["true"] },
            "sandbox": { "networkMode": "none" },
        })),
    ));
    gw.expect_accepted("t-net", 1).await;
    let res = gw.expect_result().await;
    assert_eq!((res.task_id.as_str(), res.attempt), ("t-net", 1));
    assert_eq!(res.status, ResultStatus::Error);
    assert_eq!(res.error_code, Some(ErrorCode::HostNetworkModeUnsupported));
    assert_eq!(res.exit_code, None);
    assert!(res.error_message.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_task() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    gw.handshake().await;
    gw.send(&dispatch("t-sleep", 1, argv(&["sleep", "30"])));
    gw.expect_accepted("t-sleep", 1).await;
    // A cancel for another attempt is ignored.
    gw.send(&GatewayMessage::Cancel(Cancel {
        task_id: "t-sleep".into(),
        attempt: 2,
        reason: "not this one".into(),
    }));
    gw.expect_silence(Duration::from_millis(300)).await;
    let sent = Instant::now();
    gw.send(&GatewayMessage::Cancel(Cancel {
        task_id: "t-sleep".into(),
        attempt: 1,
        reason: "test".into(),
    }));
    let res = gw.expect_result().await;
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!((res.task_id.as_str(), res.attempt), ("t-sleep", 1));
    assert_eq!(res.status, ResultStatus::Canceled);
    assert_eq!(res.error_code, Some(ErrorCode::TaskCanceled));
    assert_eq!(res.exit_code, None);
    assert_eq!(res.signal, Some(15), "stopped by SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_ok_cancel_stops_listed_tasks() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    gw.handshake().await;
    gw.send(&dispatch("t-gone", 1, argv(&["sleep", "30"])));
    gw.expect_accepted("t-gone", 1).await;
    gw.drop_connection().await;

    let mut gw = a.connect();
    let hello = gw.handshake_cancel(vec![running("t-gone", 1)]).await;
    assert_eq!(hello.running, vec![running("t-gone", 1)]);
    gw.expect_accepted("t-gone", 1).await;
    let res = gw.expect_result().await;
    assert_eq!(res.status, ResultStatus::Canceled);
    assert_eq!(res.error_code, Some(ErrorCode::TaskCanceled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_revoked_is_fatal() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    gw.handshake().await;
    // An error about one task is not fatal.
    gw.send(&GatewayMessage::Error(ErrorBody {
        code: ErrorCode::AgentRevoked,
        message: "about a task".into(),
        task_id: Some("t-x".into()),
        attempt: Some(1),
    }));
    gw.expect_silence(Duration::from_millis(200)).await;
    assert!(!gw.join.is_finished());
    gw.send(&GatewayMessage::Error(ErrorBody {
        code: ErrorCode::AgentRevoked,
        message: "this agent has been revoked".into(),
        task_id: None,
        attempt: None,
    }));
    assert_eq!(
        gw.end().await,
        SessionEnd::Fatal(
            ErrorCode::AgentRevoked,
            "this agent has been revoked".into()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_fatal_gateway_error_then_close_disconnects() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    gw.handshake().await;
    // A non-fatal error is only logged; the gateway's close that follows ends the session.
    gw.send(&GatewayMessage::Error(ErrorBody {
        code: ErrorCode::Unavailable,
        message: "gateway shutting down; reconnect".into(),
        task_id: None,
        attempt: None,
    }));
    gw.expect_silence(Duration::from_millis(200)).await;
    assert!(!gw.join.is_finished());
    gw.send_frame(Frame::Close);
    match gw.end().await {
        SessionEnd::Disconnected(why) => assert!(why.contains("closed"), "{why}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_running_tasks_back() {
    let grace = Duration::from_secs(1);
    let a = agent(|s| s.shutdown_grace = grace);
    let mut gw = a.connect();
    gw.handshake().await;
    gw.send(&dispatch("t-long", 1, argv(&["sleep", "10"])));
    gw.expect_accepted("t-long", 1).await;

    let began = Instant::now();
    a.shutdown.cancel();
    // A dispatch arriving while draining is handed back at once.
    gw.send(&dispatch("t-late", 1, argv(&["true"])));
    let e = gw.expect_error(ErrorCode::AgentShuttingDown).await;
    assert_eq!((e.task_id.as_deref(), e.attempt), (Some("t-late"), Some(1)));
    assert!(began.elapsed() < grace, "not delayed by the grace");
    // The running task gets the grace, then is stopped and handed back (no result).
    let e = gw.expect_error(ErrorCode::AgentShuttingDown).await;
    assert_eq!((e.task_id.as_deref(), e.attempt), (Some("t-long"), Some(1)));
    assert!(
        began.elapsed() >= grace,
        "handed back before the grace: {:?}",
        began.elapsed()
    );
    assert_eq!(gw.frame().await, Frame::Close);
    assert_eq!(gw.end().await, SessionEnd::Drained);
    assert!(a.runner.is_empty());
    assert!(
        began.elapsed() < grace + Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_task_that_finishes_within_the_grace() {
    let a = agent(|s| s.shutdown_grace = Duration::from_secs(20));
    let mut gw = a.connect();
    gw.handshake().await;
    gw.send(&dispatch("t-short", 1, script("sleep 0.3; echo done")));
    gw.expect_accepted("t-short", 1).await;
    a.shutdown.cancel();
    assert!(matches!(gw.recv().await, AgentMessage::Output(_)));
    let res = gw.expect_result().await;
    assert_eq!(
        (res.status, res.stdout.as_str()),
        (ResultStatus::Succeeded, "done\n")
    );
    // The result is owed until acknowledged: the session stays up.
    gw.expect_silence(Duration::from_millis(200)).await;
    assert!(!gw.join.is_finished());
    gw.send(&GatewayMessage::ResultAck(ResultAck {
        task_id: "t-short".into(),
        attempt: 1,
        stored: true,
    }));
    assert_eq!(gw.frame().await, Frame::Close);
    assert_eq!(gw.end().await, SessionEnd::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_beyond_max_in_flight_is_refused_busy() {
    let a = agent(|s| s.max_in_flight = 1);
    let mut gw = a.connect();
    let hello = gw.handshake().await;
    assert_eq!(hello.capabilities.max_in_flight, 1);
    gw.send(&dispatch("t-a", 1, argv(&["sleep", "30"])));
    gw.expect_accepted("t-a", 1).await;
    gw.send(&dispatch("t-b", 1, argv(&["true"])));
    let e = gw.expect_error(ErrorCode::AgentBusy).await;
    assert_eq!((e.task_id.as_deref(), e.attempt), (Some("t-b"), Some(1)));
    gw.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(a.runner.running(), vec![running("t-a", 1)]);
    // A duplicate dispatch of the running attempt is ignored.
    gw.send(&dispatch("t-a", 1, argv(&["sleep", "30"])));
    gw.expect_silence(Duration::from_millis(200)).await;
    // Cleanup: cancel the long task.
    gw.send(&GatewayMessage::Cancel(Cancel {
        task_id: "t-a".into(),
        attempt: 1,
        reason: "done".into(),
    }));
    assert_eq!(gw.expect_result().await.status, ResultStatus::Canceled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_nothing_owed_drains_at_once() {
    let a = agent(|_| {});
    let mut gw = a.connect();
    gw.handshake().await;
    a.shutdown.cancel();
    assert_eq!(gw.frame().await, Frame::Close);
    assert_eq!(gw.end().await, SessionEnd::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_attempt_of_a_running_task_stops_the_old_one() {
    let a = agent(|_| {});
    let pid_file = a.home.path().join("attempt1.pid");
    let mut gw = a.connect();
    gw.handshake().await;
    gw.send(&dispatch(
        "t-re",
        1,
        script(&format!("echo $$ > {}; exec sleep 30", pid_file.display())),
    ));
    gw.expect_accepted("t-re", 1).await;
    let deadline = Instant::now() + WAIT;
    let pid = loop {
        if let Ok(text) = std::fs::read_to_string(&pid_file)
            && let Ok(pid) = text.trim().parse::<u32>()
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "attempt 1 never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The gateway re-dispatches the same task as attempt 2 (e.g. after a lease expiry).
    gw.send(&dispatch("t-re", 2, argv(&["true"])));
    gw.expect_accepted("t-re", 2).await;
    let res = gw.expect_result().await;
    assert_eq!((res.attempt, res.status), (2, ResultStatus::Succeeded));
    // Attempt 1's process must not survive untracked.
    let deadline = Instant::now() + Duration::from_secs(5);
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let still_alive = alive(pid);
    if still_alive {
        // Do not leave it behind.
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    assert!(
        !still_alive,
        "attempt 1 (pid {pid}) still running 5 s after attempt 2 replaced it"
    );
}
