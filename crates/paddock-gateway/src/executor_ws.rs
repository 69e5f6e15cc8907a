//! The executor WebSocket (`/ws/executor`): one session per connected agent.
//!
//! The session is written over a transport-neutral `Stream<Item = Frame>` and
//! `Sink<Frame>` ([`run_session`]), so the protocol logic is unit-tested with channels; the
//! axum handler only authenticates the upgrade and adapts axum's message type.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use paddock_proto::{
    AgentMessage, ErrorBody, ErrorCode, Frame, FrameError, GatewayMessage, Heartbeat, HelloOk,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ResultAck, decode_agent, encode, now_ms,
};
use paddock_store::Agent;

use crate::AppState;
use crate::bus::{self, BusEvent};
use crate::error::ApiError;
use crate::hub::{AgentHandle, DirectWrite, Registration};

/// Read buffer of one session. tungstenite allocates its default (128 KiB) eagerly per
/// connection, 1.3 GiB for 10,000 idle agents; agent frames are small (larger ones are read
/// in several chunks), so 8 KiB keeps an idle session cheap (issue 6 benchmark).
const SESSION_READ_BUFFER: usize = 8 * 1024;

/// How long an agent has to send `hello` after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Malformed frames tolerated in one session before it is closed.
const MAX_BAD_FRAMES: u32 = 16;

/// Longest a `result_ack` waits in the write buffer for a frame to share a write with (the
/// next dispatch, or any other frame: every send flushes what is buffered, in order, so the
/// agent always reads an ack before a dispatch that reuses its slot). The agent keeps a
/// result until it is acknowledged (and re-sends it after a reconnect), so a later ack costs
/// it only memory, and its drain at shutdown up to this long; sent at once, an ack would be
/// one more write and one more wake-up of the agent between a result and the caller's answer.
/// A second, not less: a timer due before the runtime's next one (the sessions' stale checks
/// tick at most every second) makes tokio wake its driver thread to re-arm, which cost the
/// gateway 14 µs per round trip with a 2 ms linger.
const ACK_LINGER: Duration = Duration::from_secs(1);

/// `GET /ws/executor`: authenticates the agent token (`Authorization: Bearer <orgId>.<secret>`)
/// before upgrading.
pub(crate) async fn ws_executor(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let agent = match authenticate(&state, &headers).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let max = state.cfg.max_frame_bytes;
    ws.max_message_size(max.saturating_mul(2))
        .read_buffer_size(SESSION_READ_BUFFER)
        .on_upgrade(move |socket| serve_socket(state, agent, socket))
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Agent, ApiError> {
    let token = crate::auth::bearer(headers)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <agent token>`"))?;
    let agent = state
        .store
        .authenticate_agent(token)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown agent token"))?;
    if agent.revoked_at.is_some() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::AgentRevoked,
            "this agent has been revoked",
        ));
    }
    Ok(agent)
}

/// `GET /ws/vm`: an instance's runtime (seed 000). Authenticates the instance token
/// (`Authorization: Bearer <VM_TOKEN>`) before upgrading; the session is the executor
/// protocol, as the instance's agent. The instance is `ready` once `hello` is accepted.
pub(crate) async fn ws_vm(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let agent = match authenticate_instance(&state, &headers).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let max = state.cfg.max_frame_bytes;
    ws.max_message_size(max.saturating_mul(2))
        .read_buffer_size(SESSION_READ_BUFFER)
        .on_upgrade(move |socket| serve_socket(state, agent, socket))
}

async fn authenticate_instance(state: &AppState, headers: &HeaderMap) -> Result<Agent, ApiError> {
    use crate::vm_token::TokenError;
    let token = crate::auth::bearer(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::InstanceTokenInvalid,
            "missing `Authorization: Bearer <instance token>`",
        )
    })?;
    let claims = state.signer.verify(token, now_ms()).map_err(|e| {
        let code = match e {
            TokenError::Invalid => ErrorCode::InstanceTokenInvalid,
            TokenError::Expired => ErrorCode::InstanceTokenExpired,
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
    })?;
    let gone = || {
        ApiError::new(
            StatusCode::GONE,
            ErrorCode::InstanceGone,
            "this instance is terminated or failed",
        )
    };
    let inst = state
        .store
        .get_instance(&claims.org_id, &claims.instance_id)
        .await?
        .ok_or_else(gone)?;
    if matches!(
        inst.status,
        paddock_store::InstanceStatus::Terminated | paddock_store::InstanceStatus::Failed
    ) {
        return Err(gone());
    }
    let agent = state
        .store
        .get_agent(&inst.org_id, &inst.id)
        .await?
        .filter(|a| is_instance(a) && a.revoked_at.is_none())
        .ok_or_else(gone)?;
    Ok(agent)
}

async fn serve_socket(state: AppState, agent: Agent, socket: WebSocket) {
    let (sink, stream) = socket.split();
    let stream = stream.map(|m| match m {
        Ok(Message::Text(t)) => Frame::Text(t.to_string()),
        Ok(Message::Binary(b)) => Frame::Binary(b.to_vec()),
        Ok(Message::Ping(_) | Message::Pong(_)) => Frame::Ping,
        Ok(Message::Close(_)) | Err(_) => Frame::Close,
    });
    let sink = sink.with(|f: Frame| async move {
        Ok::<_, axum::Error>(match f {
            Frame::Text(t) => Message::Text(t.into()),
            Frame::Binary(b) => Message::Binary(b.into()),
            Frame::Ping => Message::Ping(Default::default()),
            Frame::Close => Message::Close(None),
        })
    });
    run_session(state, agent, Box::pin(sink), Box::pin(stream)).await;
}

fn error_msg(code: ErrorCode, message: impl Into<String>) -> GatewayMessage {
    GatewayMessage::Error(ErrorBody {
        code,
        message: message.into(),
        task_id: None,
        attempt: None,
    })
}

/// Runs one agent session to its end: `hello`, then messages both ways until the agent
/// leaves, goes stale, is revoked or replaced, or the gateway shuts down.
pub async fn run_session<S, R>(state: AppState, agent: Agent, mut sink: S, mut stream: R)
where
    S: Sink<Frame> + Unpin + Send + 'static,
    R: Stream<Item = Frame> + Unpin,
{
    let max = state.cfg.max_frame_bytes;
    // 1. hello
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await {
        Ok(Some(frame)) => match decode_agent(&frame, max) {
            Ok(Some(AgentMessage::Hello(h))) => h,
            Ok(_) => {
                let _ = sink
                    .send(encode(&error_msg(
                        ErrorCode::ProtocolViolation,
                        "the first message must be `hello`",
                    )))
                    .await;
                let _ = sink.send(Frame::Close).await;
                return;
            }
            Err(e) => {
                reject_frame(&state, &mut sink, &e).await;
                let _ = sink.send(Frame::Close).await;
                return;
            }
        },
        Ok(None) => return,
        Err(_) => {
            let _ = sink
                .send(encode(&error_msg(
                    ErrorCode::ProtocolViolation,
                    "no `hello` within 10 s",
                )))
                .await;
            let _ = sink.send(Frame::Close).await;
            return;
        }
    };
    if hello.protocol < MIN_PROTOCOL_VERSION || hello.protocol > PROTOCOL_VERSION {
        let _ = sink
            .send(encode(&error_msg(
                ErrorCode::ProtocolVersionUnsupported,
                format!(
                    "protocol {} is not supported (this gateway speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})",
                    hello.protocol
                ),
            )))
            .await;
        let _ = sink.send(Frame::Close).await;
        return;
    }

    // 2. register and re-bind running tasks
    let connected_at = now_ms();
    let caps = hello.capabilities.clone();
    let (handle, mut rx) = state.hub.register(Registration {
        agent_id: agent.id.clone(),
        org_id: agent.org_id.clone(),
        tags: agent.tags.clone(),
        kinds: caps.kinds.clone(),
        backends: caps.backends.clone(),
        max_in_flight: caps.max_in_flight,
        instance: is_instance(&agent),
    });
    state.metrics.connected_agents.set(state.hub.len() as i64);
    let now = now_ms();
    if let Err(e) = state
        .store
        .mark_agent_connected(
            &agent.id,
            &state.cfg.replica_id,
            &caps,
            &hello.agent_version,
            now,
        )
        .await
    {
        tracing::error!(agent = %agent.id, "cannot record connection: {e}");
        let _ = sink
            .send(encode(&error_msg(
                ErrorCode::Unavailable,
                "database unavailable",
            )))
            .await;
        finish(&state, &handle).await;
        return;
    }
    let mut instance_token = None;
    if is_instance(&agent) {
        match state.store.instance_connected(&agent.id, now).await {
            Ok(Some(inst)) => {
                if inst.ready_at == Some(now) {
                    state
                        .metrics
                        .instance_ready_latency
                        .observe((now - inst.created_at).max(0) as f64 / 1000.0);
                }
                tracing::info!(instance = %inst.id, status = inst.status.as_str(), "instance connected");
                instance_token = Some(crate::instances::token_for(&state, &inst));
                crate::instances::instance_changed(&state, &inst).await;
            }
            Ok(None) => {
                let _ = sink
                    .send(encode(&error_msg(
                        ErrorCode::InstanceGone,
                        "this instance is terminated or failed",
                    )))
                    .await;
                let _ = sink.send(Frame::Close).await;
                finish(&state, &handle).await;
                return;
            }
            Err(e) => {
                tracing::error!(instance = %agent.id, "cannot record the instance's connection: {e}");
                let _ = sink
                    .send(encode(&error_msg(
                        ErrorCode::Unavailable,
                        "database unavailable",
                    )))
                    .await;
                finish(&state, &handle).await;
                return;
            }
        }
    }
    let lease_until = now + state.cfg.lease.as_millis() as i64;
    let listed: Vec<String> = hello.running.iter().map(|r| r.task_id.clone()).collect();
    match state
        .store
        .detach_unlisted_tasks(&agent.org_id, &agent.id, &listed, connected_at)
        .await
    {
        Ok(0) => {}
        Ok(n) => {
            tracing::warn!(agent = %agent.id, detached = n, "tasks the agent no longer knows will be re-queued")
        }
        Err(e) => tracing::warn!(agent = %agent.id, "could not reconcile tasks: {e}"),
    }
    let mut cancel = Vec::new();
    for r in &hello.running {
        match state
            .store
            .rebind_task(&agent.org_id, &r.task_id, r.attempt, &agent.id, lease_until)
            .await
        {
            Ok(true) => handle.add_in_flight(&r.task_id, r.attempt),
            Ok(false) => cancel.push(r.clone()),
            Err(e) => tracing::warn!(task = %r.task_id, "rebind failed: {e}"),
        }
    }
    tracing::info!(
        agent = %agent.id, org = %agent.org_id, version = %hello.agent_version,
        max_in_flight = caps.max_in_flight, resumed = hello.running.len() - cancel.len(),
        "agent connected"
    );
    let ok = GatewayMessage::HelloOk(HelloOk {
        protocol: PROTOCOL_VERSION.min(hello.protocol),
        agent_id: agent.id.clone(),
        org_id: agent.org_id.clone(),
        heartbeat_interval_ms: state.cfg.heartbeat_interval.as_millis() as u64,
        cancel,
        instance_token,
    });
    if sink.send(encode(&ok)).await.is_err() {
        finish(&state, &handle).await;
        return;
    }
    // From here the socket is shared: a claim writes its dispatch to it in place when it can
    // (`AgentHandle::send`); this loop writes everything else.
    let sink = Arc::new(futures_util::lock::Mutex::new(sink));
    handle.set_direct(Arc::new(Direct {
        sink: Arc::downgrade(&sink),
    }));
    state.dispatch_wake.org(&agent.org_id);

    // 3. main loop
    let stale = state.cfg.agent_stale;
    let mut last_seen = Instant::now();
    let mut bad_frames = 0u32;
    // A frame read while gathering results, handled next.
    let mut pending: Option<Frame> = None;
    let mut stale_check = tokio::time::interval(
        stale
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(100)),
    );
    // Acks written to the sink's buffer and not yet flushed: flushed by the next frame sent,
    // or at this instant.
    let mut acks_due: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = handle.close.cancelled() => {
                let reason = handle.close_reason.lock().ok().and_then(|r| r.clone());
                let (code, message) = reason.unwrap_or((ErrorCode::Unavailable, "gateway shutting down".into()));
                close_with(&mut *sink.lock().await, error_msg(code, message)).await;
                break;
            }
            () = state.shutdown.cancelled() => {
                close_with(&mut *sink.lock().await, error_msg(ErrorCode::Unavailable, "gateway shutting down; reconnect")).await;
                break;
            }
            out = rx.recv() => {
                let Some(msg) = out else { break };
                // Flushes any acks written before it, in the same write.
                acks_due = None;
                let mut socket = sink.lock().await;
                let sent = socket.send(encode(&msg)).await;
                handle.written_from_queue();
                drop(socket);
                if sent.is_err() {
                    break;
                }
            }
            () = handle.flush_wanted.notified() => {
                // A dispatch written in place that the socket could not take at once.
                if sink.lock().await.flush().await.is_err() {
                    break;
                }
            }
            () = async {
                match acks_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                acks_due = None;
                if sink.lock().await.flush().await.is_err() {
                    break;
                }
            }
            frame = async { match pending.take() { Some(f) => Some(f), None => stream.next().await } } => {
                let Some(frame) = frame else { break };
                if frame == Frame::Close {
                    break;
                }
                last_seen = Instant::now();
                match decode_agent(&frame, max) {
                    Ok(None) => {}
                    Ok(Some(AgentMessage::Result(first))) => {
                        // Results already waiting behind this one are stored with it, in
                        // one transaction; the first other frame is handled after them. Only
                        // tasks in flight here can have results behind it: with none, no
                        // read is tried (it would find nothing, for one more system call).
                        let mut results = vec![first];
                        let mut next = None;
                        while results.len() < MAX_RESULT_BATCH
                            && handle.in_flight_count() > results.len()
                        {
                            match stream.next().now_or_never() {
                                Some(Some(f)) => match decode_agent(&f, max) {
                                    Ok(Some(AgentMessage::Result(r))) => results.push(r),
                                    _ => {
                                        next = Some(f);
                                        break;
                                    }
                                },
                                // Nothing more yet (or the stream ended: the next poll says so).
                                _ => break,
                            }
                        }
                        let mut ok = true;
                        // The socket is held from before the results free their slots until
                        // their acks are in its buffer: a dispatch that reuses a freed slot
                        // (written in place by a submission, or queued meanwhile) reaches the
                        // agent after the ack that frees the slot there.
                        let mut socket = sink.lock().await;
                        match finish_results(&state, &agent, &handle, results).await {
                            Ok(acks) => {
                                for ack in acks {
                                    if socket.feed(encode(&ack)).await.is_err() {
                                        ok = false;
                                        break;
                                    }
                                }
                                acks_due.get_or_insert_with(|| tokio::time::Instant::now() + ACK_LINGER);
                            }
                            Err(fatal) => {
                                close_with(&mut *socket, fatal).await;
                                ok = false;
                            }
                        }
                        drop(socket);
                        if !ok {
                            break;
                        }
                        if let Some(f) = next {
                            // Handled like any frame, on the next turn of the loop.
                            pending = Some(f);
                        }
                    }
                    Ok(Some(msg)) => match handle_message(&state, &agent, &handle, msg).await {
                        Ok(Some(reply)) => {
                            if sink.lock().await.send(encode(&reply)).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(fatal) => {
                            close_with(&mut *sink.lock().await, fatal).await;
                            break;
                        }
                    },
                    Err(e) => {
                        let mut socket = sink.lock().await;
                        reject_frame(&state, &mut *socket, &e).await;
                        bad_frames += 1;
                        if matches!(e, FrameError::TooLarge { .. }) || bad_frames >= MAX_BAD_FRAMES {
                            let _ = socket.send(Frame::Close).await;
                            break;
                        }
                    }
                }
            }
            _ = stale_check.tick() => {
                if last_seen.elapsed() > stale {
                    tracing::warn!(agent = %agent.id, "agent silent for {:?}; disconnecting", stale);
                    close_with(&mut *sink.lock().await, error_msg(ErrorCode::ProtocolViolation, "no heartbeat within GATEWAY_AGENT_STALE_MS")).await;
                    break;
                }
            }
        }
    }
    finish(&state, &handle).await;
}

/// The session's socket as [`AgentHandle::send`] writes to it in place. Weak: the socket
/// closes when the session ends, whoever still holds the handle.
struct Direct<S> {
    sink: std::sync::Weak<futures_util::lock::Mutex<S>>,
}

impl<S> std::fmt::Debug for Direct<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").finish_non_exhaustive()
    }
}

impl<S: Sink<Frame> + Unpin + Send + 'static> DirectWrite for Direct<S> {
    fn try_write(
        &self,
        msg: &GatewayMessage,
        queued: &AtomicUsize,
        flush_wanted: &tokio::sync::Notify,
    ) -> bool {
        let Some(shared) = self.sink.upgrade() else {
            return false;
        };
        // Held by the session (writing, or about to): queue instead.
        let Some(mut sink) = shared.try_lock() else {
            return false;
        };
        if queued.load(Ordering::SeqCst) != 0 {
            return false;
        }
        // A waker that wakes nobody: what cannot finish now is handed to the session, which
        // polls with its own.
        let mut cx = Context::from_waker(Waker::noop());
        let mut sink = Pin::new(&mut *sink);
        if !matches!(sink.as_mut().poll_ready(&mut cx), Poll::Ready(Ok(()))) {
            return false;
        }
        if sink.as_mut().start_send(encode(msg)).is_err() {
            // The socket failed: the session finds out on its next read or write.
            return false;
        }
        if sink.as_mut().poll_flush(&mut cx).is_pending() {
            flush_wanted.notify_one();
        }
        true
    }
}

/// Sends a last message and closes, under one hold of the socket (nothing written in place
/// gets between them).
async fn close_with<S: Sink<Frame> + Unpin>(sink: &mut S, last: GatewayMessage) {
    let _ = sink.send(encode(&last)).await;
    let _ = sink.send(Frame::Close).await;
}

async fn reject_frame<S: Sink<Frame> + Unpin>(state: &AppState, sink: &mut S, e: &FrameError) {
    state
        .metrics
        .rejected_frames
        .get_or_create(&crate::metrics::CodeLabel {
            code: e.code().as_str().into(),
        })
        .inc();
    let _ = sink.send(encode(&error_msg(e.code(), e.to_string()))).await;
}

async fn finish(state: &AppState, handle: &AgentHandle) {
    state.hub.unregister(&handle.agent_id, handle.conn_id);
    state.metrics.connected_agents.set(state.hub.len() as i64);
    if state.hub.get(&handle.agent_id).is_none()
        && let Err(e) = state
            .store
            .mark_agent_disconnected(&handle.agent_id, &state.cfg.replica_id)
            .await
    {
        tracing::warn!(agent = %handle.agent_id, "cannot record disconnection: {e}");
    }
    if handle.instance && state.hub.get(&handle.agent_id).is_none() {
        match state
            .store
            .instance_disconnected(&handle.agent_id, now_ms())
            .await
        {
            Ok(()) => {
                crate::bus::publish(
                    state,
                    BusEvent::InstanceChanged {
                        org: handle.org_id.clone(),
                        pool: None,
                    },
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(instance = %handle.agent_id, "cannot record disconnection: {e}")
            }
        }
    }
    tracing::info!(agent = %handle.agent_id, in_flight = handle.in_flight_count(), "agent disconnected");
}

/// Whether an agent row is an instance's (it connects on `/ws/vm`).
pub(crate) fn is_instance(agent: &Agent) -> bool {
    agent.pool == "instance"
}

/// After an instance's task ended: back to `ready`, or `draining` once `max_use` is spent.
async fn settle_instance(state: &AppState, agent: &Agent) {
    match state.store.instance_task_finished(&agent.id).await {
        Ok(Some(status)) => {
            tracing::debug!(instance = %agent.id, status = status.as_str(), "instance idle");
            bus::publish(
                state,
                BusEvent::InstanceChanged {
                    org: agent.org_id.clone(),
                    pool: None,
                },
            )
            .await;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(instance = %agent.id, "cannot update the instance: {e}"),
    }
}

/// Handles one message. `Ok(Some(reply))` is sent back; `Err(msg)` is sent and the session
/// closed (the agent reconnects and re-sends what was not acknowledged).
async fn handle_message(
    state: &AppState,
    agent: &Agent,
    handle: &AgentHandle,
    msg: AgentMessage,
) -> Result<Option<GatewayMessage>, GatewayMessage> {
    let db_down = |e: paddock_store::StoreError| {
        tracing::error!(agent = %agent.id, "database error in session: {e}");
        error_msg(
            ErrorCode::Unavailable,
            "database unavailable; reconnect and resend",
        )
    };
    match msg {
        AgentMessage::Hello(_) => Err(error_msg(
            ErrorCode::ProtocolViolation,
            "`hello` sent twice",
        )),
        AgentMessage::Heartbeat(_) => Ok(Some(GatewayMessage::Heartbeat(Heartbeat {
            ts_ms: now_ms(),
        }))),
        AgentMessage::Accepted(t) => {
            state
                .store
                .mark_task_running(&t.task_id, t.attempt, &agent.id, now_ms())
                .await
                .map_err(db_down)?;
            state.waiters.notify(&t.task_id);
            Ok(None)
        }
        AgentMessage::Output(o) => {
            if !handle_owns(handle, &o.task_id) {
                return Ok(None);
            }
            state
                .store
                .append_output(&o.task_id, o.attempt, o.seq, o.stream.as_str(), &o.data)
                .await
                .map_err(db_down)?;
            state.waiters.notify(&o.task_id);
            Ok(None)
        }
        AgentMessage::Event(ev) => {
            if !handle_owns(handle, &ev.task_id) {
                return Ok(None);
            }
            state
                .store
                .add_event(&ev.task_id, ev.attempt, &ev.name, &ev.payload)
                .await
                .map_err(db_down)?;
            Ok(None)
        }
        AgentMessage::Result(r) => {
            let mut acks = finish_results(state, agent, handle, vec![r]).await?;
            Ok(acks.pop())
        }
        AgentMessage::Error(e) => {
            match (e.code, e.task_id.as_deref(), e.attempt) {
                (_, Some(task), Some(_)) if !handle.owns(task) => {
                    tracing::warn!(agent = %agent.id, task, "error about a task not held by this agent; ignored");
                }
                (
                    ErrorCode::AgentShuttingDown | ErrorCode::AgentBusy,
                    Some(task),
                    Some(attempt),
                ) => {
                    let requeue_deadline = now_ms() + state.cfg.queue_timeout.as_millis() as i64;
                    // A busy refusal never started the attempt; a shutdown hand-back may have.
                    let consume = e.code == ErrorCode::AgentShuttingDown;
                    let requeued = state
                        .store
                        .hand_back_task(
                            &agent.org_id,
                            task,
                            attempt,
                            &agent.id,
                            consume,
                            requeue_deadline,
                        )
                        .await
                        .map_err(db_down)?;
                    handle.finish_attempt(task, attempt);
                    tracing::info!(task, attempt, requeued, "agent handed a task back");
                    if handle.instance {
                        settle_instance(state, agent).await;
                    }
                    if requeued {
                        bus::publish(
                            state,
                            BusEvent::TaskReady {
                                org: agent.org_id.clone(),
                            },
                        )
                        .await;
                    }
                }
                _ => {
                    tracing::warn!(agent = %agent.id, code = %e.code, "agent reported: {}", e.message)
                }
            }
            Ok(None)
        }
    }
}

/// Most results stored in one transaction.
const MAX_RESULT_BATCH: usize = 64;

/// Stores results that arrived together in one transaction, then does for each what a
/// stored (or stale) result needs: metrics, wake-ups, the instance's next state. Returns the
/// `result_ack`s, in order.
async fn finish_results(
    state: &AppState,
    agent: &Agent,
    handle: &AgentHandle,
    results: Vec<paddock_proto::TaskResult>,
) -> Result<Vec<GatewayMessage>, GatewayMessage> {
    let stored = state
        .store
        .complete_tasks(
            &agent.org_id,
            &agent.id,
            &results,
            state.cfg.results_ttl_ms(),
        )
        .await
        .map_err(|e| {
            tracing::error!(agent = %agent.id, "database error in session: {e}");
            error_msg(
                ErrorCode::Unavailable,
                "database unavailable; reconnect and resend",
            )
        })?;
    let mut acks = Vec::with_capacity(results.len());
    let mut events = Vec::with_capacity(results.len() + 1);
    let mut org_ready = false;
    for (r, row) in results.into_iter().zip(stored) {
        handle.finish_attempt(&r.task_id, r.attempt);
        let stored = row.is_some();
        if let Some(row) = row {
            state.waiters.offer_finished(row);
            let label = crate::metrics::StateLabel {
                state: format!("{:?}", r.status).to_lowercase(),
            };
            state.metrics.completed.get_or_create(&label).inc();
            events.push(BusEvent::TaskChanged {
                task: r.task_id.clone(),
            });
            if state.cfg.org_max_inflight.is_some() && !org_ready {
                // A slot under the org cap freed: replicas holding other agents may dispatch.
                org_ready = true;
                events.push(BusEvent::TaskReady {
                    org: agent.org_id.clone(),
                });
            }
        } else {
            state.metrics.stale_results.inc();
            tracing::info!(task = %r.task_id, attempt = r.attempt, "ignored result for an attempt that is not current");
        }
        if handle.instance {
            settle_instance(state, agent).await;
        }
        acks.push(GatewayMessage::ResultAck(ResultAck {
            task_id: r.task_id,
            attempt: r.attempt,
            stored,
        }));
    }
    // Waiters here and on other replicas: one notification for the batch.
    bus::publish_all(state, events).await;
    // Slots of this agent freed: only its org can use them, and only if work may be waiting
    // for it (its last claim filled every slot: a round may since have passed it over).
    if handle.wants_more() {
        state.dispatch_wake.org(&agent.org_id);
    }
    Ok(acks)
}

/// Output and events are accepted only for tasks dispatched to (or re-bound on) this
/// connection, so an agent can never write into another agent's, or another org's, task.
fn handle_owns(handle: &AgentHandle, task_id: &str) -> bool {
    handle.owns(task_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records frames; `busy`: it takes no frame now; `slow_flush`: a flush
    /// does not finish now.
    #[derive(Default)]
    struct Socket {
        frames: Vec<Frame>,
        unflushed: Vec<Frame>,
        busy: bool,
        slow_flush: bool,
    }

    impl Sink<Frame> for Socket {
        type Error = ();
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            if self.busy {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        }
        fn start_send(mut self: Pin<&mut Self>, f: Frame) -> Result<(), ()> {
            self.unflushed.push(f);
            Ok(())
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            if self.slow_flush {
                return Poll::Pending;
            }
            let done = std::mem::take(&mut self.unflushed);
            self.frames.extend(done);
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn heartbeat() -> GatewayMessage {
        GatewayMessage::Heartbeat(Heartbeat { ts_ms: 1 })
    }

    /// A frame is written in place only when the socket is free, nothing is queued ahead of
    /// it and the session is alive; a write the socket cannot finish is handed to the
    /// session's flush.
    #[tokio::test]
    async fn writes_in_place_only_when_nothing_is_ahead() {
        let socket = Arc::new(futures_util::lock::Mutex::new(Socket::default()));
        let direct = Direct {
            sink: Arc::downgrade(&socket),
        };
        let queued = AtomicUsize::new(0);
        let flush = tokio::sync::Notify::new();
        assert!(direct.try_write(&heartbeat(), &queued, &flush));
        assert_eq!(socket.lock().await.frames.len(), 1, "written and flushed");

        // A message queued for the session is not overtaken.
        queued.store(1, Ordering::SeqCst);
        assert!(!direct.try_write(&heartbeat(), &queued, &flush));
        queued.store(0, Ordering::SeqCst);

        // The session is writing (holds the socket), or the socket takes nothing now.
        {
            let _session = socket.lock().await;
            assert!(!direct.try_write(&heartbeat(), &queued, &flush));
        }
        socket.lock().await.busy = true;
        assert!(!direct.try_write(&heartbeat(), &queued, &flush));
        socket.lock().await.busy = false;
        assert_eq!(socket.lock().await.frames.len(), 1, "nothing more written");

        // Taken but not flushed: the session is asked to finish it.
        socket.lock().await.slow_flush = true;
        assert!(direct.try_write(&heartbeat(), &queued, &flush));
        tokio::time::timeout(Duration::from_secs(1), flush.notified())
            .await
            .expect("the session is asked to flush");
        assert_eq!(socket.lock().await.unflushed.len(), 1);

        // The session ended: its socket is gone, nothing is written in place.
        drop(socket);
        assert!(!direct.try_write(&heartbeat(), &queued, &flush));
    }
}
