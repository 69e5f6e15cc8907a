//! Load generator for idle agents: many executor WebSocket sessions with valid tokens, each
//! sending `hello` and then heartbeats at the interval the gateway asks for, as a real agent
//! does (docs/protocol.md §3). No tasks run; the point is the gateway's memory per session.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use paddock_proto::{
    AgentMessage, Capabilities, GatewayMessage, Heartbeat, Hello, PROTOCOL_VERSION, now_ms,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::procs::{Gateway, Org, SERVICE_TOKEN};

/// Issues `n` managed-executor tokens through the service endpoint, 16 requests at a time.
pub(crate) async fn issue_tokens(
    gw: &Gateway,
    org: &Org,
    http: &reqwest::Client,
    n: usize,
) -> Vec<String> {
    let sem = Arc::new(Semaphore::new(16));
    let mut joins = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let http = http.clone();
        let url = format!("{}/internal/v1/managed-executors/issue", gw.url);
        let org_id = org.id.clone();
        joins.push(tokio::spawn(async move {
            let v: Value = http
                .post(url)
                .header("X-Service-Token", SERVICE_TOKEN)
                .json(&json!({ "orgId": org_id, "name": "idle" }))
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .json()
                .await
                .unwrap();
            drop(permit);
            v["executorToken"].as_str().unwrap().to_string()
        }));
    }
    let mut tokens = Vec::with_capacity(n);
    for j in joins {
        tokens.push(j.await.unwrap());
    }
    tokens
}

/// Idle sessions held open by this process.
pub(crate) struct IdleAgents {
    /// Sessions that got `hello_ok` and are still open.
    pub(crate) live: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl IdleAgents {
    pub(crate) fn new() -> IdleAgents {
        IdleAgents {
            live: Arc::new(AtomicUsize::new(0)),
            tasks: Vec::new(),
        }
    }

    /// Opens one session per token, 64 handshakes at a time, and returns when all of them
    /// got `hello_ok` (or `within` passed).
    pub(crate) async fn connect(&mut self, gw: &Gateway, tokens: Vec<String>, within: Duration) {
        let target = self.live.load(Ordering::SeqCst) + tokens.len();
        let sem = Arc::new(Semaphore::new(64));
        let ws_url = format!("ws://127.0.0.1:{}/ws/executor", gw.port);
        for token in tokens {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let live = self.live.clone();
            let ws_url = ws_url.clone();
            self.tasks.push(tokio::spawn(async move {
                session(ws_url, token, live, permit).await;
            }));
        }
        let deadline = Instant::now() + within;
        while self.live.load(Ordering::SeqCst) < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn close(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn session(
    ws_url: String,
    token: String,
    live: Arc<AtomicUsize>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let mut req = ws_url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let Ok((ws, _)) = tokio_tungstenite::connect_async(req).await else {
        eprintln!("idle agent: connect failed");
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let hello = AgentMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "bench-idle".into(),
        capabilities: Capabilities {
            kinds: vec!["agent.execute".into()],
            connectors: vec![],
            tags: vec![],
            max_in_flight: 10,
            backends: vec!["host".into()],
        },
        running: vec![],
    });
    if tx
        .send(Message::text(serde_json::to_string(&hello).unwrap()))
        .await
        .is_err()
    {
        return;
    }
    let interval = match rx.next().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<GatewayMessage>(&t) {
            Ok(GatewayMessage::HelloOk(ok)) => ok.heartbeat_interval_ms.clamp(100, 60_000),
            other => {
                eprintln!("idle agent: expected hello_ok, got {other:?}");
                return;
            }
        },
        other => {
            eprintln!("idle agent: expected hello_ok, got {other:?}");
            return;
        }
    };
    drop(permit);
    live.fetch_add(1, Ordering::SeqCst);
    let mut tick = tokio::time::interval(Duration::from_millis(interval));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let hb = AgentMessage::Heartbeat(Heartbeat { ts_ms: now_ms() });
                if tx.send(Message::text(serde_json::to_string(&hb).unwrap())).await.is_err() {
                    break;
                }
            }
            m = rx.next() => match m {
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    }
    live.fetch_sub(1, Ordering::SeqCst);
}
