//! `paddock`: the one binary. Parses the command line and hands over to the library crates;
//! each subcommand lives in its own module.

mod agent_cmd;
mod bundle_cmd;
mod client;
mod gateway_cmd;
mod logging;
mod pool_cmd;
mod run_cmd;
mod up_cmd;
mod vm_cmd;

use clap::{Parser, Subcommand};

/// Exit code for Paddock's own failures (bad flags, unreachable gateway, refused request), as
/// opposed to a task's exit code, which `paddock run` passes through.
pub(crate) const EXIT_PADDOCK_ERROR: i32 = 125;

/// Paddock: a self-hosted execution plane. Runs shell tasks on agents you own, in sandboxes,
/// with strict tenancy between orgs.
///
/// First run: `paddock up`, then in another terminal the `paddock run` line it prints.
#[derive(Debug, Parser)]
#[command(
    name = "paddock",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything on one machine: gateway (SQLite under the data dir) + one local agent.
    Up(up_cmd::UpArgs),
    /// Run the gateway (control plane): HTTP API, executor WebSocket, dispatcher, reapers.
    Gateway(gateway_cmd::GatewayArgs),
    /// Run or manage node agents.
    #[command(subcommand)]
    Agent(agent_cmd::AgentCommand),
    /// Run a shell command on an agent, stream its output, exit with its exit code.
    Run(run_cmd::RunArgs),
    /// Inspect and cancel tasks.
    #[command(subcommand)]
    Task(run_cmd::TaskCommand),
    /// Create orgs (needs the gateway's service token).
    #[command(subcommand)]
    Org(run_cmd::OrgCommand),
    /// Workflow bundles (seed 001): push a directory, fetch and verify a bundle.
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCommand),
    /// Your own instance (seed 000): status and forced rebootstrap.
    #[command(subcommand)]
    Vm(vm_cmd::VmCommand),
    /// Warm-pool supervisor: keep a pool of instances between --min and --max, sized to demand.
    #[command(subcommand)]
    Pool(pool_cmd::PoolCommand),
    /// Print the gateway's OpenAPI document (checked in as docs/openapi.json).
    Openapi,
}

fn main() {
    // The sandbox zygote must stay single-threaded (it forks each run's init into new
    // namespaces): dispatch it before argument parsing and before any runtime starts.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == paddock_agent::sandbox::process::zygote::ZYGOTE_ARG)
    {
        paddock_agent::sandbox::process::zygote::zygote_main();
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(EXIT_PADDOCK_ERROR);
        }
    };
    // The command runs as a task on a worker, not in `block_on` on this thread: a worker
    // polls the I/O driver itself, so a socket's readiness is handled on the thread that saw
    // it, with no hand-off to a parked main thread (two context switches per message).
    let command = runtime.spawn(async move {
        let result = match cli.command {
            Command::Up(args) => up_cmd::run(args).await,
            Command::Gateway(args) => gateway_cmd::run(args).await,
            Command::Agent(cmd) => agent_cmd::run(cmd).await,
            Command::Run(args) => run_cmd::run(args).await,
            Command::Task(cmd) => run_cmd::task(cmd).await,
            Command::Org(cmd) => run_cmd::org(cmd).await,
            Command::Vm(cmd) => vm_cmd::run(cmd).await,
            Command::Bundle(cmd) => bundle_cmd::run(cmd).await,
            Command::Pool(cmd) => pool_cmd::run(cmd).await,
            Command::Openapi => {
                print!("{}", paddock_gateway::openapi::document_json());
                Ok(0)
            }
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                EXIT_PADDOCK_ERROR
            }
        }
    });
    let code = runtime.block_on(command).unwrap_or_else(|e| {
        eprintln!("error: the command stopped: {e}");
        EXIT_PADDOCK_ERROR
    });
    // Exit without waiting for blocking tasks (a child's pipes, stdin readers).
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
