//! The OpenAPI document, generated from the handlers' annotations. `docs/openapi.json` is
//! a checked-in copy; CI fails when it differs from `paddock openapi`.

use utoipa::OpenApi;

use crate::api::{agents, bundles, instances, orgs, pools, spawn, system, tasks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Paddock gateway API",
        description = "Self-hosted execution plane: orgs, agents, tasks, instances and pools. Errors are `{code, message}` with stable codes (docs/protocol.md)."
    ),
    paths(
        orgs::create_org,
        orgs::whoami,
        orgs::get_org,
        orgs::create_token,
        orgs::revoke_token,
        agents::create_pairing_token,
        agents::pair,
        agents::list_agents,
        agents::get_agent,
        agents::set_tags,
        agents::revoke,
        agents::issue_managed,
        agents::revoke_managed,
        tasks::submit,
        tasks::submit_batch,
        tasks::run,
        tasks::internal_dispatch,
        tasks::get,
        tasks::list,
        tasks::output,
        tasks::events,
        tasks::cancel,
        tasks::stream,
        instances::status,
        instances::rebootstrap,
        instances::list,
        instances::get,
        instances::token,
        instances::deregister,
        instances::terminate,
        instances::fail,
        pools::upsert,
        pools::list,
        pools::get,
        pools::create_instance,
        pools::watch,
        bundles::get_bundle,
        bundles::put_bundle,
        bundles::register_version,
        bundles::get_workflow,
        bundles::internal_spawn_config,
        bundles::download,
        spawn::spawn,
        spawn::list,
        spawn::status,
        spawn::release,
        system::healthz,
        system::readyz,
        system::metrics,
        system::openapi,
    ),
    components(schemas(crate::error::ErrorResponse))
)]
struct ApiDoc;

/// The document, with the crate version.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// Pretty JSON, as checked in at `docs/openapi.json`.
pub fn document_json() -> String {
    let mut s = serde_json::to_string_pretty(&document()).unwrap_or_default();
    s.push('\n');
    s
}
