//! HTTP handlers, one module per resource. Handlers parse and authorise at the edge and
//! call the store; they never see a WebSocket.

pub(crate) mod agents;
pub(crate) mod bundles;
pub(crate) mod instances;
pub(crate) mod orgs;
pub(crate) mod pools;
pub(crate) mod spawn;
pub(crate) mod system;
pub(crate) mod tasks;

use axum::routing::{get, post, put};
use axum::{Router, middleware};

use crate::AppState;

/// The routes of the public API and the executor WebSocket (`edge` role).
pub(crate) fn edge_routes(state: &AppState) -> Router<AppState> {
    let org_scoped = Router::new()
        .route("/v1/orgs/{org_id}", get(orgs::get_org))
        .route("/v1/orgs/{org_id}/tokens", post(orgs::create_token))
        .route(
            "/v1/orgs/{org_id}/tokens/{token_id}",
            axum::routing::delete(orgs::revoke_token),
        )
        .route(
            "/v1/orgs/{org_id}/agents/pairing-tokens",
            post(agents::create_pairing_token),
        )
        .route("/v1/orgs/{org_id}/agents", get(agents::list_agents))
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}",
            get(agents::get_agent),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}/tags",
            put(agents::set_tags),
        )
        .route(
            "/v1/orgs/{org_id}/agents/{agent_id}/revoke",
            post(agents::revoke),
        )
        .route(
            "/v1/orgs/{org_id}/tasks",
            post(tasks::submit).get(tasks::list),
        )
        .route("/v1/orgs/{org_id}/tasks/run", post(tasks::run))
        .route("/v1/orgs/{org_id}/tasks/batch", post(tasks::submit_batch))
        .route("/v1/orgs/{org_id}/tasks/{task_id}", get(tasks::get))
        .route(
            "/v1/orgs/{org_id}/tasks/{task_id}/output",
            get(tasks::output),
        )
        .route(
            "/v1/orgs/{org_id}/tasks/{task_id}/events",
            get(tasks::events),
        )
        .route(
            "/v1/orgs/{org_id}/tasks/{task_id}/stream",
            get(tasks::stream),
        )
        .route(
            "/v1/orgs/{org_id}/tasks/{task_id}/cancel",
            post(tasks::cancel),
        )
        .route(
            "/v1/orgs/{org_id}/bundles/{digest}",
            get(bundles::get_bundle).put(bundles::put_bundle),
        )
        .route(
            "/v1/orgs/{org_id}/workflows/{workflow_id}",
            get(bundles::get_workflow),
        )
        .route(
            "/v1/orgs/{org_id}/workflows/{workflow_id}/versions",
            post(bundles::register_version),
        )
        .route("/v1/orgs/{org_id}/pools", get(pools::list))
        .route(
            "/v1/orgs/{org_id}/pools/{name}",
            put(pools::upsert).get(pools::get),
        )
        .route(
            "/v1/orgs/{org_id}/pools/{name}/instances",
            post(pools::create_instance),
        )
        .route("/v1/orgs/{org_id}/pools/{name}/watch", get(pools::watch))
        .route("/v1/orgs/{org_id}/instances", get(instances::list))
        .route(
            "/v1/orgs/{org_id}/instances/{instance_id}",
            get(instances::get),
        )
        .route(
            "/v1/orgs/{org_id}/instances/{instance_id}/token",
            post(instances::token),
        )
        .route(
            "/v1/orgs/{org_id}/instances/{instance_id}/deregister",
            post(instances::deregister),
        )
        .route(
            "/v1/orgs/{org_id}/instances/{instance_id}/terminate",
            post(instances::terminate),
        )
        .route(
            "/v1/orgs/{org_id}/instances/{instance_id}/fail",
            post(instances::fail),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::org_layer,
        ));
    Router::new()
        .merge(org_scoped)
        .route("/api/v1/vm/status", get(instances::status))
        .route("/v1/bundles/{digest}", get(bundles::download))
        .route("/api/spawn", post(spawn::spawn).get(spawn::list))
        .route("/api/spawn/{vm_id}/status", get(spawn::status))
        .route("/api/spawn/{vm_id}", axum::routing::delete(spawn::release))
        .route("/api/v1/vm/rebootstrap", post(instances::rebootstrap))
        .route("/v1/whoami", get(orgs::whoami))
        .route("/v1/agents/pair", post(agents::pair))
        .route("/ws/executor", get(crate::executor_ws::ws_executor))
        .route("/ws/vm", get(crate::executor_ws::ws_vm))
}

/// Internal service-to-service routes (`brain` role), behind `X-Service-Token`.
pub(crate) fn internal_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/orgs", post(orgs::create_org))
        .route("/internal/v1/dispatch", post(tasks::internal_dispatch))
        .route(
            "/api/internal/spawn/{workflow_id}",
            get(bundles::internal_spawn_config),
        )
        .route(
            "/internal/v1/managed-executors/issue",
            post(agents::issue_managed),
        )
        .route(
            "/internal/v1/managed-executors/{executor_id}/revoke",
            post(agents::revoke_managed),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::service_layer,
        ))
}

/// Routes every role serves.
pub(crate) fn common_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route("/openapi.json", get(system::openapi))
}
