//! `paddock vm status|rebootstrap`: the caller's own instance (seed 000).

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;

use crate::client::{Api, ApiArgs, decode};

/// Your instance: the machine or VM a gateway bootstraps for you on demand (seed 000).
///
/// Examples:
///   paddock vm status
///   paddock vm rebootstrap --wait 2m
///   paddock vm status --user alice --json     # owner/admin tokens acting for a user
#[derive(Debug, Subcommand)]
pub(crate) enum VmCommand {
    /// Show status, instance id, bootstrap attempts, last error and when to retry.
    Status(VmArgs),
    /// Force a bootstrap now (bypasses the cooldown and the spent attempts).
    Rebootstrap {
        #[command(flatten)]
        vm: VmArgs,
        /// Passed to the bootstrap command as VM_TICKET.
        #[arg(long)]
        ticket: Option<String>,
        /// Then wait up to this long for the instance to be ready (e.g. 2m); exit 1 if it
        /// is not.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct VmArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Act for this user (`X-User-Id`; owner/admin tokens only). Default: the token's own.
    #[arg(long)]
    user: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

async fn call(
    api: &Api,
    method: Method,
    path: &str,
    user: Option<&str>,
    ticket: Option<&str>,
) -> anyhow::Result<Value> {
    let mut b = api.builder(method, path);
    if let Some(u) = user {
        b = b.header("X-User-Id", u);
    }
    if let Some(t) = ticket {
        b = b.header("X-VM-Ticket", t);
    }
    let resp = b.send().await.context("cannot reach the gateway")?;
    decode(resp).await
}

fn print(v: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    println!(
        "status:             {}",
        v["status"].as_str().unwrap_or("?")
    );
    if let Some(id) = v["instanceId"].as_str() {
        println!("instance:           {id}");
    }
    println!(
        "bootstrap attempts: {}",
        v["bootstrapAttempts"].as_u64().unwrap_or(0)
    );
    if let Some(e) = v["lastError"].as_str() {
        println!("last error:         {e}");
    }
    if let Some(ms) = v["retryAfterMs"].as_u64() {
        println!("retry after:        {ms} ms");
    }
    Ok(())
}

pub(crate) async fn run(cmd: VmCommand) -> anyhow::Result<i32> {
    match cmd {
        VmCommand::Status(a) => {
            let api = Api::connect(&a.api).await?;
            let v = call(
                &api,
                Method::GET,
                "/api/v1/vm/status",
                a.user.as_deref(),
                None,
            )
            .await?;
            print(&v, a.json)?;
            Ok(0)
        }
        VmCommand::Rebootstrap { vm, ticket, wait } => {
            let api = Api::connect(&vm.api).await?;
            let v = call(
                &api,
                Method::POST,
                "/api/v1/vm/rebootstrap",
                vm.user.as_deref(),
                ticket.as_deref(),
            )
            .await?;
            let Some(wait) = wait else {
                print(&v, vm.json)?;
                return Ok(0);
            };
            let deadline = tokio::time::Instant::now() + wait;
            let mut last = String::new();
            loop {
                let s = call(
                    &api,
                    Method::GET,
                    "/api/v1/vm/status",
                    vm.user.as_deref(),
                    None,
                )
                .await?;
                let status = s["status"].as_str().unwrap_or("?").to_string();
                if status != last && !vm.json {
                    eprintln!(
                        "paddock: instance {} (attempt {})",
                        status,
                        s["bootstrapAttempts"].as_u64().unwrap_or(0)
                    );
                    last.clone_from(&status);
                }
                if matches!(status.as_str(), "ready" | "busy") {
                    print(&s, vm.json)?;
                    return Ok(0);
                }
                if status == "failed" || tokio::time::Instant::now() >= deadline {
                    print(&s, vm.json)?;
                    return Ok(1);
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    }
}
