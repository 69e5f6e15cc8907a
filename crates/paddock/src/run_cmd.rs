//! `paddock run`, `paddock task ...` and `paddock org ...`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use paddock_proto::{NetworkMode, SandboxSpec, Selector, ShellTask, TaskSpec};
use reqwest::Method;
use serde_json::Value;

use crate::EXIT_PADDOCK_ERROR;
use crate::client::{Api, ApiArgs};

/// Runs CMD on an agent of your org and streams its output.
///
/// Exits with the task's exit code; 124 when it timed out, 128+N when killed by signal N,
/// 125 when Paddock itself failed (no agent, bad token, gateway unreachable: the error code
/// is printed).
///
/// Example: paddock run --selector group=linux --timeout 30s -- uname -a
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Route to agents with this control-plane tag (`tag=X`) or group (`group=Y`).
    #[arg(long, conflicts_with = "instance")]
    selector: Option<String>,
    /// Run on an instance: `self` for your own (created and bootstrapped on demand; the
    /// command retries while it is not ready), or an instance id.
    #[arg(long, value_name = "self|ID")]
    instance: Option<String>,
    /// With --instance: how long to keep retrying while the instance is not ready.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    instance_wait: Duration,
    /// Kill the task after this long (e.g. 30s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Extra environment for the task (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Copy this variable from the agent's environment into the task (repeatable).
    #[arg(long = "env-passthrough", value_name = "NAME")]
    env_passthrough: Vec<String>,
    /// Network for the task: `none` or `default`. The host backend refuses `none`.
    #[arg(long, value_parser = ["none", "default"])]
    network: Option<String>,
    /// Sandbox backend the task needs (default: the agent's).
    #[arg(long)]
    backend: Option<String>,
    /// Run the command through `/bin/sh -c` (CMD is one script string).
    #[arg(long)]
    shell: bool,
    /// Queue the task even when no agent is connected now (waits up to --queue-timeout).
    #[arg(long)]
    queue: bool,
    /// How long the task may wait in the queue.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    queue_timeout: Duration,
    /// Print the task id and return at once.
    #[arg(long)]
    detach: bool,
    /// Print the finished task as JSON instead of streaming output.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn parse_selector(s: &str) -> anyhow::Result<Selector> {
    match s.split_once('=') {
        Some(("tag", v)) if !v.is_empty() => Ok(Selector {
            tag: Some(v.into()),
            group: None,
            instance: None,
        }),
        Some(("group", v)) if !v.is_empty() => Ok(Selector {
            tag: None,
            group: Some(v.into()),
            instance: None,
        }),
        Some(("instance", v)) if !v.is_empty() => Ok(Selector {
            instance: Some(v.into()),
            ..Default::default()
        }),
        _ => anyhow::bail!("--selector must be tag=NAME, group=NAME or instance=self|ID"),
    }
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let mut env = std::collections::BTreeMap::new();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    let shell = if args.shell {
        ShellTask {
            script: Some(args.command.join(" ")),
            env,
            ..Default::default()
        }
    } else {
        ShellTask {
            argv: args.command.clone(),
            env,
            ..Default::default()
        }
    };
    let spec = TaskSpec {
        kind: paddock_proto::KIND_AGENT_EXECUTE.into(),
        selector: match &args.instance {
            Some(i) => Some(Selector {
                instance: Some(i.clone()),
                ..Default::default()
            }),
            None => args.selector.as_deref().map(parse_selector).transpose()?,
        },
        shell: Some(shell),
        bundle: None,
        sandbox: SandboxSpec {
            backend: args.backend.clone(),
            network_mode: args.network.as_deref().map(|n| {
                if n == "none" {
                    NetworkMode::None
                } else {
                    NetworkMode::Default
                }
            }),
            env_passthrough_allowlist: args.env_passthrough.clone(),
            ..Default::default()
        },
        timeout_ms: Some(args.timeout.as_millis().max(1) as u64),
        queue_timeout_ms: Some(args.queue_timeout.as_millis() as u64),
        max_attempts: None,
    };
    spec.validate()
        .map_err(|e| anyhow::anyhow!("invalid task: {e}"))?;
    let api = Api::connect(&args.api).await?;
    let path = api.org_path(if args.queue {
        "/tasks"
    } else {
        "/tasks?requireAgent=true"
    });
    let body = serde_json::to_value(&spec)?;
    let submitted = submit_retrying(&api, &path, &body, args.instance_wait).await?;
    let task_id = submitted["taskId"]
        .as_str()
        .context("no taskId in answer")?
        .to_string();
    if args.detach {
        println!("{task_id}");
        return Ok(0);
    }
    let task = if args.json {
        wait_quietly(&api, &task_id).await?
    } else {
        stream(&api, &task_id).await?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&task)?);
    }
    Ok(exit_code_of(&task))
}

/// Submits, retrying while the gateway answers `INSTANCE_NOT_READY` (the caller's
/// instance is being bootstrapped, seed 000), for at most `wait`, with progress on stderr.
async fn submit_retrying(
    api: &Api,
    path: &str,
    body: &Value,
    wait: Duration,
) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut last_line = String::new();
    loop {
        match api.request(Method::POST, path, Some(body)).await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let Some(f) = e.downcast_ref::<crate::client::ApiFailure>() else {
                    return Err(e);
                };
                if f.code != "INSTANCE_NOT_READY" || tokio::time::Instant::now() >= deadline {
                    return Err(e);
                }
                let retry =
                    Duration::from_millis(f.retry_after_ms.unwrap_or(1000).clamp(100, 10_000));
                let line = format!("paddock: {}", f.message);
                if line != last_line {
                    eprintln!("{line}");
                    last_line = line;
                }
                tokio::time::sleep(retry.min(deadline - tokio::time::Instant::now())).await;
            }
        }
    }
}

/// The exit code `paddock run` returns for a finished task.
fn exit_code_of(task: &Value) -> i32 {
    let result = &task["result"];
    if task["state"].as_str() == Some("timed_out") {
        eprintln!(
            "paddock: task {}: TASK_TIMEOUT: {}",
            task["id"].as_str().unwrap_or("?"),
            task["errorMessage"].as_str().unwrap_or("")
        );
        return 124;
    }
    if let Some(code) = result["exitCode"].as_i64() {
        return code as i32;
    }
    if let Some(sig) = result["signal"].as_i64() {
        return 128 + sig as i32;
    }
    match task["state"].as_str() {
        Some("succeeded") => 0,
        Some("timed_out") => 124,
        _ => {
            if let Some(code) = task["errorCode"].as_str() {
                eprintln!(
                    "paddock: task {}: {code}: {}",
                    task["id"].as_str().unwrap_or("?"),
                    task["errorMessage"].as_str().unwrap_or("")
                );
            }
            if task["state"].as_str() == Some("failed") && task["result"].is_null() {
                EXIT_PADDOCK_ERROR
            } else {
                1
            }
        }
    }
}

async fn wait_quietly(api: &Api, task_id: &str) -> anyhow::Result<Value> {
    loop {
        let t = api
            .request(
                Method::GET,
                &api.org_path(&format!("/tasks/{task_id}")),
                None,
            )
            .await?;
        if matches!(
            t["state"].as_str(),
            Some("succeeded" | "failed" | "timed_out" | "canceled")
        ) {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Follows the task's server-sent events, printing output as it comes; returns the task.
/// Reconnects if the stream breaks; output already printed is not printed again.
async fn stream(api: &Api, task_id: &str) -> anyhow::Result<Value> {
    let mut printed: (usize, usize) = (0, 0); // characters printed: stdout, stderr
    let mut attempt_seen = 0u64;
    let mut last_seq = 0u64;
    let mut failures = 0;
    loop {
        let resp = api
            .builder(
                Method::GET,
                &api.org_path(&format!("/tasks/{task_id}/stream")),
            )
            .header("accept", "text/event-stream")
            .send()
            .await;
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                return Err(crate::client::decode(r)
                    .await
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("stream refused")));
            }
            Err(e) => {
                failures += 1;
                if failures > 30 {
                    return Err(e).context("lost the gateway while streaming");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut event = "message";
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = if e.trim() == "output" {
                            "output"
                        } else if e.trim() == "result" {
                            "result"
                        } else if e.trim() == "attempt" {
                            "attempt"
                        } else {
                            "other"
                        };
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                let Ok(v) = serde_json::from_str::<Value>(&data) else {
                    continue;
                };
                match event {
                    "attempt" => {
                        let a = v["attempt"].as_u64().unwrap_or(0);
                        if a != attempt_seen && attempt_seen != 0 {
                            eprintln!(
                                "paddock: the agent was lost; the task restarted as attempt {a}"
                            );
                            printed = (0, 0);
                        }
                        if a != attempt_seen {
                            last_seq = 0;
                        }
                        attempt_seen = a;
                    }
                    "output" => {
                        let seq = v["seq"].as_u64().unwrap_or(0);
                        if seq <= last_seq {
                            continue;
                        }
                        last_seq = seq;
                        let text = v["data"].as_str().unwrap_or("");
                        if v["stream"] == "stderr" {
                            printed.1 += text.chars().count();
                            let _ = std::io::stderr().write_all(text.as_bytes());
                        } else {
                            printed.0 += text.chars().count();
                            let mut out = std::io::stdout();
                            let _ = out.write_all(text.as_bytes());
                            let _ = out.flush();
                        }
                    }
                    "result" => {
                        // Print whatever live chunks did not carry (the result holds it all).
                        let r = &v["result"];
                        let rest = |s: &str, n: usize| s.chars().skip(n).collect::<String>();
                        let (out, err) = (
                            rest(r["stdout"].as_str().unwrap_or(""), printed.0),
                            rest(r["stderr"].as_str().unwrap_or(""), printed.1),
                        );
                        let _ = std::io::stdout().write_all(out.as_bytes());
                        let _ = std::io::stdout().flush();
                        let _ = std::io::stderr().write_all(err.as_bytes());
                        if r["stdoutTruncated"].as_bool() == Some(true)
                            || r["stderrTruncated"].as_bool() == Some(true)
                        {
                            eprintln!("paddock: output was truncated at the agent's cap");
                        }
                        return Ok(v);
                    }
                    _ => {}
                }
            }
        }
        // Stream ended without a result: reconnect.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `paddock task ...`
#[derive(Debug, Subcommand)]
pub(crate) enum TaskCommand {
    /// Show a task and its stored result.
    Get {
        #[command(flatten)]
        api: ApiArgs,
        /// Task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List recent tasks.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this state (queued, dispatched, running, succeeded, failed, timed_out, canceled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task.
    Cancel {
        #[command(flatten)]
        api: ApiArgs,
        /// Task id.
        id: String,
    },
}

pub(crate) async fn task(cmd: TaskCommand) -> anyhow::Result<i32> {
    match cmd {
        TaskCommand::Get { api, id, json } => {
            let api = Api::connect(&api).await?;
            let t = api
                .request(Method::GET, &api.org_path(&format!("/tasks/{id}")), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("task     {}", t["id"].as_str().unwrap_or(""));
                println!("state    {}", t["state"].as_str().unwrap_or(""));
                println!("attempt  {}/{}", t["attempt"], t["maxAttempts"]);
                if let Some(a) = t["agentId"].as_str() {
                    println!("agent    {a}");
                }
                if let Some(c) = t["exitCode"].as_i64() {
                    println!("exit     {c}");
                }
                if let Some(c) = t["errorCode"].as_str() {
                    println!("error    {c}: {}", t["errorMessage"].as_str().unwrap_or(""));
                }
                if let Some(out) = t["result"]["stdout"].as_str() {
                    print!("{out}");
                }
            }
            Ok(0)
        }
        TaskCommand::List {
            api,
            state,
            limit,
            json,
        } => {
            let api = Api::connect(&api).await?;
            let mut path = api.org_path(&format!("/tasks?limit={limit}"));
            if let Some(s) = state {
                path.push_str(&format!("&state={s}"));
            }
            let v = api.request(Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for t in v["tasks"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<10} exit={}",
                        t["id"].as_str().unwrap_or(""),
                        t["state"].as_str().unwrap_or(""),
                        t["exitCode"]
                    );
                }
            }
            Ok(0)
        }
        TaskCommand::Cancel { api, id } => {
            let api = Api::connect(&api).await?;
            let v = api
                .request(
                    Method::POST,
                    &api.org_path(&format!("/tasks/{id}/cancel")),
                    None,
                )
                .await?;
            println!("{}", v["state"].as_str().unwrap_or(""));
            Ok(0)
        }
    }
}

/// `paddock org ...`
#[derive(Debug, Subcommand)]
pub(crate) enum OrgCommand {
    /// Create an org and print its id and first owner token.
    Create {
        /// Display name.
        name: String,
        /// Gateway HTTP base URL.
        #[arg(long, env = "PADDOCK_API_URL", default_value = "http://127.0.0.1:3002")]
        api_url: String,
        /// The gateway's service token.
        #[arg(long, env = "GATEWAY_SERVICE_TOKEN", hide_env_values = true)]
        service_token: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn org(cmd: OrgCommand) -> anyhow::Result<i32> {
    let OrgCommand::Create {
        name,
        api_url,
        service_token,
        json,
    } = cmd;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/orgs", api_url.trim_end_matches('/')))
        .header("X-Service-Token", service_token)
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {api_url}"))?;
    let v = crate::client::decode(resp).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("org id       {}", v["org"]["id"].as_str().unwrap_or(""));
        println!("owner token  {}", v["ownerToken"].as_str().unwrap_or(""));
    }
    Ok(0)
}
