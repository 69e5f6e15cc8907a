-- Workflow bundles and spawns (issue 5; seed 001). Portable SQL, as 0001.

-- Bundles an org has uploaded (objects are content-addressed and shared in the object
-- store; this row is what lets an org use one: knowing a digest is not enough).
CREATE TABLE bundles (
    org_id TEXT NOT NULL REFERENCES orgs(id),
    digest TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, digest)
);

-- Versions of a workflow; the highest is current.
CREATE TABLE workflow_versions (
    org_id TEXT NOT NULL REFERENCES orgs(id),
    workflow_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    digest TEXT NOT NULL,
    size BIGINT NOT NULL,
    runtime TEXT NOT NULL,
    entrypoint TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, workflow_id, version)
);

-- A spawn: one bundle run on an instance (seed 001's vmId is the spawn id).
CREATE TABLE spawns (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    workflow_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    digest TEXT NOT NULL,
    task_id TEXT NOT NULL,
    instance_id TEXT,
    pool TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    released_at BIGINT
);
CREATE INDEX spawns_org ON spawns(org_id, released_at);
