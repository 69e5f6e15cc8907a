//! The Paddock gateway: the control plane's HTTP API, the executor WebSocket hub, the
//! dispatcher and the background reapers, over one [`paddock_store::Store`].
//!
//! [`Gateway::start`] wires everything: it connects the store, and spawns the workers
//! (dispatcher, presence, reapers, the PostgreSQL listener); [`Gateway::serve`] runs the HTTP
//! server until a shutdown signal, then closes agent sessions and waits for the workers.

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod dispatcher;
pub mod error;
pub mod executor_ws;
pub mod hub;
pub mod inserter;
pub mod instances;
pub mod metrics;
pub mod openapi;
mod serve;
pub mod vm_token;
pub mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use paddock_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{GatewayConfig, GatewayRole};

/// Shared state of one gateway replica. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Settings.
    pub cfg: Arc<GatewayConfig>,
    /// Database.
    pub store: Store,
    /// Live agent connections on this replica.
    pub hub: Arc<hub::Hub>,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Per-task wake-ups.
    pub waiters: Arc<bus::Waiters>,
    /// Wakes the dispatcher.
    pub dispatch_wake: Arc<dispatcher::Wake>,
    /// Fired at shutdown.
    pub shutdown: CancellationToken,
    /// Signs and verifies instance tokens.
    pub signer: Arc<vm_token::TokenSigner>,
    /// Org-level changes for watchers (`/pools/{name}/watch`).
    pub org_events: tokio::sync::broadcast::Sender<bus::OrgSignal>,
    /// Bundle bytes (local directory or S3).
    pub bundles: Arc<paddock_bundle::BundleStore>,
    /// API tokens resolved recently.
    pub tokens: Arc<auth::TokenCache>,
    /// Group commit of submitted tasks.
    pub(crate) inserter: inserter::Inserter,
}

/// The router for a state: routes depend on the role.
pub fn app(state: AppState) -> Router {
    let mut router = api::common_routes();
    if state.cfg.role.is_edge() {
        router = router.merge(api::edge_routes(&state));
    }
    if state.cfg.role.is_brain() {
        router = router.merge(api::internal_routes(&state));
    }
    let role = state.cfg.role;
    router
        .fallback(move |uri: axum::http::Uri| async move {
            let path = uri.path();
            let edge_path =
                path.starts_with("/v1/") || path.starts_with("/ws/") || path.starts_with("/api/");
            let brain_path = path.starts_with("/internal/") || path.starts_with("/api/internal/");
            let edge_path = edge_path && !brain_path;
            if (edge_path && !role.is_edge()) || (brain_path && !role.is_brain()) {
                return error::ApiError::new(
                    axum::http::StatusCode::MISDIRECTED_REQUEST,
                    paddock_proto::ErrorCode::RoleNotServed,
                    format!("this gateway runs the {role:?} role, which does not serve {path}"),
                );
            }
            error::ApiError::not_found("route")
        })
        .with_state(state)
}

/// A running gateway replica.
pub struct Gateway {
    state: AppState,
    workers: TaskTracker,
}

impl Gateway {
    /// Connects the store, clears connections this replica id may have left behind, and
    /// starts the background workers.
    ///
    /// # Errors
    /// The database is unreachable or its migration fails.
    pub async fn start(cfg: GatewayConfig) -> anyhow::Result<Gateway> {
        let store = Store::connect(&cfg.database_url).await?;
        store.clear_replica_connections(&cfg.replica_id).await?;
        let key = match cfg.instances.token_secret.clone() {
            Some(k) if !k.is_empty() => k,
            _ => store.gateway_secret("instance-token-key").await?,
        };
        let bundles = match &cfg.bundles.object_store_url {
            Some(url) => paddock_bundle::BundleStore::from_url(url)?,
            None => {
                paddock_bundle::BundleStore::local(&std::env::temp_dir().join("paddock-objects"))?
            }
        };
        let (inserter, inserts) = inserter::channel();
        let state = AppState {
            cfg: Arc::new(cfg),
            store,
            hub: Arc::default(),
            metrics: Arc::default(),
            waiters: Arc::default(),
            dispatch_wake: Arc::default(),
            shutdown: CancellationToken::new(),
            signer: Arc::new(vm_token::TokenSigner::new(key.into_bytes())),
            org_events: tokio::sync::broadcast::channel(1024).0,
            bundles: Arc::new(bundles),
            tokens: Arc::default(),
            inserter,
        };
        let workers = TaskTracker::new();
        workers.spawn(bus::listen(state.clone()));
        workers.spawn(inserter::run(state.clone(), inserts));
        workers.spawn(workers::presence(state.clone()));
        if state.cfg.role.is_edge() {
            workers.spawn(dispatcher::run(state.clone()));
        }
        if state.cfg.role.is_brain() {
            workers.spawn(workers::reaper(state.clone()));
        }
        workers.close();
        Ok(Gateway { state, workers })
    }

    /// The shared state (tests, embedding).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves HTTP on `listener` until `signal` completes, then shuts down gracefully:
    /// agent sessions are told to reconnect (their tasks keep running and report to the next
    /// gateway), open requests get up to 10 s, workers stop, connections are cleared.
    ///
    /// # Errors
    /// The server fails.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let shutdown = state.shutdown.clone();
        let app = app(state.clone());
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    () = signal => {}
                    () = shutdown.cancelled() => {}
                }
                shutdown.cancel();
            }
        });
        let serving = tokio::spawn(serve::serve(listener, app, shutdown.clone()));
        shutdown.cancelled().await;
        tracing::info!("shutting down: closing agent sessions");
        // Sessions see the token and close; HTTP requests in flight get a bounded grace.
        match tokio::time::timeout(Duration::from_secs(10), serving).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("server task failed: {e}"),
            Err(_) => tracing::warn!("requests still open after 10 s; closing anyway"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.workers.wait()).await;
        if let Err(e) = state
            .store
            .clear_replica_connections(&state.cfg.replica_id)
            .await
        {
            tracing::warn!("could not clear connections at shutdown: {e}");
        }
        state.store.close().await;
        tracing::info!("gateway stopped");
        Ok(())
    }

    /// Asks the gateway to stop (same as the signal).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }
}

/// A gateway on a fresh SQLite file for the crate's unit tests, its configuration adjusted
/// by `adjust`; the directory holding the file lives as long as the returned guard.
#[cfg(test)]
pub(crate) async fn test_gateway(
    adjust: impl FnOnce(&mut GatewayConfig),
) -> (tempfile::TempDir, Gateway) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", dir.path().join("paddock.db").display());
    let mut cfg = GatewayConfig::new(url);
    adjust(&mut cfg);
    let gw = Gateway::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
    (dir, gw)
}
