//! A small client for the gateway API, used by the operator commands.

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

/// Where the gateway is and who we are. Flags or environment.
#[derive(Debug, Clone, Args)]
pub(crate) struct ApiArgs {
    /// Gateway HTTP base URL.
    #[arg(long, env = "PADDOCK_API_URL", default_value = "http://127.0.0.1:3002")]
    pub api_url: String,
    /// API token (`pdk_...`).
    #[arg(long, env = "PADDOCK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Org id (default: the token's org, asked from `/v1/whoami`).
    #[arg(long = "org", env = "PADDOCK_ORG_ID")]
    pub org_id: Option<String>,
}

/// An API error with its stable code.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message} (HTTP {status})")]
pub(crate) struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// `retryAfterMs` of retryable errors.
    pub retry_after_ms: Option<u64>,
}

/// Authenticated client bound to one org.
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
    pub org_id: String,
}

impl Api {
    pub(crate) async fn connect(args: &ApiArgs) -> anyhow::Result<Api> {
        let token = args
            .token
            .clone()
            .context("no API token: pass --token or set PADDOCK_TOKEN (`paddock up` prints one)")?;
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()?;
        let base = args.api_url.trim_end_matches('/').to_string();
        let mut api = Api {
            http,
            base,
            token,
            org_id: String::new(),
        };
        api.org_id = match &args.org_id {
            Some(o) => o.clone(),
            None => api
                .request(reqwest::Method::GET, "/v1/whoami", None)
                .await?["orgId"]
                .as_str()
                .context("whoami: no orgId")?
                .to_string(),
        };
        Ok(api)
    }

    /// `/v1/orgs/{org}` + `rest`.
    pub(crate) fn org_path(&self, rest: &str) -> String {
        format!("/v1/orgs/{}{rest}", self.org_id)
    }

    pub(crate) fn builder(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut b = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if !self.org_id.is_empty() {
            b = b.header("X-Org-Id", &self.org_id);
        }
        b
    }

    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut b = self.builder(method, path);
        if let Some(body) = body {
            b = b.json(body);
        }
        let resp = b
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.base))?;
        decode(resp).await
    }
}

/// Decodes a JSON answer, turning error bodies into [`ApiFailure`].
pub(crate) async fn decode(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let value: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    if status.is_success() {
        return Ok(value);
    }
    if let (Some(code), Some(message)) = (value["code"].as_str(), value["message"].as_str()) {
        return Err(ApiFailure {
            status: status.as_u16(),
            code: code.into(),
            message: message.into(),
            retry_after_ms: value["retryAfterMs"].as_u64(),
        }
        .into());
    }
    bail!("HTTP {status}: {value}")
}
