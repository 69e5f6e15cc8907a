//! The Paddock node agent: pairs with a gateway, keeps an executor WebSocket open, and runs
//! dispatched tasks in a sandbox backend.
//!
//! - [`pair`] exchanges a pairing token for credentials (stored by [`credentials`]).
//! - [`run`] connects, runs sessions ([`session::run_session`]) and reconnects with backoff
//!   until shutdown; tasks keep running across reconnects and their results are re-sent
//!   until the gateway acknowledges them ([`runner`]).

pub mod bundle_run;
pub mod credentials;
pub mod runner;
pub mod sandbox;
pub mod session;
pub mod settings;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use paddock_proto::{ErrorCode, Frame};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

pub use credentials::Credentials;
pub use runner::Runner;
pub use session::SessionEnd;
pub use settings::AgentSettings;

/// The executor WebSocket URL for an HTTP API base (`http` -> `ws`, `https` -> `wss`).
pub fn ws_url_for(api_base: &str) -> String {
    let base = api_base.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!("{ws}/ws/executor")
}

/// Exchanges a pairing token for agent credentials (`POST /v1/agents/pair`).
///
/// # Errors
/// Network failure or the gateway's refusal (`PAIRING_TOKEN_EXPIRED`, ...), with its code.
pub async fn pair(
    api_base: &str,
    pairing_token: &str,
    name: &str,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<Credentials> {
    let client = tls::http_client(ca_file)?;
    let url = format!("{}/v1/agents/pair", api_base.trim_end_matches('/'));
    let resp = client
        .post(&url)
        .json(&serde_json::json!({ "pairingToken": pairing_token, "name": name }))
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {api_base}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "pairing refused ({status}): {} {}",
            body["code"].as_str().unwrap_or("?"),
            body["message"].as_str().unwrap_or("")
        );
    }
    let field = |k: &str| {
        body[k]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("pairing answer lacks `{k}`"))
    };
    Ok(Credentials {
        version: credentials::CREDENTIALS_VERSION,
        api_base: api_base.trim_end_matches('/').to_string(),
        gateway_ws_url: ws_url_for(api_base),
        agent_id: field("agentId")?,
        org_id: field("orgId")?,
        agent_token: field("agentToken")?,
    })
}

/// Connects and serves until `shutdown` fires and every task is finished or handed back.
/// Reconnects with capped exponential backoff and jitter when the connection drops.
///
/// # Errors
/// The gateway refuses the agent for good (revoked, unknown token, unsupported protocol).
pub async fn run(
    runner: Arc<Runner>,
    creds: &Credentials,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = tls::client_config(runner.settings().tls_ca_file.as_deref())?;
    let mut backoff = Duration::from_millis(100);
    let mut token = creds.agent_token.clone();
    loop {
        if shutdown.is_cancelled() && runner.is_empty() {
            return Ok(());
        }
        if let Some(fresh) = runner.take_renewed_token() {
            token = fresh;
        }
        match connect(&creds.gateway_ws_url, &token, tls.clone()).await {
            Ok(ws) => {
                let connected_at = tokio::time::Instant::now();
                let (sink, stream) = ws.split();
                let stream = stream.map(|m| match m {
                    Ok(Message::Text(t)) => Frame::Text(t.to_string()),
                    Ok(Message::Binary(b)) => Frame::Binary(b.to_vec()),
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Frame::Ping,
                    Ok(Message::Close(_)) | Err(_) => Frame::Close,
                });
                let sink = sink.with(|f: Frame| async move {
                    Ok::<_, tokio_tungstenite::tungstenite::Error>(match f {
                        Frame::Text(t) => Message::Text(t.into()),
                        Frame::Binary(b) => Message::Binary(b.into()),
                        Frame::Ping => Message::Ping(Default::default()),
                        Frame::Close => Message::Close(None),
                    })
                });
                match session::run_session(
                    &runner,
                    Box::pin(sink),
                    Box::pin(stream),
                    &shutdown,
                    paddock_proto::DEFAULT_MAX_FRAME_BYTES,
                )
                .await
                {
                    SessionEnd::Drained => return Ok(()),
                    SessionEnd::Fatal(code, msg) => {
                        bail!("gateway refused this agent: {code}: {msg}")
                    }
                    SessionEnd::Disconnected(why) => {
                        tracing::warn!("disconnected: {why}; reconnecting");
                        // Only a session that lasted resets the backoff: two agents sharing
                        // one credential replace each other, and must not do so 10 times a second.
                        if connected_at.elapsed() > Duration::from_secs(10) {
                            backoff = Duration::from_millis(100);
                        }
                    }
                }
            }
            Err(ConnectError::Refused(code, msg)) => {
                bail!("gateway refused this agent: {code}: {msg}")
            }
            Err(ConnectError::Transient(e)) => {
                tracing::warn!(
                    "cannot connect to {}: {e}; retrying in {backoff:?}",
                    creds.gateway_ws_url
                );
            }
        }
        let jitter = Duration::from_millis(rand_jitter(backoff.as_millis() as u64 / 2));
        tokio::select! {
            () = tokio::time::sleep(backoff + jitter) => {}
            () = shutdown.cancelled(), if runner.is_empty() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn rand_jitter(max: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(paddock_proto::now_ms() as u64);
    h.finish() % max.max(1)
}

enum ConnectError {
    Refused(ErrorCode, String),
    Transient(String),
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(
    url: &str,
    token: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Ws, ConnectError> {
    let mut req = url.into_client_request().map_err(|e| {
        ConnectError::Refused(
            ErrorCode::InvalidRequest,
            format!("bad gateway URL {url}: {e}"),
        )
    })?;
    let value = format!("Bearer {token}").parse().map_err(|_| {
        ConnectError::Refused(
            ErrorCode::Unauthorized,
            "agent token is not a valid header value".into(),
        )
    })?;
    req.headers_mut().insert("authorization", value);
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    let fut = tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(connector));
    match tokio::time::timeout(Duration::from_secs(15), fut).await {
        Err(_) => Err(ConnectError::Transient("connect timed out".into())),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let status = resp.status();
            let body: serde_json::Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            let code: ErrorCode =
                serde_json::from_value(body["code"].clone()).unwrap_or(ErrorCode::Unknown);
            let message = body["message"].as_str().unwrap_or("").to_string();
            if status.as_u16() == 401 || status.as_u16() == 403 {
                Err(ConnectError::Refused(code, message))
            } else {
                Err(ConnectError::Transient(format!(
                    "HTTP {status}: {code} {message}"
                )))
            }
        }
        Ok(Err(e)) => Err(ConnectError::Transient(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls() {
        assert_eq!(ws_url_for("http://h:3002/"), "ws://h:3002/ws/executor");
        assert_eq!(
            ws_url_for("https://gw.example"),
            "wss://gw.example/ws/executor"
        );
    }
}
