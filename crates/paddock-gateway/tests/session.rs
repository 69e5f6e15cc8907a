//! The executor WebSocket session (`executor_ws::run_session`) driven through in-memory
//! channels: the test plays the agent, a real gateway (SQLite, fast timings) plays itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, Stream};
use paddock_gateway::executor_ws::run_session;
use paddock_gateway::{AppState, Gateway, GatewayConfig};
use paddock_proto::{
    AgentMessage, Capabilities, ErrorBody, ErrorCode, Event, Frame, GatewayMessage, Heartbeat,
    Hello, HelloOk, Output, PROTOCOL_VERSION, ResultAck, ResultStatus, RunningTask,
    Stream as OutStream, TaskRef, TaskResult, TaskSpec, decode_gateway, encode, now_ms,
};
use paddock_store::{Agent, NewTask, Org, Role, TaskRow, TaskState};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Upper bound on any single wait.
const WAIT: Duration = Duration::from_secs(10);
/// Frame limit configured for these tests.
const MAX_FRAME: usize = 4096;
/// Heartbeat interval configured for these tests (also the presence / lease-extension period).
const HEARTBEAT: Duration = Duration::from_millis(250);

// ---------------------------------------------------------------------------------------
// Channel adapters: a tokio channel as `Sink<Frame>` and `Stream<Item = Frame>`.
// ---------------------------------------------------------------------------------------

/// A channel as the session's sink. `buffered` behaves like a socket's write buffer: frames
/// reach the other end only when the session flushes.
struct ChanSink {
    tx: mpsc::UnboundedSender<Frame>,
    buffered: Option<Vec<Frame>>,
}

impl Sink<Frame> for ChanSink {
    type Error = &'static str;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: Frame) -> Result<(), Self::Error> {
        match &mut self.buffered {
            Some(buf) => {
                buf.push(item);
                Ok(())
            }
            None => self.tx.send(item).map_err(|_| "receiver dropped"),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = &mut *self;
        if let Some(buf) = &mut this.buffered {
            for f in buf.drain(..) {
                if this.tx.send(f).is_err() {
                    return Poll::Ready(Err("receiver dropped"));
                }
            }
        }
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
// Harness
// ---------------------------------------------------------------------------------------

/// A gateway on a fresh SQLite file, one org and one managed agent.
struct Harness {
    state: AppState,
    org: Org,
    agent: Agent,
    _gateway: Gateway,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}

async fn harness() -> Harness {
    harness_with_tick(Duration::from_millis(50)).await
}

/// `tick`: the dispatcher's periodic sweep (an hour: only wake-ups dispatch).
async fn harness_with_tick(tick: Duration) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("paddock.db").display());
    let mut cfg = GatewayConfig::new(url);
    cfg.tick = tick;
    cfg.lease = Duration::from_secs(2);
    cfg.heartbeat_interval = HEARTBEAT;
    cfg.max_frame_bytes = MAX_FRAME;
    let gateway = Gateway::start(cfg).await.unwrap();
    let state = gateway.state().clone();
    let org = state.store.create_org("acme").await.unwrap();
    let (agent, _token) = state
        .store
        .issue_managed_agent(&org.id, "agent-1", &[])
        .await
        .unwrap();
    Harness {
        state,
        org,
        agent,
        _gateway: gateway,
        _dir: dir,
    }
}

impl Harness {
    fn connect(&self) -> Conn {
        self.connect_as(&self.agent)
    }

    fn connect_as(&self, agent: &Agent) -> Conn {
        self.connect_with(agent, false)
    }

    /// A session whose frames reach the test only when the gateway flushes its sink.
    fn connect_buffered(&self) -> Conn {
        self.connect_with(&self.agent, true)
    }

    fn connect_with(&self, agent: &Agent, buffered: bool) -> Conn {
        let (to_gw, stream_rx) = mpsc::unbounded_channel();
        let (sink_tx, from_gw) = mpsc::unbounded_channel();
        let sink = ChanSink {
            tx: sink_tx,
            buffered: buffered.then(Vec::new),
        };
        let join = tokio::spawn(run_session(
            self.state.clone(),
            agent.clone(),
            sink,
            ChanStream(stream_rx),
        ));
        Conn {
            to_gw,
            from_gw,
            join,
        }
    }

    async fn insert(&self, org_id: &str, spec: &TaskSpec) -> String {
        self.state
            .store
            .insert_task(&NewTask {
                id: None,
                org_id: org_id.to_string(),
                spec: spec.clone(),
                max_attempts: 2,
                queue_deadline_at: now_ms() + 600_000,
            })
            .await
            .unwrap()
    }

    /// Submits a task through the HTTP API (`POST .../tasks`, an admin token), as a client
    /// does: the submission's own path, with its claims.
    async fn submit(&self, spec: &TaskSpec) -> String {
        use tower::ServiceExt;
        let (_, token) = self
            .state
            .store
            .create_api_token(&self.org.id, Role::Admin, "test")
            .await
            .unwrap();
        let req = axum::http::Request::post(format!("/v1/orgs/{}/tasks", self.org.id))
            .header("authorization", format!("Bearer {token}"))
            .header("x-org-id", &self.org.id)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(serde_json::to_vec(spec).unwrap()))
            .unwrap();
        let resp = paddock_gateway::app(self.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["taskId"].as_str().expect("the new task's id").to_string()
    }

    async fn task(&self, org_id: &str, id: &str) -> TaskRow {
        self.state
            .store
            .get_task(org_id, id)
            .await
            .unwrap()
            .expect("task exists")
    }
}

/// One session: the test holds the agent's ends of the two channels.
struct Conn {
    to_gw: mpsc::UnboundedSender<Frame>,
    from_gw: mpsc::UnboundedReceiver<Frame>,
    join: JoinHandle<()>,
}

impl Conn {
    fn send_frame(&self, frame: Frame) {
        self.to_gw.send(frame).expect("session stream dropped");
    }

    fn send(&self, msg: &AgentMessage) {
        self.send_frame(encode(msg));
    }

    fn send_text(&self, text: &str) {
        self.send_frame(Frame::Text(text.to_string()));
    }

    /// The next frame the gateway sent.
    async fn frame(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.from_gw.recv())
            .await
            .expect("timed out waiting for a gateway frame")
            .expect("the session ended without sending the expected frame")
    }

    /// The next gateway message (panics on a control frame).
    async fn recv(&mut self) -> GatewayMessage {
        let frame = self.frame().await;
        decode_gateway(&frame, usize::MAX)
            .unwrap_or_else(|e| panic!("gateway sent an undecodable frame {frame:?}: {e}"))
            .unwrap_or_else(|| panic!("expected a message, got control frame {frame:?}"))
    }

    /// The next gateway message, skipping heartbeats.
    async fn recv_skip_heartbeats(&mut self) -> GatewayMessage {
        loop {
            match self.recv().await {
                GatewayMessage::Heartbeat(_) => {}
                other => return other,
            }
        }
    }

    async fn expect_error(&mut self, code: ErrorCode) -> ErrorBody {
        match self.recv().await {
            GatewayMessage::Error(e) => {
                assert_eq!(e.code, code, "unexpected error: {e:?}");
                e
            }
            other => panic!("expected error {code}, got {other:?}"),
        }
    }

    async fn expect_dispatch(&mut self) -> paddock_proto::Dispatch {
        match self.recv_skip_heartbeats().await {
            GatewayMessage::Dispatch(d) => *d,
            other => panic!("expected dispatch, got {other:?}"),
        }
    }

    async fn expect_ack(&mut self) -> ResultAck {
        match self.recv_skip_heartbeats().await {
            GatewayMessage::ResultAck(a) => a,
            other => panic!("expected result_ack, got {other:?}"),
        }
    }

    async fn expect_close(&mut self) {
        let frame = self.frame().await;
        assert_eq!(frame, Frame::Close, "expected a close frame");
    }

    /// Sends `hello` and returns `hello_ok`.
    async fn hello(&mut self, max_in_flight: u32, running: Vec<RunningTask>) -> HelloOk {
        self.send(&hello(PROTOCOL_VERSION, max_in_flight, running));
        match self.recv().await {
            GatewayMessage::HelloOk(ok) => ok,
            other => panic!("expected hello_ok, got {other:?}"),
        }
    }

    /// Round trip through the session: every message sent before has been fully handled
    /// (including its database writes) when this returns.
    async fn sync(&mut self) {
        self.send(&AgentMessage::Heartbeat(Heartbeat { ts_ms: now_ms() }));
        match self.recv().await {
            GatewayMessage::Heartbeat(h) => assert!(h.ts_ms > 0),
            other => panic!("expected the heartbeat answer, got {other:?}"),
        }
    }

    /// Asserts the gateway sends nothing for `dur`.
    async fn expect_silence(&mut self, dur: Duration) {
        if let Ok(frame) = tokio::time::timeout(dur, self.from_gw.recv()).await {
            panic!("expected no frame for {dur:?}, got {frame:?}");
        }
    }

    /// Waits for `run_session` to return; nothing more is sent after it.
    async fn ended(mut self) {
        tokio::time::timeout(WAIT, &mut self.join)
            .await
            .expect("run_session did not finish")
            .expect("run_session panicked");
        assert_eq!(
            self.from_gw.recv().await,
            None,
            "frame after the session ended"
        );
    }

    async fn is_running(&self) -> bool {
        tokio::time::sleep(Duration::from_millis(100)).await;
        !self.join.is_finished()
    }
}

fn hello(protocol: u32, max_in_flight: u32, running: Vec<RunningTask>) -> AgentMessage {
    AgentMessage::Hello(Hello {
        protocol,
        agent_version: "0.0.0-test".into(),
        capabilities: Capabilities {
            kinds: vec!["agent.execute".into()],
            connectors: vec![],
            tags: vec!["reported".into()],
            max_in_flight,
            backends: vec!["host".into()],
        },
        running,
    })
}

fn echo_spec(word: &str) -> TaskSpec {
    serde_json::from_value(serde_json::json!({
        "kind": "agent.execute",
        "shell": { "argv": ["echo", word], "env": { "A": "1" } },
        "timeoutMs": 5000,
    }))
    .unwrap()
}

fn result(task_id: &str, attempt: u32, status: ResultStatus, stdout: &str) -> TaskResult {
    TaskResult {
        task_id: task_id.into(),
        attempt,
        status,
        exit_code: Some(if status == ResultStatus::Succeeded {
            0
        } else {
            1
        }),
        signal: None,
        error_code: None,
        error_message: None,
        stdout: stdout.into(),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        started_at_ms: now_ms() - 10,
        finished_at_ms: now_ms(),
    }
}

fn output(task_id: &str, attempt: u32, seq: u64, data: &str) -> AgentMessage {
    AgentMessage::Output(Output {
        task_id: task_id.into(),
        attempt,
        seq,
        stream: OutStream::Stdout,
        data: data.into(),
    })
}

fn accepted(task_id: &str, attempt: u32) -> AgentMessage {
    AgentMessage::Accepted(TaskRef {
        task_id: task_id.into(),
        attempt,
    })
}

fn running(task_id: &str, attempt: u32) -> RunningTask {
    RunningTask {
        task_id: task_id.into(),
        attempt,
    }
}

// ---------------------------------------------------------------------------------------
// hello
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_ok_carries_identity_and_heartbeat_interval() {
    let h = harness().await;
    let mut c = h.connect();
    let ok = c.hello(3, vec![]).await;
    assert_eq!(
        ok,
        HelloOk {
            protocol: PROTOCOL_VERSION,
            agent_id: h.agent.id.clone(),
            org_id: h.org.id.clone(),
            heartbeat_interval_ms: HEARTBEAT.as_millis() as u64,
            cancel: vec![],
            instance_token: None,
        }
    );
    let handle = h.state.hub.get(&h.agent.id).expect("registered in the hub");
    assert_eq!(handle.max_in_flight, 3);
    assert_eq!(handle.kinds, vec!["agent.execute".to_string()]);
    assert_eq!(handle.backends, vec!["host".to_string()]);
    let stored = h
        .state
        .store
        .get_agent(&h.org.id, &h.agent.id)
        .await
        .unwrap()
        .unwrap();
    assert!(stored.connected_replica.is_some());
    assert_eq!(stored.agent_version.as_deref(), Some("0.0.0-test"));
    assert_eq!(stored.reported_tags, vec!["reported".to_string()]);

    // The agent closes: the session ends and unregisters.
    c.send_frame(Frame::Close);
    c.ended().await;
    assert!(h.state.hub.get(&h.agent.id).is_none());
    let stored = h
        .state
        .store
        .get_agent(&h.org.id, &h.agent.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.connected_replica, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_must_be_hello() {
    let h = harness().await;
    let mut c = h.connect();
    c.send(&AgentMessage::Heartbeat(Heartbeat { ts_ms: now_ms() }));
    c.expect_error(ErrorCode::ProtocolViolation).await;
    c.expect_close().await;
    c.ended().await;
    assert!(h.state.hub.get(&h.agent.id).is_none());

    // A malformed first frame is reported as such, and also ends the session.
    let mut c = h.connect();
    c.send_text("{");
    c.expect_error(ErrorCode::MalformedFrame).await;
    c.expect_close().await;
    c.ended().await;
    assert!(h.state.hub.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_version_is_refused() {
    let h = harness().await;
    let mut c = h.connect();
    c.send(&hello(99, 10, vec![]));
    let e = c.expect_error(ErrorCode::ProtocolVersionUnsupported).await;
    assert!(e.message.contains("99"), "message names the version: {e:?}");
    c.expect_close().await;
    c.ended().await;
    assert!(h.state.hub.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_twice_is_a_protocol_violation() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    c.send(&hello(PROTOCOL_VERSION, 10, vec![]));
    c.expect_error(ErrorCode::ProtocolViolation).await;
    c.expect_close().await;
    c.ended().await;
    assert!(h.state.hub.is_empty());
}

// ---------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_reported_and_the_session_continues() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    for bad in [
        "{",
        r#"{"type":"nope"}"#,
        r#"{"type":"accepted","taskId":1,"attempt":"x"}"#,
        r#"{"type":"output","taskId":"t","attempt":1,"seq":-1,"stream":"stdout","data":""}"#,
    ] {
        c.send_text(bad);
        let e = c.expect_error(ErrorCode::MalformedFrame).await;
        assert_eq!((e.task_id, e.attempt), (None, None), "input {bad:?}");
    }
    c.send_frame(Frame::Binary(vec![1, 2, 3]));
    c.expect_error(ErrorCode::MalformedFrame).await;
    // Transport pings are ignored silently.
    c.send_frame(Frame::Ping);
    // Still alive: a heartbeat is answered.
    c.sync().await;
    assert!(c.is_running().await);
    assert!(h.state.hub.get(&h.agent.id).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_malformed_frames_close_the_session() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    for _ in 0..15 {
        c.send_text("{");
        c.expect_error(ErrorCode::MalformedFrame).await;
    }
    c.sync().await;
    c.send_text("{");
    c.expect_error(ErrorCode::MalformedFrame).await;
    c.expect_close().await;
    c.ended().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_closes_the_session() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    // Exactly at the limit is fine (a heartbeat padded with spaces).
    let at_limit = r#"{"type":"heartbeat","tsMs":1}"#;
    let padded = format!("{at_limit}{}", " ".repeat(MAX_FRAME - at_limit.len()));
    assert_eq!(padded.len(), MAX_FRAME);
    c.send_text(&padded);
    assert!(matches!(c.recv().await, GatewayMessage::Heartbeat(_)));
    // One byte over is refused and ends the session.
    c.send_text(&format!("{padded} "));
    let e = c.expect_error(ErrorCode::FrameTooLarge).await;
    assert!(e.message.contains(&MAX_FRAME.to_string()), "{e:?}");
    c.expect_close().await;
    c.ended().await;
    assert!(h.state.hub.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_binary_frame_is_too_large() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    c.send_frame(Frame::Binary(vec![0; MAX_FRAME + 1]));
    c.expect_error(ErrorCode::FrameTooLarge).await;
    c.expect_close().await;
    c.ended().await;
}

// ---------------------------------------------------------------------------------------
// Dispatch, output, results
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_accept_output_and_result_flow() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    let spec = echo_spec("hi");
    let before = now_ms();
    let id = h.insert(&h.org.id, &spec).await;

    let d = c.expect_dispatch().await;
    assert_eq!(d.task_id, id);
    assert_eq!(d.attempt, 1);
    assert_eq!(d.spec, spec);
    assert!(
        d.lease_deadline_ms >= before + 1_500 && d.lease_deadline_ms <= now_ms() + 2_000,
        "lease deadline ~ now + 2 s: {}",
        d.lease_deadline_ms
    );
    let t = h.task(&h.org.id, &id).await;
    assert_eq!(t.state, TaskState::Dispatched);
    assert_eq!(t.attempt, 1);
    assert_eq!(t.agent_id.as_deref(), Some(h.agent.id.as_str()));
    assert!(h.state.hub.get(&h.agent.id).unwrap().owns(&id));

    c.send(&accepted(&id, 1));
    c.sync().await;
    let t = h.task(&h.org.id, &id).await;
    assert_eq!(t.state, TaskState::Running);
    assert!(t.started_at.is_some());

    for seq in 1..=3 {
        c.send(&output(&id, 1, seq, &format!("line {seq}\n")));
    }
    // A duplicate sequence number is ignored (the first chunk wins).
    c.send(&output(&id, 1, 2, "duplicate\n"));
    c.send(&AgentMessage::Event(Event {
        task_id: id.clone(),
        attempt: 1,
        name: "started".into(),
        payload: serde_json::json!({ "pid": 42 }),
    }));
    c.sync().await;
    let out = h.state.store.read_output(&id, 1, 0, 100).await.unwrap();
    assert_eq!(
        out.iter()
            .map(|o| (o.attempt, o.seq, o.stream.as_str(), o.data.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (1, 1, "stdout", "line 1\n"),
            (1, 2, "stdout", "line 2\n"),
            (1, 3, "stdout", "line 3\n"),
        ]
    );
    let events = h.state.store.list_events(&id).await.unwrap();
    let started = events
        .iter()
        .find(|e| e.name == "started")
        .expect("started event stored");
    assert_eq!(started.attempt, 1);
    assert_eq!(started.payload, serde_json::json!({ "pid": 42 }));

    let res = result(&id, 1, ResultStatus::Succeeded, "hi\n");
    c.send(&AgentMessage::Result(res.clone()));
    assert_eq!(
        c.expect_ack().await,
        ResultAck {
            task_id: id.clone(),
            attempt: 1,
            stored: true
        }
    );
    let done = h.task(&h.org.id, &id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.result.as_ref(), Some(&res));
    assert!(done.finished_at.is_some());
    assert!(!h.state.hub.get(&h.agent.id).unwrap().owns(&id));

    // The same result again: acknowledged, not stored (first completion wins).
    let mut again = res.clone();
    again.stdout = "second\n".into();
    c.send(&AgentMessage::Result(again));
    assert_eq!(
        c.expect_ack().await,
        ResultAck {
            task_id: id.clone(),
            attempt: 1,
            stored: false
        }
    );
    // A result for an attempt that is not current: not stored, task unchanged.
    c.send(&AgentMessage::Result(result(
        &id,
        2,
        ResultStatus::Failed,
        "late\n",
    )));
    assert_eq!(
        c.expect_ack().await,
        ResultAck {
            task_id: id.clone(),
            attempt: 2,
            stored: false
        }
    );
    assert_eq!(h.task(&h.org.id, &id).await, done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_for_a_stale_attempt_of_a_running_task_is_ignored() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    let id = h.insert(&h.org.id, &echo_spec("x")).await;
    let d = c.expect_dispatch().await;
    assert_eq!((d.task_id.as_str(), d.attempt), (id.as_str(), 1));
    c.send(&accepted(&id, 1));
    c.sync().await;
    let before = h.task(&h.org.id, &id).await;
    assert_eq!(before.state, TaskState::Running);

    for attempt in [0, 2] {
        c.send(&AgentMessage::Result(result(
            &id,
            attempt,
            ResultStatus::Succeeded,
            "",
        )));
        let ack = c.expect_ack().await;
        assert_eq!((ack.attempt, ack.stored), (attempt, false));
    }
    assert_eq!(h.task(&h.org.id, &id).await, before);
    // The real attempt still completes normally.
    c.send(&AgentMessage::Result(result(
        &id,
        1,
        ResultStatus::Failed,
        "",
    )));
    assert!(c.expect_ack().await.stored);
    assert_eq!(h.task(&h.org.id, &id).await.state, TaskState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_result_does_not_release_the_running_attempt() {
    let h = harness().await;
    let id = h.insert(&h.org.id, &echo_spec("running")).await;
    let waiting = h.insert(&h.org.id, &echo_spec("waiting")).await;
    let mut c = h.connect();
    c.hello(1, vec![]).await;
    let d = c.expect_dispatch().await;
    assert_eq!((d.task_id.as_str(), d.attempt), (id.as_str(), 1));
    c.send(&accepted(&id, 1));
    c.send(&AgentMessage::Result(result(
        &id,
        2,
        ResultStatus::Succeeded,
        "",
    )));
    assert!(!c.expect_ack().await.stored);
    let still_owned = h.state.hub.get(&h.agent.id).unwrap().owns(&id);
    // Its output is still accepted, and the single slot is still taken: within 500 ms the
    // only answer is the heartbeat's (no dispatch of the waiting task).
    c.send(&output(&id, 1, 1, "still running\n"));
    c.send(&AgentMessage::Heartbeat(Heartbeat { ts_ms: now_ms() }));
    let mut extra = Vec::new();
    let mut heartbeat_answered = false;
    while let Ok(Some(frame)) =
        tokio::time::timeout(Duration::from_millis(500), c.from_gw.recv()).await
    {
        match decode_gateway(&frame, usize::MAX) {
            Ok(Some(GatewayMessage::Heartbeat(_))) => heartbeat_answered = true,
            other => extra.push(other),
        }
    }
    assert!(heartbeat_answered);
    let stored_output = h
        .state
        .store
        .read_output(&id, 1, 0, 10)
        .await
        .unwrap()
        .len();
    let waiting_state = h.task(&h.org.id, &waiting).await.state;
    assert_eq!(
        (still_owned, stored_output, waiting_state, extra.len()),
        (true, 1, TaskState::Queued, 0),
        "after an ignored result: (owns attempt 1, its output rows, state of the waiting task, \
         extra frames); extra frames: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_another_orgs_task_are_not_stored() {
    let h = harness().await;
    let other = h.state.store.create_org("other").await.unwrap();
    let foreign = h.insert(&other.id, &echo_spec("secret")).await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;

    for attempt in [0, 1] {
        c.send(&accepted(&foreign, attempt));
        c.send(&output(&foreign, attempt, 1, "injected\n"));
        c.send(&AgentMessage::Event(Event {
            task_id: foreign.clone(),
            attempt,
            name: "started".into(),
            payload: serde_json::Value::Null,
        }));
    }
    c.sync().await;
    for attempt in [0, 1] {
        c.send(&AgentMessage::Result(result(
            &foreign,
            attempt,
            ResultStatus::Succeeded,
            "forged",
        )));
        assert_eq!(
            c.expect_ack().await,
            ResultAck {
                task_id: foreign.clone(),
                attempt,
                stored: false
            }
        );
    }

    let t = h.task(&other.id, &foreign).await;
    assert_eq!(t.state, TaskState::Queued);
    assert_eq!(t.attempt, 0);
    assert_eq!(t.agent_id, None);
    assert_eq!(t.result, None);
    for attempt in [0, 1] {
        assert!(
            h.state
                .store
                .read_output(&foreign, attempt, 0, 100)
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert!(
        h.state
            .store
            .list_events(&foreign)
            .await
            .unwrap()
            .is_empty()
    );
    // Nor can the agent see it through its own org.
    assert!(
        h.state
            .store
            .get_task(&h.org.id, &foreign)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_a_task_dispatched_to_another_agent_are_not_stored() {
    let h = harness().await;
    let (agent2, _) = h
        .state
        .store
        .issue_managed_agent(&h.org.id, "agent-2", &[])
        .await
        .unwrap();
    let mut holder = h.connect_as(&agent2);
    holder.hello(10, vec![]).await;
    let id = h.insert(&h.org.id, &echo_spec("mine")).await;
    let d = holder.expect_dispatch().await;
    assert_eq!((d.task_id.as_str(), d.attempt), (id.as_str(), 1));

    // Our agent declares no kinds, so the dispatcher never hands it anything.
    let mut c = h.connect();
    c.send(&AgentMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "0.0.0-test".into(),
        capabilities: Capabilities {
            max_in_flight: 10,
            ..Default::default()
        },
        running: vec![],
    }));
    assert!(matches!(c.recv().await, GatewayMessage::HelloOk(_)));
    c.send(&accepted(&id, 1));
    c.send(&output(&id, 1, 1, "injected\n"));
    c.send(&AgentMessage::Event(Event {
        task_id: id.clone(),
        attempt: 1,
        name: "started".into(),
        payload: serde_json::Value::Null,
    }));
    c.send(&AgentMessage::Result(result(
        &id,
        1,
        ResultStatus::Succeeded,
        "forged",
    )));
    assert!(!c.expect_ack().await.stored);

    let t = h.task(&h.org.id, &id).await;
    assert_eq!(t.state, TaskState::Dispatched);
    assert_eq!(t.agent_id.as_deref(), Some(agent2.id.as_str()));
    assert_eq!(t.result, None);
    assert!(
        h.state
            .store
            .read_output(&id, 1, 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        h.state
            .store
            .list_events(&id)
            .await
            .unwrap()
            .iter()
            .all(|e| e.name != "started")
    );
    // The holder's own messages are stored.
    holder.send(&accepted(&id, 1));
    holder.send(&output(&id, 1, 1, "real\n"));
    holder.sync().await;
    assert_eq!(h.task(&h.org.id, &id).await.state, TaskState::Running);
    let out = h.state.store.read_output(&id, 1, 0, 100).await.unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].data, "real\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_for_a_never_dispatched_task_of_the_same_org_is_not_stored() {
    let h = harness().await;
    // No kinds: the dispatcher never hands this agent the task, which stays queued.
    let mut c = h.connect();
    c.send(&AgentMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "0.0.0-test".into(),
        capabilities: Capabilities {
            max_in_flight: 10,
            ..Default::default()
        },
        running: vec![],
    }));
    assert!(matches!(c.recv().await, GatewayMessage::HelloOk(_)));
    let id = h.insert(&h.org.id, &echo_spec("queued")).await;
    c.send(&AgentMessage::Result(result(
        &id,
        0,
        ResultStatus::Succeeded,
        "forged",
    )));
    let ack = c.expect_ack().await;
    let t = h.task(&h.org.id, &id).await;
    assert_eq!(
        (ack.stored, t.state),
        (false, TaskState::Queued),
        "a result for a task never dispatched to this agent must not be stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_is_honoured() {
    let h = harness().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(h.insert(&h.org.id, &echo_spec(&format!("t{i}"))).await);
    }
    let mut c = h.connect();
    c.hello(2, vec![]).await;
    let d1 = c.expect_dispatch().await;
    let d2 = c.expect_dispatch().await;
    assert_eq!(
        vec![d1.task_id.clone(), d2.task_id.clone()],
        ids[..2].to_vec(),
        "oldest first"
    );
    assert_eq!((d1.attempt, d2.attempt), (1, 1));
    // Several dispatcher ticks (50 ms) pass without a third dispatch.
    c.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(h.state.hub.get(&h.agent.id).unwrap().in_flight_count(), 2);

    c.send(&accepted(&d1.task_id, 1));
    c.send(&AgentMessage::Result(result(
        &d1.task_id,
        1,
        ResultStatus::Succeeded,
        "",
    )));
    // The acknowledgement and exactly one new dispatch, the next oldest task.
    let mut ack = None;
    let mut next = None;
    for _ in 0..2 {
        match c.recv().await {
            GatewayMessage::ResultAck(a) => ack = Some(a),
            GatewayMessage::Dispatch(d) => next = Some(*d),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ack.expect("result_ack").stored);
    let next = next.expect("a new dispatch after a slot freed");
    assert_eq!((next.task_id.as_str(), next.attempt), (ids[2].as_str(), 1));
    c.expect_silence(Duration::from_millis(500)).await;
    for id in &ids[3..] {
        assert_eq!(h.task(&h.org.id, id).await.state, TaskState::Queued);
    }
}

/// Sends the result of `d` and returns the next dispatch that follows its acknowledgement,
/// if any arrives within 300 ms.
async fn finish_and_next(
    c: &mut Conn,
    d: &paddock_proto::Dispatch,
) -> Option<paddock_proto::Dispatch> {
    c.send(&AgentMessage::Result(result(
        &d.task_id,
        d.attempt,
        ResultStatus::Succeeded,
        "",
    )));
    let mut acked = false;
    let mut next = None;
    while !acked || next.is_none() {
        match tokio::time::timeout(Duration::from_millis(300), c.recv()).await {
            Ok(GatewayMessage::ResultAck(a)) => {
                assert!(a.stored);
                acked = true;
            }
            Ok(GatewayMessage::Dispatch(n)) => next = Some(*n),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert!(acked, "no result_ack");
    next
}

/// Without the periodic sweep, freed slots still get queued work at once: a result wakes
/// the dispatcher while work may be waiting for the agent (its last claim filled every slot,
/// so a round may have passed it over while full), and not once the queue is empty for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_slots_get_waiting_work_without_the_sweep() {
    let h = harness_with_tick(Duration::from_secs(3600)).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(h.insert(&h.org.id, &echo_spec(&format!("t{i}"))).await);
    }
    let mut c = h.connect();
    c.hello(1, vec![]).await;
    let handle = h.state.hub.get(&h.agent.id).unwrap();
    let mut d = c.expect_dispatch().await;
    assert_eq!(d.task_id, ids[0]);
    for id in &ids[1..] {
        let next = finish_and_next(&mut c, &d)
            .await
            .expect("the next queued task");
        assert_eq!(&next.task_id, id, "oldest first");
        d = next;
    }
    // The last one: its slot frees, the claim finds nothing, and the agent is marked so.
    assert!(finish_and_next(&mut c, &d).await.is_none());
    assert!(!handle.wants_more(), "nothing is queued for it");

    // New work (what `TaskReady` does) goes to the free slot.
    let t4 = h.insert(&h.org.id, &echo_spec("t4")).await;
    h.state.dispatch_wake.org(&h.org.id);
    let d4 = c.expect_dispatch().await;
    assert_eq!(d4.task_id, t4);
    // More work while the agent is full: the round passes it over; it is still marked.
    let t5 = h.insert(&h.org.id, &echo_spec("t5")).await;
    h.state.dispatch_wake.org(&h.org.id);
    c.expect_silence(Duration::from_millis(200)).await;
    assert!(
        handle.wants_more(),
        "a full agent passed over must look again"
    );
    let d5 = finish_and_next(&mut c, &d4)
        .await
        .expect("t5 after t4's slot frees");
    assert_eq!(d5.task_id, t5);
}

/// A connected agent with one slot, and no periodic sweep (only wake-ups dispatch).
async fn one_slot_agent_without_sweep() -> (Harness, Conn) {
    let h = harness_with_tick(Duration::from_secs(3600)).await;
    let mut c = h.connect();
    c.hello(1, vec![]).await;
    c.sync().await;
    (h, c)
}

/// A submission claims for a free agent in its own transaction, and marks the agent as
/// wanting more only if queued work is left; work submitted while the agent is full is
/// dispatched when its slot frees, with no sweep: the submission marks the full agent, and
/// the result wakes the dispatcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_claim_at_once_and_wait_for_a_full_agents_freed_slot() {
    let (h, mut c) = one_slot_agent_without_sweep().await;
    let handle = h.state.hub.get(&h.agent.id).unwrap();
    let t1 = h.submit(&echo_spec("s1")).await;
    let d1 = c.expect_dispatch().await;
    assert_eq!(d1.task_id, t1);
    assert!(
        !handle.wants_more(),
        "the claim took the only queued task: its result has nothing to wake"
    );
    // Full: the submission passes it over and marks it.
    let t2 = h.submit(&echo_spec("s2")).await;
    c.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(h.task(&h.org.id, &t2).await.state, TaskState::Queued);
    assert!(
        handle.wants_more(),
        "a full agent passed over must look again"
    );
    let d2 = finish_and_next(&mut c, &d1)
        .await
        .expect("s2 as soon as s1's slot frees");
    assert_eq!(d2.task_id, t2);
    // Two more while full; the freed slot takes the older, and the agent stays marked
    // while the newer waits.
    let t3 = h.submit(&echo_spec("s3")).await;
    let t4 = h.submit(&echo_spec("s4")).await;
    let d3 = finish_and_next(&mut c, &d2).await.expect("s3");
    assert_eq!(d3.task_id, t3);
    assert!(handle.wants_more(), "s4 is still queued");
    let d4 = finish_and_next(&mut c, &d3).await.expect("s4");
    assert_eq!(d4.task_id, t4);
    assert!(finish_and_next(&mut c, &d4).await.is_none());
    assert!(!handle.wants_more(), "nothing is queued for it");
}

/// A submission for a free agent is sent before its row is written, then stored as
/// dispatched (its `dispatched` event with it) and finished by its result; but never ahead of
/// queued work the agent may take: with the agent marked as wanting more (a claim left work
/// of its org queued), the submission claims, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_goes_straight_to_a_free_agent_but_not_past_queued_work() {
    let h = harness_with_tick(Duration::from_secs(3600)).await;
    let mut c = h.connect();
    c.hello(2, vec![]).await;
    c.sync().await;
    let handle = h.state.hub.get(&h.agent.id).unwrap();
    let t1 = h.submit(&echo_spec("direct")).await;
    let d1 = c.expect_dispatch().await;
    assert_eq!((d1.task_id.as_str(), d1.attempt), (t1.as_str(), 1));
    let row = h.task(&h.org.id, &t1).await;
    assert_eq!(row.state, TaskState::Dispatched);
    assert_eq!(row.agent_id.as_deref(), Some(h.agent.id.as_str()));
    let events = h.state.store.list_events(&t1).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        vec!["dispatched"]
    );
    c.send(&AgentMessage::Result(result(
        &t1,
        1,
        ResultStatus::Succeeded,
        "",
    )));
    match c.recv_skip_heartbeats().await {
        GatewayMessage::ResultAck(a) => assert!(a.stored, "{a:?}"),
        other => panic!("expected the ack, got {other:?}"),
    }
    assert_eq!(h.task(&h.org.id, &t1).await.state, TaskState::Succeeded);
    // Work queued behind the dispatcher's back (as a re-queue would leave it), and the agent
    // marked as a claim that left it would mark it.
    let older = h
        .state
        .store
        .insert_task(&NewTask {
            id: None,
            org_id: h.org.id.clone(),
            spec: echo_spec("older"),
            max_attempts: 1,
            queue_deadline_at: now_ms() + 60_000,
        })
        .await
        .unwrap();
    handle.set_wants_more(true);
    let newer = h.submit(&echo_spec("newer")).await;
    let first = c.expect_dispatch().await;
    let second = c.expect_dispatch().await;
    assert_eq!(
        (first.task_id.as_str(), second.task_id.as_str()),
        (older.as_str(), newer.as_str()),
        "the queued task goes first"
    );
    assert!(!handle.wants_more(), "nothing is left queued");
}

/// A result's ack reaches the agent before the dispatch that reuses the slot it frees (a
/// one-slot agent refuses a dispatch that comes before the ack), with the next submission
/// sent right behind each result and its dispatch written to the socket in place. (The
/// narrow window this guards in the session, a submission claiming between a result freeing
/// its slot and its ack being buffered, is not reproduced here: the session holds the socket
/// across it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_of_a_freed_slot_comes_before_the_dispatch_that_reuses_it() {
    let (h, mut c) = one_slot_agent_without_sweep().await;
    let first = h.submit(&echo_spec("s0")).await;
    let mut d = c.expect_dispatch().await;
    assert_eq!(d.task_id, first);
    for i in 1..=20 {
        c.send(&AgentMessage::Result(result(
            &d.task_id,
            d.attempt,
            ResultStatus::Succeeded,
            "",
        )));
        let next = h.submit(&echo_spec(&format!("s{i}"))).await;
        match c.recv_skip_heartbeats().await {
            GatewayMessage::ResultAck(a) => assert_eq!(a.task_id, d.task_id),
            other => panic!("expected the ack of {} first, got {other:?}", d.task_id),
        }
        let n = c.expect_dispatch().await;
        assert_eq!(n.task_id, next);
        d = n;
    }
}

/// A `result_ack` may wait in the write buffer for company (the next dispatch), but it is
/// always flushed: alone after a short linger, or ahead of any frame sent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_flushed_alone_or_ahead_of_the_next_frame() {
    let h = harness().await;
    let a = h.insert(&h.org.id, &echo_spec("a")).await;
    let b = h.insert(&h.org.id, &echo_spec("b")).await;
    let mut c = h.connect_buffered();
    c.hello(1, vec![]).await;
    let first = c.expect_dispatch().await.task_id;
    assert_eq!(first, a, "oldest first");
    // The result frees the only slot: `b`'s dispatch follows, in the same write as the ack.
    c.send(&AgentMessage::Result(result(
        &a,
        1,
        ResultStatus::Succeeded,
        "a\n",
    )));
    let ack = c.expect_ack().await;
    assert_eq!(
        (ack.task_id.as_str(), ack.attempt, ack.stored),
        (a.as_str(), 1, true)
    );
    assert_eq!(c.expect_dispatch().await.task_id, b);
    // The last task: no dispatch follows its result, so only the linger flushes the ack.
    c.send(&AgentMessage::Result(result(
        &b,
        1,
        ResultStatus::Succeeded,
        "b\n",
    )));
    let sent = std::time::Instant::now();
    let ack = c.expect_ack().await;
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "a lone ack is flushed within its linger (1 s), not by a later frame"
    );
    assert_eq!((ack.task_id.as_str(), ack.stored), (b.as_str(), true));
    // Another result's ack, then a heartbeat whose answer is flushed at once: the ack is
    // written first, so it arrives first.
    c.send(&AgentMessage::Result(result(
        &b,
        1,
        ResultStatus::Succeeded,
        "b\n",
    )));
    c.send(&AgentMessage::Heartbeat(Heartbeat { ts_ms: 1 }));
    let ack = c.expect_ack().await;
    assert_eq!(
        (ack.task_id.as_str(), ack.stored),
        (b.as_str(), false),
        "already finished"
    );
    match c.recv().await {
        GatewayMessage::Heartbeat(_) => {}
        other => panic!("expected the heartbeat answer, got {other:?}"),
    }
    assert_eq!(h.task(&h.org.id, &b).await.state, TaskState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_sent_together_are_stored_and_acked_in_order() {
    let h = harness().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(h.insert(&h.org.id, &echo_spec(&format!("b{i}"))).await);
    }
    let mut c = h.connect();
    c.hello(4, vec![]).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(c.expect_dispatch().await.task_id);
    }
    got.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(got, sorted);
    // Four results and a stale one back to back (the session reads them in one go and
    // stores them in one transaction), then a heartbeat, which is still answered after them.
    for (i, id) in ids.iter().enumerate() {
        c.send(&AgentMessage::Result(result(
            id,
            1,
            ResultStatus::Succeeded,
            &format!("out{i}\n"),
        )));
    }
    c.send(&AgentMessage::Result(result(
        &ids[0],
        7,
        ResultStatus::Failed,
        "stale",
    )));
    c.send(&AgentMessage::Heartbeat(paddock_proto::Heartbeat {
        ts_ms: 1,
    }));
    let mut acks = Vec::new();
    let mut heartbeat = false;
    while acks.len() < 5 || !heartbeat {
        match c.recv().await {
            GatewayMessage::ResultAck(a) => {
                assert!(!heartbeat, "a result_ack came after the heartbeat's answer");
                acks.push((a.task_id, a.attempt, a.stored));
            }
            GatewayMessage::Heartbeat(_) => heartbeat = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut want: Vec<(String, u32, bool)> = ids.iter().map(|id| (id.clone(), 1, true)).collect();
    want.push((ids[0].clone(), 7, false));
    assert_eq!(acks, want);
    for (i, id) in ids.iter().enumerate() {
        let t = h.task(&h.org.id, id).await;
        assert_eq!(t.state, TaskState::Succeeded);
        assert_eq!(t.result.unwrap().stdout, format!("out{i}\n"));
    }
    assert_eq!(h.state.hub.get(&h.agent.id).unwrap().in_flight_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_back_task_is_requeued_and_dispatched_again() {
    let h = harness().await;
    let id = h.insert(&h.org.id, &echo_spec("back")).await;
    let mut c = h.connect();
    c.hello(1, vec![]).await;
    let d = c.expect_dispatch().await;
    assert_eq!((d.task_id.as_str(), d.attempt), (id.as_str(), 1));
    c.send(&accepted(&id, 1));
    // Stopped at the end of a shutdown grace: handed back, the attempt counts.
    c.send(&AgentMessage::Error(ErrorBody {
        code: ErrorCode::AgentShuttingDown,
        message: "shutting down".into(),
        task_id: Some(id.clone()),
        attempt: Some(1),
    }));
    // Requeued, and with the slot free the dispatcher sends it again as a new attempt.
    let d = c.expect_dispatch().await;
    assert_eq!((d.task_id.as_str(), d.attempt), (id.as_str(), 2));
    let t = h.task(&h.org.id, &id).await;
    assert_eq!(
        (t.state, t.attempt, t.agent_id.as_deref()),
        (TaskState::Dispatched, 2, Some(h.agent.id.as_str()))
    );

    // Refused as busy: handed back again and re-dispatched. (Whether a refused dispatch
    // consumes an attempt number is not asserted: only that the store and the new dispatch
    // agree.)
    c.send(&AgentMessage::Error(ErrorBody {
        code: ErrorCode::AgentBusy,
        message: "busy".into(),
        task_id: Some(id.clone()),
        attempt: Some(2),
    }));
    let d = c.expect_dispatch().await;
    assert_eq!(d.task_id, id);
    let t = h.task(&h.org.id, &id).await;
    assert_eq!((t.state, t.attempt), (TaskState::Dispatched, d.attempt));

    // A hand-back for an attempt that is not current changes nothing.
    let before = h.task(&h.org.id, &id).await;
    c.send(&AgentMessage::Error(ErrorBody {
        code: ErrorCode::AgentShuttingDown,
        message: "stale".into(),
        task_id: Some(id.clone()),
        attempt: Some(d.attempt + 5),
    }));
    c.sync().await;
    assert_eq!(h.task(&h.org.id, &id).await, before);
}

// ---------------------------------------------------------------------------------------
// Reconnects
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resumes_a_running_task() {
    let h = harness().await;
    let id = h.insert(&h.org.id, &echo_spec("resume")).await;
    let mut c1 = h.connect();
    c1.hello(10, vec![]).await;
    let d = c1.expect_dispatch().await;
    assert_eq!(d.task_id, id);
    c1.send(&accepted(&id, 1));
    c1.send(&output(&id, 1, 1, "before\n"));
    c1.sync().await;
    // The connection drops (stream ends without a close frame).
    drop(c1.to_gw);
    tokio::time::timeout(WAIT, c1.join)
        .await
        .expect("session 1 ended")
        .unwrap();
    assert!(h.state.hub.is_empty());
    assert_eq!(h.task(&h.org.id, &id).await.state, TaskState::Running);

    let mut c2 = h.connect();
    let ok = c2.hello(10, vec![running(&id, 1)]).await;
    assert_eq!(ok.cancel, vec![]);
    assert!(h.state.hub.get(&h.agent.id).unwrap().owns(&id));
    let t = h.task(&h.org.id, &id).await;
    assert_eq!(
        (t.state, t.attempt, t.agent_id.as_deref()),
        (TaskState::Running, 1, Some(h.agent.id.as_str()))
    );
    // Replayed output is de-duplicated, new output is stored.
    c2.send(&output(&id, 1, 1, "before\n"));
    c2.send(&output(&id, 1, 2, "after\n"));
    c2.sync().await;
    let out = h.state.store.read_output(&id, 1, 0, 100).await.unwrap();
    assert_eq!(
        out.iter().map(|o| o.data.as_str()).collect::<Vec<_>>(),
        vec!["before\n", "after\n"]
    );
    c2.send(&AgentMessage::Result(result(
        &id,
        1,
        ResultStatus::Succeeded,
        "before\nafter\n",
    )));
    assert_eq!(
        c2.expect_ack().await,
        ResultAck {
            task_id: id.clone(),
            attempt: 1,
            stored: true
        }
    );
    assert_eq!(h.task(&h.org.id, &id).await.state, TaskState::Succeeded);
    // No re-dispatch of the resumed task happened meanwhile.
    c2.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_unknown_tasks_gets_them_back_in_cancel() {
    let h = harness().await;
    let other = h.state.store.create_org("other").await.unwrap();
    let foreign = h.insert(&other.id, &echo_spec("foreign")).await;
    let id = h.insert(&h.org.id, &echo_spec("known")).await;
    let mut c1 = h.connect();
    c1.hello(10, vec![]).await;
    let d = c1.expect_dispatch().await;
    assert_eq!((d.task_id.as_str(), d.attempt), (id.as_str(), 1));
    c1.send_frame(Frame::Close);
    c1.ended().await;

    let unknown = "00000000-0000-7000-8000-000000000000".to_string();
    let mut c2 = h.connect();
    let listed = vec![
        running(&id, 1),
        running(&id, 7),
        running(&unknown, 1),
        running(&foreign, 0),
    ];
    let ok = c2.hello(10, listed).await;
    assert_eq!(
        ok.cancel,
        vec![running(&id, 7), running(&unknown, 1), running(&foreign, 0)]
    );
    let handle = h.state.hub.get(&h.agent.id).unwrap();
    assert!(handle.owns(&id));
    assert!(!handle.owns(&unknown));
    assert!(!handle.owns(&foreign));
    let t = h.task(&other.id, &foreign).await;
    assert_eq!((t.state, t.agent_id), (TaskState::Queued, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_replaces_the_old_one() {
    let h = harness().await;
    let mut c1 = h.connect();
    c1.hello(10, vec![]).await;
    let mut c2 = h.connect();
    c2.hello(10, vec![]).await;
    let e = c1.expect_error(ErrorCode::ProtocolViolation).await;
    assert!(e.message.contains("replaced"), "{e:?}");
    c1.expect_close().await;
    c1.ended().await;
    // The new connection stays registered and working.
    c2.sync().await;
    assert!(h.state.hub.get(&h.agent.id).is_some());
    assert_eq!(h.state.hub.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Revocation and shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_session() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    h.state
        .hub
        .get(&h.agent.id)
        .unwrap()
        .close_with(ErrorCode::AgentRevoked, "revoked by the test");
    let e = c.expect_error(ErrorCode::AgentRevoked).await;
    assert_eq!(e.message, "revoked by the test");
    assert_eq!((e.task_id, e.attempt), (None, None));
    c.expect_close().await;
    c.ended().await;
    assert!(h.state.hub.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_shutdown_ends_the_session() {
    let h = harness().await;
    let mut c = h.connect();
    c.hello(10, vec![]).await;
    h.state.shutdown.cancel();
    let e = c.expect_error(ErrorCode::Unavailable).await;
    assert!(e.message.contains("shutting down"), "{e:?}");
    c.expect_close().await;
    c.ended().await;
    assert!(h.state.hub.is_empty());
}
