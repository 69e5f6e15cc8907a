//! One WebSocket session with the gateway, written over `Stream<Item = Frame>` and
//! `Sink<Frame>` so it can be driven by channels in tests.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use paddock_proto::{
    AgentMessage, Capabilities, ErrorCode, Frame, GatewayMessage, Heartbeat, Hello,
    PROTOCOL_VERSION, decode_gateway, encode, now_ms,
};
use tokio_util::sync::CancellationToken;

use crate::runner::Runner;

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The connection dropped or the gateway asked us to reconnect.
    Disconnected(String),
    /// Shutdown requested and every task finished or was handed back.
    Drained,
    /// The gateway refused us for good (revoked, unsupported protocol).
    Fatal(ErrorCode, String),
}

/// Runs a session: `hello`, replay of owed messages, then dispatches, output, heartbeats.
/// After `shutdown` fires, new dispatches are handed back; running tasks get the settings'
/// shutdown grace, then are stopped and handed back; the session ends once nothing is owed.
pub async fn run_session<S, R>(
    runner: &Arc<Runner>,
    mut sink: S,
    mut stream: R,
    shutdown: &CancellationToken,
    max_frame: usize,
) -> SessionEnd
where
    S: Sink<Frame> + Unpin,
    R: Stream<Item = Frame> + Unpin,
{
    let settings = runner.settings().clone();
    let hello = AgentMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        capabilities: Capabilities {
            kinds: paddock_proto::AGENT_KINDS
                .iter()
                .map(|k| k.to_string())
                .collect(),
            connectors: Vec::new(),
            tags: settings.reported_tags.clone(),
            max_in_flight: settings.max_in_flight,
            backends: runner.backend_names(),
        },
        running: runner.running(),
    });
    if sink.send(encode(&hello)).await.is_err() {
        return SessionEnd::Disconnected("send hello failed".into());
    }
    let heartbeat_interval =
        match tokio::time::timeout(Duration::from_secs(15), stream.next()).await {
            Ok(Some(frame)) => match decode_gateway(&frame, max_frame) {
                Ok(Some(GatewayMessage::HelloOk(ok))) => {
                    tracing::info!(agent = %ok.agent_id, org = %ok.org_id, "connected to gateway");
                    for t in ok.cancel {
                        runner.cancel(&t.task_id, t.attempt);
                    }
                    if let Some(token) = ok.instance_token {
                        runner.set_renewed_token(token);
                    }
                    Duration::from_millis(ok.heartbeat_interval_ms.clamp(100, 60_000))
                }
                Ok(Some(GatewayMessage::Error(e))) => return fatal_or_retry(e.code, e.message),
                Ok(_) => return SessionEnd::Disconnected("unexpected first message".into()),
                Err(e) => return SessionEnd::Disconnected(format!("bad hello_ok: {e}")),
            },
            Ok(None) => return SessionEnd::Disconnected("closed before hello_ok".into()),
            Err(_) => return SessionEnd::Disconnected("no hello_ok within 15 s".into()),
        };
    runner.rewind();
    let silence_limit = heartbeat_interval * 4 + Duration::from_secs(5);
    let mut heartbeat = tokio::time::interval(heartbeat_interval);
    let mut last_heard = tokio::time::Instant::now();
    let mut drain_deadline = runner.drain_deadline();
    loop {
        // Send whatever is owed.
        for msg in runner.take_unsent() {
            if sink.send(encode(&msg)).await.is_err() {
                return SessionEnd::Disconnected("send failed".into());
            }
        }
        if shutdown.is_cancelled() {
            if drain_deadline.is_none() {
                tracing::info!(running = runner.len(), "draining: finishing running tasks");
                drain_deadline = Some(runner.start_drain(settings.shutdown_grace));
            }
            if runner.is_empty() {
                let _ = sink.send(Frame::Close).await;
                return SessionEnd::Drained;
            }
        }
        let changed = runner.changed.clone();
        tokio::select! {
            () = changed.notified() => {}
            () = shutdown.cancelled(), if drain_deadline.is_none() => {}
            () = async { tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if drain_deadline.is_some() => {
                tracing::warn!(running = runner.len(), "shutdown grace over: handing running tasks back");
                runner.hand_back_all();
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > silence_limit {
                    return SessionEnd::Disconnected("gateway silent".into());
                }
                if sink.send(encode(&AgentMessage::Heartbeat(Heartbeat { ts_ms: now_ms() }))).await.is_err() {
                    return SessionEnd::Disconnected("send failed".into());
                }
            }
            frame = stream.next() => {
                let Some(frame) = frame else { return SessionEnd::Disconnected("connection closed".into()) };
                if frame == Frame::Close {
                    return SessionEnd::Disconnected("gateway closed the connection".into());
                }
                last_heard = tokio::time::Instant::now();
                match decode_gateway(&frame, max_frame) {
                    Ok(None) => {}
                    Ok(Some(msg)) => match msg {
                        GatewayMessage::Dispatch(d) => {
                            tracing::info!(task = %d.task_id, attempt = d.attempt, "task dispatched");
                            runner.dispatch(*d, shutdown.is_cancelled());
                        }
                        GatewayMessage::Cancel(c) => {
                            tracing::info!(task = %c.task_id, attempt = c.attempt, "cancel requested: {}", c.reason);
                            runner.cancel(&c.task_id, c.attempt);
                        }
                        GatewayMessage::ResultAck(a) => {
                            if !a.stored {
                                tracing::info!(task = %a.task_id, attempt = a.attempt, "gateway ignored our result (attempt no longer current)");
                            }
                            runner.ack(&a.task_id, a.attempt);
                        }
                        GatewayMessage::Heartbeat(_) | GatewayMessage::HelloOk(_) => {}
                        GatewayMessage::Error(e) => {
                            if e.task_id.is_none() {
                                match fatal_or_retry(e.code, e.message.clone()) {
                                    SessionEnd::Fatal(c, m) => return SessionEnd::Fatal(c, m),
                                    _ => tracing::warn!(code = %e.code, "gateway: {}", e.message),
                                }
                            } else {
                                tracing::warn!(code = %e.code, task = ?e.task_id, "gateway: {}", e.message);
                            }
                        }
                    },
                    Err(e) => {
                        tracing::warn!("undecodable frame from gateway: {e}");
                        // A dispatch we cannot read (a newer gateway?) is refused explicitly,
                        // so the task fails with a reason instead of waiting for a lease.
                        if let Some((task_id, attempt)) = undecodable_dispatch(&frame) {
                            runner.refuse(task_id, attempt, format!("this agent cannot read the dispatch: {e}"));
                        }
                    }
                }
            }
        }
    }
}

/// Task id and attempt of a `dispatch` frame that does not decode as a whole.
fn undecodable_dispatch(frame: &Frame) -> Option<(String, u32)> {
    let Frame::Text(text) = frame else {
        return None;
    };
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["type"] != "dispatch" {
        return None;
    }
    Some((
        v["taskId"].as_str()?.to_string(),
        u32::try_from(v["attempt"].as_u64()?).ok()?,
    ))
}

fn fatal_or_retry(code: ErrorCode, message: String) -> SessionEnd {
    match code {
        ErrorCode::AgentRevoked
        | ErrorCode::ProtocolVersionUnsupported
        | ErrorCode::Unauthorized => SessionEnd::Fatal(code, message),
        _ => SessionEnd::Disconnected(format!("{code}: {message}")),
    }
}
