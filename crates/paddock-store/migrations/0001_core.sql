-- Paddock core schema, version 1. Portable SQL: runs unchanged on SQLite and PostgreSQL.
-- Times are BIGINT milliseconds since the Unix epoch; ids are TEXT (UUID); JSON is TEXT;
-- booleans are BIGINT 0/1.

CREATE TABLE orgs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    token_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE pairing_tokens (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    token_hash TEXT NOT NULL UNIQUE,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    agent_id TEXT
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    name TEXT NOT NULL,
    pool TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    tags TEXT NOT NULL,
    reported_tags TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    agent_version TEXT,
    connected_replica TEXT,
    connected_at BIGINT,
    last_seen_at BIGINT,
    revoked_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX agents_org ON agents(org_id);

CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    kind TEXT NOT NULL,
    required_tag TEXT,
    backend TEXT,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    agent_id TEXT,
    lease_expires_at BIGINT,
    queue_deadline_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    dispatched_at BIGINT,
    started_at BIGINT,
    finished_at BIGINT,
    exit_code BIGINT,
    error_code TEXT,
    error_message TEXT,
    result TEXT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT
);
CREATE INDEX tasks_queue ON tasks(org_id, state, created_at);
CREATE INDEX tasks_state_lease ON tasks(state, lease_expires_at);
CREATE INDEX tasks_agent ON tasks(agent_id, state);
CREATE INDEX tasks_expires ON tasks(expires_at);

CREATE TABLE task_output (
    task_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    stream TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (task_id, attempt, seq)
);

CREATE TABLE task_events (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX task_events_task ON task_events(task_id, id);
