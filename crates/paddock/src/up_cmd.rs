//! `paddock up`: the whole system on one machine, on the embedded defaults.
//!
//! Starts a gateway on a SQLite file under the data dir, makes sure an org, an owner token,
//! a service token and a managed executor exist (kept in `<data-dir>/up.json`, mode 0600),
//! starts one local agent as a child process, prints how to use it, and runs until Ctrl-C
//! or SIGTERM. Shutdown order: the agent first (it finishes running tasks or hands them
//! back), then the gateway.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use paddock_gateway::{Gateway, GatewayConfig};
use paddock_store::{Role, Store};
use serde::{Deserialize, Serialize};

/// Options of `paddock up`.
#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Where the database and credentials live (default ~/.paddock/up).
    #[arg(long, env = "PADDOCK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on (loopback by default: nothing is exposed).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, env = "GATEWAY_PORT", default_value_t = 3002)]
    port: u16,
    /// Do not start the local agent.
    #[arg(long)]
    no_agent: bool,
    /// Log filter.
    #[arg(long, env = "GATEWAY_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// What `up` keeps between runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpState {
    org_id: String,
    owner_token: String,
    service_token: String,
    executor_id: String,
    executor_token: String,
}

fn load_state(path: &Path) -> anyhow::Result<Option<UpState>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(serde_json::from_str(&t).with_context(|| {
            format!("{} is corrupt; remove it to start afresh", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_state(path: &Path, state: &UpState) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn ensure_state(store: &Store, path: &Path) -> anyhow::Result<UpState> {
    if let Some(s) = load_state(path)? {
        let token_ok = store
            .authenticate_api_token(&s.owner_token)
            .await?
            .is_some();
        let agent_ok = store
            .authenticate_agent(&s.executor_token)
            .await?
            .is_some_and(|a| a.revoked_at.is_none());
        if token_ok && agent_ok {
            return Ok(s);
        }
        tracing::warn!(
            "stored credentials in {} are no longer valid; creating new ones",
            path.display()
        );
    }
    let org = match store.list_orgs().await?.into_iter().next() {
        Some(o) => o,
        None => store.create_org("default").await?,
    };
    let (_, owner_token) = store
        .create_api_token(&org.id, Role::Owner, "paddock up")
        .await?;
    let (agent, executor_token) = store.issue_managed_agent(&org.id, "local", &[]).await?;
    let state = UpState {
        org_id: org.id,
        owner_token,
        service_token: paddock_store::secret::generate("pds_"),
        executor_id: agent.id,
        executor_token,
    };
    save_state(path, &state)?;
    Ok(state)
}

pub(crate) async fn run(args: UpArgs) -> anyhow::Result<i32> {
    crate::logging::init(&args.log_level, false);
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        paddock_agent::settings::home_dir()
            .join(".paddock")
            .join("up")
    });
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}:{} (is another `paddock up` running? try --port)",
                args.host, args.port
            )
        })?;
    let addr = listener.local_addr()?;
    let http_url = format!("http://{addr}");
    let ws_url = format!("ws://{addr}/ws/executor");

    let db_url = format!("sqlite://{}", data_dir.join("paddock.db").display());
    let store = Store::connect(&db_url).await?;
    let state_path = data_dir.join("up.json");
    let st = ensure_state(&store, &state_path).await?;
    store.close().await;

    let mut cfg = GatewayConfig::new(db_url);
    cfg.service_token = Some(st.service_token.clone());
    cfg.http_url = http_url.clone();
    cfg.ws_url = ws_url.clone();
    let gateway = Gateway::start(cfg).await?;
    let stop_gateway = gateway.shutdown_token();
    let (gw_done_tx, gw_done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = gateway.serve(listener, std::future::pending()).await;
        let _ = gw_done_tx.send(r);
    });

    let mut agent = if args.no_agent {
        None
    } else {
        Some(spawn_agent(&st, &http_url, &ws_url)?)
    };

    println!();
    println!("Paddock is up.");
    println!(
        "  API:          {http_url}   (OpenAPI {http_url}/openapi.json, metrics {http_url}/metrics)"
    );
    println!("  Org:          {}", st.org_id);
    println!("  Owner token:  {}", st.owner_token);
    println!(
        "  Data:         {}   (credentials in up.json, mode 0600)",
        data_dir.display()
    );
    if agent.is_some() {
        println!("  Local agent:  {} (host backend)", st.executor_id);
    }
    println!();
    println!("Try it, in another terminal:");
    println!(
        "  export PADDOCK_API_URL={http_url} PADDOCK_TOKEN={}",
        st.owner_token
    );
    println!("  paddock run -- echo hello from paddock");
    println!(
        "  curl -s -H \"Authorization: Bearer $PADDOCK_TOKEN\" -H \"X-Org-Id: {}\" {http_url}/v1/orgs/{}/agents",
        st.org_id, st.org_id
    );
    println!();
    println!("Ctrl-C stops it (running tasks finish first).");
    let _ = std::io::stdout().flush();

    // Run until a signal; restart the agent if it dies on its own.
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    loop {
        let exited = async {
            match agent.as_mut() {
                Some(child) => child.wait().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut signal => break,
            status = exited => {
                tracing::warn!("local agent exited ({status:?}); restarting in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                agent = Some(spawn_agent(&st, &http_url, &ws_url)?);
            }
        }
    }
    tracing::info!("stopping: local agent first, then the gateway");
    if let Some(mut child) = agent {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(40), child.wait())
            .await
            .is_err()
        {
            tracing::warn!("agent did not stop within 40 s; killing it");
            let _ = child.kill().await;
        }
    }
    stop_gateway.cancel();
    match gw_done_rx.await {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("gateway task ended unexpectedly"),
    }
    Ok(0)
}

fn spawn_agent(
    st: &UpState,
    http_url: &str,
    ws_url: &str,
) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("locating the paddock binary")?;
    let child = tokio::process::Command::new(exe)
        .args(["agent", "start", "--pool", "managed"])
        .env("PADDOCK_EXECUTOR_ID", &st.executor_id)
        .env("PADDOCK_EXECUTOR_TOKEN", &st.executor_token)
        .env("PADDOCK_GATEWAY_WS_URL", ws_url)
        .env("PADDOCK_API_BASE", http_url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the local agent")?;
    Ok(child)
}
