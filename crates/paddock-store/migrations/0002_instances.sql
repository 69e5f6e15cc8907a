-- Instances and warm pools (issue 4; seeds 000, 002, 003). Portable SQL, as 0001.

-- A pool: instances from one provider, kept between `min_size` and `max_size` by
-- `paddock pool run`. `max_use` 0 = unlimited; 1 = one task per instance, then destroy.
CREATE TABLE pools (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    name TEXT NOT NULL,
    provider TEXT NOT NULL,
    labels TEXT NOT NULL,
    min_size BIGINT NOT NULL,
    max_size BIGINT NOT NULL,
    target_size BIGINT,
    max_use BIGINT NOT NULL,
    boot_deadline_ms BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX pools_org_name ON pools(org_id, name);

-- A machine, VM or container that runs one Paddock agent: a user's own (mode `user`, seed
-- 000) or a pool member (mode `pool`). Its agent row has the same id (agents.pool =
-- 'instance'), so dispatch, leases and results work as for any agent.
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    user_id TEXT,
    pool_id TEXT,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    provider TEXT NOT NULL,
    bootstrap_attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    uses BIGINT NOT NULL DEFAULT 0,
    max_use BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_bootstrap_at BIGINT,
    ready_at BIGINT,
    connected_at BIGINT,
    disconnected_at BIGINT,
    busy_at BIGINT,
    idle_since BIGINT,
    terminated_at BIGINT
);
CREATE INDEX instances_org_status ON instances(org_id, status);
CREATE INDEX instances_pool_status ON instances(pool_id, status);
-- At most one live instance per user of an org.
CREATE UNIQUE INDEX instances_user_live ON instances(org_id, user_id) WHERE user_id IS NOT NULL AND terminated_at IS NULL;

-- Secrets the gateway generates once and every replica shares (the instance token key,
-- unless PADDOCK_JWT_SECRET / JWT_SECRET is set).
CREATE TABLE gateway_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
